"""The engine's decode step by batch size, with the KV cache growing in place or concatenating.

    python -m bench.decode_step [--rows 1,8,32] [--turns 5] [--dtype float32]

Builds the engine on the default base (no adapter) and drives its generation lane on this thread:
``rows`` generations of one prompt are prefilled and decoded 40 steps (about 65 cached tokens),
then ``--steps`` decode steps are timed. Each configuration runs once per turn, in turns: the
cache's full-attention layers as ``GrowingLayer`` (appending into spare columns, the engine's
default) or as transformers' ``DynamicLayer`` (a concatenation per step). Prints the median step
time and tokens/s per batch size and the ratio between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from transformers import DynamicCache, PretrainedConfig

from app.config import Settings
from app.engine import kv_cache
from app.engine.engine import Engine
from app.engine.types import GenerateWork, Generation, SamplingParams
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from bench.common import PROMPT, machine_line


def decoding(engine: Engine, prompt: list[int], rows: int, tokens: int) -> None:
    """Queue ``rows`` generations of ``prompt`` (``tokens`` new tokens each, forced) on the engine's
    generation lane and run them 40 steps (prefill, then about 40 tokens cached beyond the prompt)."""
    params = SamplingParams(max_new_tokens=tokens, min_tokens=tokens)
    for _ in range(rows):
        engine.gen.queue.append(GenerateWork(Generation(prompt, params)))
    for _ in range(40):
        engine.gen.step(engine._admission())


def timed_steps(engine: Engine, steps: int) -> list[float]:
    """The seconds of each of ``steps`` decode steps of the running batch."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.gen.decode_step()
        times.append(time.perf_counter() - start)
    return times


def drain(engine: Engine) -> None:
    """Run the lane until its generations are done."""
    while engine.gen.busy():
        engine.gen.step(engine._admission())


def step_ms(engine: Engine, prompt: list[int], rows: int, steps: int) -> float:
    """The median decode step (ms) of ``rows`` generations of ``prompt``."""
    decoding(engine, prompt, rows, 40 + steps + 2)
    times = timed_steps(engine, steps)
    drain(engine)
    return statistics.median(times) * 1000


def concatenating(config: PretrainedConfig) -> DynamicCache:
    """transformers' own cache: every layer concatenates at each step."""
    return DynamicCache(config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    settings = Settings()
    base = load_base_model(settings.base_model, settings.cache_dir, "cpu", args.dtype, "none")
    engine = Engine(base, settings, Metrics())
    prompt = list(base.tokenizer(PROMPT)["input_ids"])
    growing = kv_cache.new_cache
    configs: dict[str, Callable[[PretrainedConfig], DynamicCache]] = {
        "grows in place": growing,
        "concatenates": concatenating,
    }
    rows = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    for turn in range(args.turns):
        order = list(configs.items())
        for name, make in order[turn % 2 :] + order[: turn % 2]:
            kv_cache.new_cache = make  # type: ignore[assignment]
            for n in rows:
                times.setdefault((name, n), []).append(step_ms(engine, prompt, n, args.steps))
    kv_cache.new_cache = growing
    print(machine_line())
    print(f"dtype {args.dtype}, ~65 cached tokens, median of {args.turns} turns × {args.steps} steps\n")
    print("| rows | grows in place | concatenates | ratio |")
    print("|---:|---:|---:|---:|")
    for n in rows:
        a = statistics.median(times[("grows in place", n)])
        b = statistics.median(times[("concatenates", n)])
        grown, concatenated = (
            f"{a:.1f} ms ({n / a * 1000:.0f} tok/s)",
            f"{b:.1f} ms ({n / b * 1000:.0f} tok/s)",
        )
        print(f"| {n} | {grown} | {concatenated} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
