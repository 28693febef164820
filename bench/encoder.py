"""Classification throughput on an encoder base: bare encoder vs this engine with 16 mixed adapters
(LoRA, bottleneck, both kinds) vs HF PEFT's mixed batch.

    python -m bench.encoder [--base all-minilm-l6-v2] [--device auto] [--repeats 8]

Prints one markdown table. As in bench.throughput, each part runs in its own process with its own
bare base, in turns (round r of every configuration before round r + 1 of any), and every ratio is
the median over the turns of the configuration's rate divided by its bare base's rate in that turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from app.adapters.kinds import load_adapter
from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.models.base_lm import BaseLM, load_base_model
from app.platform import keep_freed_memory, release_omp_threads
from bench.common import TEXT, make_peft, save_adapters, save_bottlenecks
from bench.throughput import Config, in_turns
from tests.helpers.versions import HeldVersion, held

LABELS = ["negative", "neutral", "positive"]
ADAPTERS = 16
BARE_ENGINE = "bare encoder (this engine's process, no adapter)"
BARE_HF = "bare encoder (HF forward)"


class Part:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base: BaseLM = load_base_model(args.base, Settings().cache_dir, args.device, args.dtype)
        self.device, self.dtype, self.tok = self.base.device, self.base.dtype, self.base.tokenizer
        self.texts = [f"{i}. {TEXT}" for i in range(args.batch)]
        enc = self.tok(self.texts, return_tensors="pt", padding=True)
        self.enc = {k: v.to(self.device) for k, v in enc.items()}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bare(self, model: Any, release: bool) -> Config:
        """The encoder forward, [CLS] pooling and a 2-layer head: a classification without adapters."""
        hidden = model.config.hidden_size
        dense = torch.randn(hidden, hidden, device=self.device, dtype=self.dtype) * 0.02
        head = torch.randn(len(LABELS), hidden, device=self.device, dtype=self.dtype) * 0.02

        @torch.inference_mode()
        def run(r: int) -> int:
            cls = model.base_model(**self.enc).last_hidden_state[:, 0]
            torch.softmax((torch.tanh(cls @ dense.T) @ head.T).float(), -1).cpu()
            if release:  # as every helper thread of the server does
                release_omp_threads()
            return self.args.batch

        return Config(run)

    def engine(self, out: Path) -> dict[str, list[float]]:
        settings = Settings(
            max_device_adapters=64,
            max_batch_size=self.args.batch,
            max_batch_wait_ms=2,
            max_queue=100_000,
            request_timeout_s=3600,
        )
        engine = Engine(self.base, settings, Metrics())
        engine.start()
        ids = [self.tok(t)["input_ids"] for t in self.texts]
        batch = self.args.batch

        def infos(folders: list[Path]) -> list[HeldVersion]:
            return [held(f.name, load_adapter(f, self.base.spec, 64)) for f in folders]

        def classify(adapters: list[HeldVersion]) -> Config:
            k = len(adapters)

            async def one_round(r: int) -> int:  # every adapter in turn, one text per request
                await asyncio.gather(
                    *(_one(engine, adapters[(r * batch + i) % k], ids[i]) for i in range(batch))
                )
                return batch

            return Config(lambda r: asyncio.run(one_round(r)), warmup=-(-len(adapters) // batch))

        spec = self.base.spec
        layers = int(self.base.model.config.num_hidden_layers)
        head = self.base.surface.head_modules[-1]
        bn = infos(save_bottlenecks(out / "bn", ADAPTERS, spec.hidden_size, layers, "classify", LABELS, head))
        configs = {BARE_ENGINE: self.bare(self.base.model, release=True)}
        lora: list[HeldVersion] = []
        for rank in self.args.ranks:
            lora = infos(sorted((out / f"r{rank}-store").iterdir(), key=lambda p: int(p.name[1:])))
            configs[f"this engine, {ADAPTERS} LoRA adapters r={rank}"] = classify(lora)
        configs[f"this engine, {ADAPTERS} bottleneck adapters (Houlsby)"] = classify(bn)
        configs[f"this engine, {ADAPTERS // 2} LoRA r={self.args.ranks[-1]} + {ADAPTERS // 2} bottleneck"] = (
            classify(
                [x for pair in zip(lora[: ADAPTERS // 2], bn[: ADAPTERS // 2], strict=True) for x in pair]
            )
        )
        try:
            return in_turns(configs, self.args.repeats, self.sync)
        finally:
            engine.stop()

    def hf(self, out: Path) -> dict[str, list[float]]:
        a = self.args
        plain = AutoModelForSequenceClassification.from_pretrained(self.base.path, dtype=self.dtype)
        plain = plain.to(self.device).eval()
        names = [f"a{i % ADAPTERS}" for i in range(a.batch)]
        configs = {BARE_HF: self.bare(plain, release=False)}
        for rank in a.ranks:
            peft = make_peft(self.base.path, "classify", ADAPTERS, rank, self.dtype, self.device, len(LABELS))
            save_adapters(peft, out / f"r{rank}", ADAPTERS, LABELS)

            @torch.inference_mode()
            def mixed(r: int, peft: Any = peft) -> int:
                peft(**self.enc, adapter_names=names).logits.float().softmax(-1).cpu()
                return a.batch

            configs[f"HF PEFT mixed batch, {ADAPTERS} LoRA adapters r={rank}"] = Config(mixed)
        return in_turns(configs, a.repeats, self.sync)


async def _one(engine: Engine, v: HeldVersion, ids: list[int]) -> list[list[float]]:
    assert v.weights is not None
    return await engine.classify(v, [ids], v.weights)


def _part(args: argparse.Namespace, part: str, out: Path) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "bench.encoder", "--part", part, "--out", str(out)]
    for key in ("base", "device", "dtype", "batch", "repeats"):
        cmd += [f"--{key}", str(getattr(args, key))]
    cmd += ["--ranks", ",".join(map(str, args.ranks))]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(parts: list[tuple[str, dict[str, list[float]]]]) -> None:
    print("\n| configuration | texts/s | vs its bare encoder (turns: min-max) |")
    print("|---|---:|---:|")
    for bare, rates in parts:
        for name, values in rates.items():
            ratios = [x / b for x, b in zip(values, rates[bare], strict=True)]
            print(
                f"| {name} | {statistics.median(values):.1f} | {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}) |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="all-minilm-l6-v2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--ranks", type=lambda v: [int(x) for x in v.split(",")], default=[8, 16], help="LoRA ranks"
    )
    parser.add_argument("--batch", type=int, default=32, help="texts per batch")
    parser.add_argument("--repeats", type=int, default=8, help="turns (timed rounds per configuration)")
    parser.add_argument("--part", choices=["hf", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()
    if args.part:
        part = Part(args)
        print(json.dumps(part.hf(args.out) if args.part == "hf" else part.engine(args.out)))
        return
    out = Path(tempfile.mkdtemp(prefix="adapterserve-bench-"))
    print(
        f"base={args.base} device={args.device} dtype={args.dtype} ranks={args.ranks} batch={args.batch} "
        f"texts of {len(TEXT.split())} words, repeats={args.repeats}",
        flush=True,
    )
    try:
        hf = _part(args, "hf", out)  # also writes the LoRA adapters the engine loads
        engine = _part(args, "engine", out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print_table([(BARE_ENGINE, engine), (BARE_HF, hf)])


if __name__ == "__main__":
    main()
