"""What a classification ensemble costs: the same texts classified by one adapter and by 2- and
4-member ensembles (each member its own rows of the shared batches, as ``POST /classify`` with
``adapters`` runs them), through this engine, in turns.

    python -m bench.ensemble [--texts 16] [--repeats 8]

Prints one markdown table: texts/s and the time of each configuration relative to one adapter. A
K-member ensemble runs K times the rows, so K x is the cost of the work itself.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from app.adapters.kinds import load_adapter
from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from app.platform import keep_freed_memory
from bench.common import TEXT, make_peft, save_adapters
from bench.throughput import Config, in_turns
from tests.helpers.versions import HeldVersion, held

LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--texts", type=int, default=16, help="texts per request")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()
    base = load_base_model(args.base, Settings().cache_dir, args.device, args.dtype)
    out = Path(tempfile.mkdtemp(prefix="adapterserve-ensemble-"))
    try:
        peft = make_peft(base.path, "classify", 4, args.rank, base.dtype, base.device, len(LABELS))
        folders = save_adapters(peft, out / "a", 4, LABELS)
        del peft
        members = [held(f.name, load_adapter(f, base.spec, 64)) for f in folders]
        settings = Settings(max_device_adapters=8, max_batch_size=4 * args.texts, max_queue=10_000)
        engine = Engine(base, settings, Metrics())
        engine.start()
        ids = [base.tokenizer(f"{i}. {TEXT}")["input_ids"] for i in range(args.texts)]

        async def classify(group: list[HeldVersion]) -> None:
            await asyncio.gather(*(engine.classify(v, ids, v.weights) for v in group))

        def config(k: int) -> Config:
            return Config(lambda r: asyncio.run(classify(members[:k])) or args.texts, warmup=2)

        configs = {"one adapter": config(1), "2-member ensemble": config(2), "4-member ensemble": config(4)}
        try:
            rates = in_turns(configs, args.repeats, lambda: None)
        finally:
            engine.stop()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(
        f"\n{args.texts} texts of {len(TEXT.split())} words per request, LoRA r={args.rank}, "
        f"{args.repeats} turns\n"
    )
    print("| configuration | texts/s | time vs one adapter (turns: min-max) |")
    print("|---|---:|---:|")
    for name, values in rates.items():
        ratios = [b / x for x, b in zip(values, rates["one adapter"], strict=True)]
        print(
            f"| {name} | {statistics.median(values):.1f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
