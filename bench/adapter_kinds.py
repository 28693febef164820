"""Sixteen distinct adapters of each kind in one batch: LoRA, DoRA (LoRA of the same rank plus its
magnitudes) and IA³, against the bare base, for generation and classification.

    python -m bench.adapter_kinds [--rank 16] [--tokens 32] [--repeats 5] [--quantization auto]

One engine in this process on the default base; each configuration, in turns (bench.throughput
.in_turns): 16 concurrent greedy generations of ``--tokens`` tokens, request i on adapter i (the
bare base: none), and 64 one-text classifications over 16 classification adapters. Adapters target
every linear layer of the blocks (LoRA, DoRA) or PEFT's IA³ defaults (keys, values, the
feed-forward output). Prints tokens/s and texts/s, and each kind's rate relative to LoRA's.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from app.adapters.kinds import load_adapter
from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import SamplingParams
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from app.platform import keep_freed_memory
from bench.common import PROMPT, TEXT, machine_line, save_adapters
from bench.throughput import Config, in_turns
from tests.helpers.versions import HeldVersion, generation, held

N = 16
LABELS = ["a", "b", "c"]


def make(base: Path, task: str, kind: str, rank: int, out: Path) -> list[Path]:
    """``N`` adapters of ``kind`` for ``task``, random (scales near 1), as PEFT saves them."""
    torch.manual_seed(0)
    classify = task == "classify"
    model: Any = (
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
        if classify
        else AutoModelForCausalLM.from_pretrained(base)
    )
    task_type = TaskType.SEQ_CLS if classify else TaskType.CAUSAL_LM
    cfg: Any = (
        IA3Config(task_type=task_type)
        if kind == "ia3"
        else LoraConfig(
            task_type=task_type, r=rank, lora_alpha=2 * rank, target_modules="all-linear",
            init_lora_weights=False, use_dora=kind == "dora",
        )
    )  # fmt: skip
    peft = get_peft_model(model, cfg, adapter_name="a0")
    for i in range(1, N):
        peft.add_adapter(f"a{i}", cfg)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.01)
        elif "ia3_l" in name:
            param.data = 1 + 0.05 * torch.randn_like(param)
    folders = save_adapters(peft, out / f"{task}-{kind}", N, LABELS if classify else None)
    del peft, model
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    keep_freed_memory()
    settings = Settings(max_device_adapters=3 * N + 4, max_batch_size=64, max_queue=10_000)
    base = load_base_model(settings.base_model, settings.cache_dir, "cpu", "auto", args.quantization)
    out = Path(tempfile.mkdtemp(prefix="adapterserve-kinds-"))
    kinds = ("lora", "dora", "ia3")
    try:
        adapters: dict[tuple[str, str], list[HeldVersion]] = {}
        for task in ("generate", "classify"):
            for kind in kinds:
                folders = make(base.path, task, kind, args.rank, out)
                adapters[task, kind] = [
                    held(f"{task}-{kind}-{i}", load_adapter(f, base.spec, 256)) for i, f in enumerate(folders)
                ]
        engine = Engine(base, settings, Metrics())
        engine.start()
        tok = base.tokenizer
        params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
        prompts = [tok(f"{i}. {PROMPT}")["input_ids"] for i in range(N)]
        texts = [tok(f"{i}. {TEXT}")["input_ids"] for i in range(4 * N)]

        async def generate(versions: list[HeldVersion] | None) -> int:
            runs = [
                engine.generate(generation(p, params, versions[i] if versions else None))
                for i, p in enumerate(prompts)
            ]
            return sum(len(r.token_ids) for r in await asyncio.gather(*runs))

        async def classify(versions: list[HeldVersion]) -> int:
            runs = [
                engine.classify(versions[i % N], [t], versions[i % N].weights) for i, t in enumerate(texts)
            ]
            return len(await asyncio.gather(*runs))

        def generating(versions: list[HeldVersion] | None) -> Config:
            return Config(lambda _: asyncio.run(generate(versions)), warmup=2)

        def classifying(versions: list[HeldVersion]) -> Config:
            return Config(lambda _: asyncio.run(classify(versions)), warmup=2)

        gen = {"bare base": generating(None)} | {k: generating(adapters["generate", k]) for k in kinds}
        cls = {k: classifying(adapters["classify", k]) for k in kinds}
        try:
            rates = {"generate": in_turns(gen, args.repeats, lambda: None)}
            rates["classify"] = in_turns(cls, args.repeats, lambda: None)
        finally:
            engine.stop()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(machine_line())
    print(
        f"default base, quantization {base.quantization}; {N} distinct adapters per kind (LoRA and DoRA "
        f"rank {args.rank}, every linear layer; IA3 at PEFT's targets); median of {args.repeats} turns\n"
    )
    print("| kind | generation tokens/s (16 streams) | vs LoRA | classification texts/s | vs LoRA |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("bare base", *kinds):
        g = rates["generate"][kind]
        c = rates["classify"].get(kind)
        g_ratio = [x / y for x, y in zip(g, rates["generate"]["lora"], strict=True)]
        cells = [f"{statistics.median(g):.1f}", f"{statistics.median(g_ratio):.2f}x"]
        if c is None:
            cells += ["-", "-"]
        else:
            c_ratio = [x / y for x, y in zip(c, rates["classify"]["lora"], strict=True)]
            cells += [f"{statistics.median(c):.1f}", f"{statistics.median(c_ratio):.2f}x"]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
