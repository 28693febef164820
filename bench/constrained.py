"""What structured output costs in the batch: decode tokens/s of 16 concurrent generations (over 4
LoRA adapters) with 0, 4 and 16 of the rows under a JSON schema, through this engine, in turns.

    python -m bench.constrained [--rows 16] [--tokens 32] [--repeats 6]

The constrained rows follow a ticket schema whose first field is a long string (so that no row ends
before ``--tokens``: every round decodes the same number of tokens); the others run with
``ignore_eos``. Prints one markdown table: tokens/s, time relative to no constrained row, and the
extra time per decode step (per constrained row) that the grammar masks add.
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
from app.engine.types import SamplingParams
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from app.platform import keep_freed_memory
from bench.common import make_peft, save_adapters
from bench.throughput import Config, in_turns
from tests.helpers.versions import generation, held

SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "minLength": 400},
        "intent": {"type": "string", "enum": ["refund", "delivery", "technical", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "items": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["summary", "intent", "urgency", "items"],
    "additionalProperties": False,
}
QUESTION = "My order AB123456 arrived broken and I want a refund. Write the support ticket."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, default=16, help="concurrent generations per round")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()
    base = load_base_model("", Settings().cache_dir, args.device, args.dtype)
    out = Path(tempfile.mkdtemp(prefix="adapterserve-constrained-"))
    try:
        peft = make_peft(base.path, "generate", 4, 8, base.dtype, base.device)
        folders = save_adapters(peft, out / "a", 4)
        del peft
        versions = [held(f.name, load_adapter(f, base.spec, 256)) for f in folders]
        settings = Settings(max_device_adapters=8, max_batch_size=args.rows, max_queue=10_000)
        engine = Engine(base, settings, Metrics())
        grammar = engine.runner.grammars.json_schema(SCHEMA, "bench")
        engine.start()
        text = base.tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
        )
        prompt = base.tokenizer(str(text), add_special_tokens=False)["input_ids"]
        free = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
        constrained = SamplingParams(max_new_tokens=args.tokens, grammar=grammar)

        async def generate(k: int) -> int:
            jobs = []
            for i in range(args.rows):
                v = versions[i % len(versions)]
                jobs.append(engine.generate(generation(prompt, constrained if i < k else free, v)))
            results = await asyncio.gather(*jobs)
            assert all(len(r.token_ids) == args.tokens for r in results), "a row ended early"
            return sum(len(r.token_ids) for r in results)

        def config(k: int) -> Config:
            return Config(lambda r: asyncio.run(generate(k)), warmup=1)

        counts = sorted({0, min(4, args.rows), args.rows})
        configs = {f"{k} of {args.rows}": config(k) for k in counts}
        try:
            rates = in_turns(configs, args.repeats, lambda: None)
        finally:
            engine.stop()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    first = next(iter(rates))
    print(
        f"\n{args.rows} concurrent generations of {args.tokens} tokens (4 LoRA adapters, r=8), "
        f"{args.repeats} turns, {base.device} {str(base.dtype).removeprefix('torch.')}\n"
    )
    print(
        "| rows under the JSON schema | tokens/s | time vs none (turns: min-max) "
        "| extra ms per step | per constrained row |"
    )
    print("|---|---:|---:|---:|---:|")
    for (name, values), k in zip(rates.items(), counts, strict=True):
        ratios = [b / x for x, b in zip(values, rates[first], strict=True)]
        # a round is `tokens` decode steps: the time it adds over the unconstrained round, per step
        extra = [(args.rows / x - args.rows / b) * 1e3 for x, b in zip(values, rates[first], strict=True)]
        per_row = f"{statistics.median(extra) / k:.2f} ms" if k else "-"
        print(
            f"| {name} | {statistics.median(values):.1f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {statistics.median(extra):.2f} | {per_row} |"
        )


if __name__ == "__main__":
    main()
