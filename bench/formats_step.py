"""The engine's decode step of the default base by batch size, per weight format, in turns.

    python -m bench.formats_step [--formats none,bf16] [--rows 1,8,16,32] [--turns 5]

One engine per ``ADAPTERSERVE_QUANTIZATION`` format (no adapter), driven on this thread as
``bench/decode_step.py`` does (``rows`` generations prefilled, 40 steps decoded, then ``--steps``
steps timed); the formats take turns. Prints the median step time per batch size and format, and
each format's speed relative to the first.
"""

from __future__ import annotations

import argparse
import statistics

from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from bench.common import PROMPT, machine_line
from bench.decode_step import step_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="none,bf16")
    parser.add_argument("--rows", default="1,8,16,32")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    settings = Settings()
    formats = args.formats.split(",")
    engines: dict[str, Engine] = {}
    prompt: list[int] = []
    for kind in formats:
        base = load_base_model(settings.base_model, settings.cache_dir, "cpu", "float32", kind)
        engines[kind] = Engine(base, settings, Metrics())
        prompt = list(base.tokenizer(PROMPT)["input_ids"])
    rows = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    for turn in range(args.turns):
        order = formats[turn % len(formats) :] + formats[: turn % len(formats)]
        for kind in order:
            for n in rows:
                times.setdefault((kind, n), []).append(step_ms(engines[kind], prompt, n, args.steps))
    print(machine_line())
    print(
        f"float32 compute, no adapter, ~65 cached tokens, median of {args.turns} turns × {args.steps} steps\n"
    )
    print(
        "| rows | "
        + " | ".join(formats)
        + " | "
        + " | ".join(f"{k} vs {formats[0]}" for k in formats[1:])
        + " |"
    )
    print("|---:|" + "---:|" * (2 * len(formats) - 1))
    for n in rows:
        ms = {k: statistics.median(times[(k, n)]) for k in formats}
        cells = [f"{ms[k]:.1f} ms ({n / ms[k] * 1000:.0f} tok/s)" for k in formats]
        ratios = [f"{ms[formats[0]] / ms[k]:.2f}x" for k in formats[1:]]
        print(f"| {n} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
