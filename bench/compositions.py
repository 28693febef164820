"""What generation compositions cost: a merged adapter against a plain adapter of its rank, and a
4-member ensemble generation against one adapter, through this engine, in turns.

    python -m bench.compositions [--requests 4] [--tokens 32] [--repeats 6]

Each round runs ``--requests`` concurrent greedy generations of ``--tokens`` tokens. Configurations:
one LoRA adapter of rank r; the ``linear`` merge of 4 such adapters (rank r); a plain adapter of
rank 4r; the ``cat`` merge of the 4 (rank 4r); the 4-member ensemble (``average``: 4 rows per
request, each token sampled from the mean distribution). Prints one markdown table: tokens/s and
each configuration's time relative to one adapter.
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
from app.adapters.merging import merge_lora
from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import Member, SamplingParams
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from app.platform import keep_freed_memory
from bench.common import PROMPT, make_peft, save_adapters
from bench.throughput import Config, in_turns
from tests.helpers.versions import HeldVersion, generation, held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=4, help="concurrent generations per round")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()
    base = load_base_model(args.base, Settings().cache_dir, args.device, args.dtype)
    out = Path(tempfile.mkdtemp(prefix="adapterserve-compositions-"))
    try:
        peft = make_peft(base.path, "generate", 4, args.rank, base.dtype, base.device)
        folders = save_adapters(peft, out / "a", 4)
        del peft
        peft = make_peft(base.path, "generate", 1, 4 * args.rank, base.dtype, base.device)
        (wide,) = save_adapters(peft, out / "w", 1)
        del peft
        loaded = [load_adapter(f, base.spec, 256) for f in folders]
        members = [(f.name, a, 1.0) for f, a in zip(folders, loaded, strict=True)]
        one = held("one", loaded[0])
        plain_wide = held("plain-wide", load_adapter(wide, base.spec, 256))
        linear = held("linear", merge_lora(members, "linear", 256))
        cat = held("cat", merge_lora(members, "cat", 256))
        ensemble = tuple(Member(held(f"m{i}", a), a, 1.0) for i, a in enumerate(loaded))
        settings = Settings(max_device_adapters=12, max_batch_size=8 * args.requests, max_queue=10_000)
        engine = Engine(base, settings, Metrics())
        engine.start()
        params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
        prompts = [base.tokenizer(f"{i}. {PROMPT}")["input_ids"] for i in range(args.requests)]

        async def generate(version: HeldVersion | None, group: tuple[Member, ...]) -> int:
            results = await asyncio.gather(
                *(engine.generate(generation(p, params, version, group)) for p in prompts)
            )
            return sum(len(r.token_ids) for r in results)

        def config(version: HeldVersion | None, group: tuple[Member, ...] = ()) -> Config:
            return Config(lambda r: asyncio.run(generate(version, group)), warmup=2)

        configs = {
            f"one adapter (r={args.rank})": config(one),
            f"linear merge of 4 (r={args.rank})": config(linear),
            f"plain adapter r={4 * args.rank}": config(plain_wide),
            f"cat merge of 4 (r={4 * args.rank})": config(cat),
            "4-member ensemble (average)": config(None, ensemble),
        }
        try:
            rates = in_turns(configs, args.repeats, lambda: None)
        finally:
            engine.stop()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    names = list(rates)
    first = names[0]
    same_rank = {names[1]: names[0], names[3]: names[2]}  # a merge -> the plain adapter of its rank
    print(
        f"\n{args.requests} concurrent greedy generations of {args.tokens} tokens per round, "
        f"{args.repeats} turns, {base.device} {str(base.dtype).removeprefix('torch.')}\n"
    )
    print(
        "| configuration | tokens/s | time vs one adapter (turns: min-max) "
        "| time vs a plain adapter of its rank |"
    )
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        ratios = [b / x for x, b in zip(values, rates[first], strict=True)]
        plain = same_rank.get(name)
        vs_plain = "-"
        if plain is not None:
            own = [b / x for x, b in zip(values, rates[plain], strict=True)]
            vs_plain = f"{statistics.median(own):.2f}x ({min(own):.2f}-{max(own):.2f})"
        print(
            f"| {name} | {statistics.median(values):.1f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {vs_plain} |"
        )


if __name__ == "__main__":
    main()
