"""Embeddings per second on an encoder base: sentence-transformers' ``encode``, this engine's bare
base, and this engine with 16 distinct embedding adapters (PEFT FEATURE_EXTRACTION LoRA) in the same
batches.

    python -m bench.embeddings [--base all-minilm-l6-v2] [--texts 256] [--per-request 8]
                               [--quantization none] [--repeats 5]

One process, in turns (bench.throughput.in_turns). Every configuration embeds the same ``--texts``
texts, tokenization included: sentence-transformers in batches of 32 (its default), the engine as
``--texts / --per-request`` concurrent requests (the adapters: request i uses adapter i mod 16),
which it batches itself (MAX_BATCH_SIZE 64). Prints texts/s and the ratio to sentence-transformers,
with the machine line.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from app.adapters.kinds import load_adapter
from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from bench.common import TEXT, machine_line
from bench.throughput import Config, in_turns
from tests.helpers.versions import HeldVersion, held

ADAPTERS = 16


def make_adapters(base: Path, out: Path, n: int, rank: int) -> list[Path]:
    """``n`` FEATURE_EXTRACTION LoRA adapters (every linear layer, random weights) as PEFT saves them."""
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = LoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=rank,
            lora_alpha=2 * rank,
            target_modules="all-linear",
            init_lora_weights=False,
        )
        model = get_peft_model(AutoModel.from_pretrained(base, dtype=torch.float32), cfg)
        folder = out / f"emb-{i}"
        model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="all-minilm-l6-v2")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    settings = Settings(max_batch_size=64, max_queue=10_000, quantization=args.quantization)
    base = load_base_model(args.base, settings.cache_dir, "cpu", "float32", args.quantization)
    texts = [f"{i}. {TEXT[: 40 + 7 * (i % 20)]}" for i in range(args.texts)]
    st = SentenceTransformer(str(base.path), device="cpu")
    out = Path(tempfile.mkdtemp(prefix="adapterserve-embeddings-"))
    try:
        adapters: list[HeldVersion] = [
            held(f.name, load_adapter(f, base.spec, 256))
            for f in make_adapters(base.path, out, ADAPTERS, args.rank)
        ]
        engine = Engine(base, settings, Metrics())
        engine.start()
        tok = base.tokenizer
        step = args.per_request

        async def embed(with_adapters: bool) -> int:
            chunks = [texts[i : i + step] for i in range(0, len(texts), step)]

            async def one(i: int, chunk: list[str]) -> list[list[float]]:
                ids = [list(tok(t)["input_ids"]) for t in chunk]
                version = adapters[i % ADAPTERS] if with_adapters else None
                weights = version.weights if version is not None else None
                return await engine.classify(version, ids, weights, output="embedding")

            results = await asyncio.gather(*(one(i, c) for i, c in enumerate(chunks)))
            return sum(len(r) for r in results)

        def encode(_: int) -> int:
            return len(st.encode(texts, batch_size=32, convert_to_numpy=True))

        configs = {
            "sentence-transformers encode": Config(encode),
            "adapterserve, bare base": Config(lambda _: asyncio.run(embed(False))),
            f"adapterserve, {ADAPTERS} adapters mixed": Config(lambda _: asyncio.run(embed(True)), warmup=2),
        }
        rates = in_turns(configs, args.repeats, lambda: None)
        engine.stop(5.0)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(machine_line())
    print(
        f"{base.spec.model_id}, quantization {base.quantization}, {args.texts} texts of ~10-40 tokens, "
        f"{step} per request, rank-{args.rank} LoRA adapters; median of {args.repeats} turns\n"
    )
    print("| configuration | texts/s | vs sentence-transformers |")
    print("|---|---:|---:|")
    ref = statistics.median(rates["sentence-transformers encode"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.0f} | {rate / ref:.2f}x |")


if __name__ == "__main__":
    main()
