"""The engine's decode step at fp32 and at w8a8, with a kernel per linear layer and with the
kernels the server uses (one per input: q/k/v and gate/up share theirs), measured in turns.

    python -m bench.w8a8_step [--rows 16] [--steps 4] [--turns 6]

Each configuration is a generation batch of ``--rows`` bare-base rows after prefill; a turn times
``--steps`` decode steps of each. Prints one markdown table (median ms per step, and the rate
against fp32's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from app.config import Settings
from app.engine.generation import GenerationBatch
from app.engine.runner import Runner
from app.engine.slots import DeviceSlots
from app.engine.types import GenerateWork, Generation, SamplingParams
from app.models import w8a8
from app.models.base_lm import load_base_model
from app.models.multi_lora import BASE_SLOT, RoutingContext, wrap_linear_layers
from app.models.quantize import Quantization
from bench.common import PROMPT


def _batch(kind: Quantization, rows: int, shared: bool) -> GenerationBatch:
    calibrate: Callable[..., Any] = w8a8.calibrate
    if not shared:  # the same calibration without the groups: a kernel per layer
        w8a8.calibrate = lambda *a: (calibrate(*a)[0], [])
    try:
        base = load_base_model("", Settings().cache_dir, "cpu", "float32", kind)
    finally:
        w8a8.calibrate = calibrate
    ctx = RoutingContext()
    runner = Runner(base, ctx)
    DeviceSlots(wrap_linear_layers(base.model, ctx), rows, base.device, base.dtype)
    tok = base.tokenizer
    params = SamplingParams(max_new_tokens=1000, ignore_eos=True)
    prompts = [tok(f"{i} {PROMPT}")["input_ids"] for i in range(rows)]
    works = [(GenerateWork(Generation(p, params)), [BASE_SLOT]) for p in prompts]
    batch = GenerationBatch.start(runner, works, lambda ids: str(tok.decode(ids)))
    while batch.prefill_chunk(4096) is None:
        pass
    for _ in range(3):
        batch.step()
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    configs = {
        "fp32": _batch("none", args.rows, True),
        "w8a8, a kernel per layer": _batch("w8a8", args.rows, False),
        "w8a8, a kernel per input (served)": _batch("w8a8", args.rows, True),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.turns):
        for name, batch in configs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                batch.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    print(f"\n{args.rows} rows, decode step, {args.turns} turns × {args.steps} steps\n")
    print("| decode step | ms | vs fp32 |\n|---|---:|---:|")
    for name, values in times.items():
        ratio = statistics.median(f / v for f, v in zip(times["fp32"], values, strict=True))
        print(f"| {name} | {statistics.median(values):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
