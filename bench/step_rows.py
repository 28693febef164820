"""What a decode step's extra rows cost, operation by operation.

    python -m bench.step_rows [--rows 2,32] [--quantization bf16] [--turns 3] [--steps 6]

Builds the engine on the default base (no adapter) and drives its generation lane on this thread:
for each row count, that many generations of one prompt (every row with ``min_tokens``, as the
noisy-neighbour flood sends them) are prefilled and decoded 40 steps, then ``--steps`` decode steps
run under PyTorch's profiler. Prints the median step time (without the profiler) per row count,
and the operations whose time grows most from the fewest rows to the most: where the per-row cost
of a step goes, which decides how much a light tenant's tokens cost beside a heavy one's rows.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch

from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from bench.common import PROMPT, machine_line
from bench.decode_step import decoding, drain, timed_steps


def measure(engine: Engine, prompt: list[int], rows: int, steps: int) -> tuple[float, dict[str, float]]:
    """The median step time (ms) and each operation's mean self time per step (ms)."""
    decoding(engine, prompt, rows, 40 + 2 * steps + 2)
    times = timed_steps(engine, steps)
    ops: dict[str, float] = defaultdict(float)
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            engine.gen.decode_step()
    for event in prof.key_averages():
        ops[event.key] += event.self_cpu_time_total / 1000 / steps
    drain(engine)
    return statistics.median(times) * 1000, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="2,32")
    parser.add_argument("--quantization", default="bf16")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    settings = Settings()
    base = load_base_model(settings.base_model, settings.cache_dir, "cpu", "float32", args.quantization)
    engine = Engine(base, settings, Metrics())
    prompt = list(base.tokenizer(PROMPT)["input_ids"])
    rows = [int(r) for r in args.rows.split(",")]
    walls: dict[int, list[float]] = defaultdict(list)
    ops: dict[int, dict[str, list[float]]] = {n: defaultdict(list) for n in rows}
    for turn in range(args.turns):
        for n in rows[turn % len(rows) :] + rows[: turn % len(rows)]:
            wall, per_op = measure(engine, prompt, n, args.steps)
            walls[n].append(wall)
            for key, ms in per_op.items():
                ops[n][key].append(ms)
    print(machine_line())
    print(f"quantization {args.quantization}, no adapter, ~55 cached tokens; medians of {args.turns} turns\n")
    print("| rows | step | per row |")
    print("|---:|---:|---:|")
    for n in rows:
        wall = statistics.median(walls[n])
        print(f"| {n} | {wall:.1f} ms | {wall / n:.2f} ms |")
    low, high = rows[0], rows[-1]

    def median(n: int, key: str) -> float:
        return statistics.median(ops[n][key]) if ops[n].get(key) else 0.0

    keys = sorted(set(ops[low]) | set(ops[high]), key=lambda k: median(low, k) - median(high, k))
    print(f"\n| operation (profiler self time) | {low} rows | {high} rows | added per extra row |")
    print("|---|---:|---:|---:|")
    for key in keys[: args.top]:
        a, b = median(low, key), median(high, key)
        print(f"| `{key}` | {a:.2f} ms | {b:.2f} ms | {(b - a) / (high - low) * 1000:.0f} µs |")


if __name__ == "__main__":
    main()
