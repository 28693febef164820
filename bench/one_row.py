"""The one-row step against the model's forward: one stream's decode step and a short prefill.

    python -m bench.one_row [--formats bf16,int4] [--turns 7] [--steps 20] [--rows 1,17,32]

In one process, per ``--formats`` weight format: the default base, its linear layers wrapped as
the engine wraps them, a rank-16 all-linear LoRA adapter in a slot. The engine's own generation
batch of one row (``GenerationBatch``, sampling included) is timed over ``--steps`` decode steps
(after ~40 tokens), bare and with the adapter, with the one-row step (``app/models/one_row.py``)
and with the model's forward (``ADAPTERSERVE_ONE_ROW_DECODE=false``); and the prefill of a
9-token chat line after 31 cached tokens (the chat template's prefix; median of 5) the same ways. Every
configuration runs once per turn, in turns (this machine's speed drifts); medians. ``--rows``: the
decode step of batches of that many rows too (prompts of four lengths, so rows are left-padded;
bare, the adapter on every row, and the adapter on every other row: a batch of two adapters).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.adapters.lora_format import load_lora
from app.config import Settings
from app.engine import kv_cache
from app.engine.generation import GenerationBatch
from app.engine.runner import Runner
from app.engine.slots import DeviceSlots
from app.engine.types import GenerateWork, Generation, SamplingParams
from app.models.base_lm import load_base_model
from app.models.multi_lora import BASE_SLOT, RoutingContext, wrap_linear_layers
from app.models.one_row import OneRowDecoder
from bench.common import PROMPT, machine_line, make_peft, save_adapters
from tests.helpers.versions import held

RANK = 16


def _decode_ms(runner: Runner, slots: list[int], prompt: list[int], steps: int) -> float:
    """Median decode step of a generation batch of a row per slot in ``slots`` (prompts of four
    lengths: several rows are left-padded), after ~40 tokens."""
    tok = runner.base.tokenizer
    params = SamplingParams(max_new_tokens=steps + 50, min_tokens=steps + 50)
    works = [
        (GenerateWork(Generation(prompt[: len(prompt) - i % 4], params)), [s]) for i, s in enumerate(slots)
    ]
    batch = GenerationBatch.start(runner, works, lambda ids: str(tok.decode(ids)))
    while batch.prefill_chunk(4096) is None:
        pass
    for _ in range(40 - len(prompt) % 40):
        batch.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _prefill_ms(runner: Runner, slot: int, cached: int, new: int) -> float:
    """One prefill forward of ``new`` tokens after ``cached`` ones, in ``slot`` (as ``_run``), the
    cached ones taken into a new cache as a prefix-cache hit is (in the engine's cache dtype)."""
    model = runner.model
    ids = torch.randint(100, 1000, (1, cached + new))
    with runner.routed([slot]), torch.inference_mode():
        full = kv_cache.new_cache(model.config)
        model(input_ids=ids[:, :cached], cache=full, use_cache=True)
        kv_of = kv_cache.row_prefix(full, 0, cached)
        assert kv_of is not None
        hit = kv_of(0, cached).to(runner.kv_dtype or torch.float32)
        del full
        cache = kv_cache.prefilled(model.config, [[hit]], cached, runner.kv_dtype)
        positions = torch.arange(cached, cached + new).unsqueeze(0)
        mask = torch.ones(1, cached + new, dtype=torch.long)
        step = runner.one_row
        start = time.perf_counter()
        if step is not None and step.applies(cache, mask, new):
            step(ids[:, cached:], positions, cache, slot)
        else:
            model(
                input_ids=ids[:, cached:],
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--formats", default="bf16,int4")
    parser.add_argument("--turns", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", default="1", help="decode steps of batches of these sizes")
    args = parser.parse_args()
    settings = Settings()
    work = Path(tempfile.mkdtemp(prefix="adapterserve-one-row-"))
    rows: list[tuple[str, str, float, float]] = []
    try:
        for fmt in args.formats.split(","):
            base = load_base_model(settings.base_model, settings.cache_dir, "cpu", "auto", fmt)
            peft = make_peft(base.path, "generate", 1, RANK, torch.float32, torch.device("cpu"))
            (folder,) = save_adapters(peft, work / fmt, 1)
            del peft
            ctx = RoutingContext()
            slots = DeviceSlots(wrap_linear_layers(base.model, ctx), 2, base.device, base.dtype)
            runner = Runner(base, ctx)
            step = runner.one_row
            assert isinstance(step, OneRowDecoder)
            adapter = load_lora(folder, base.spec, 64)
            version = held(folder.name, adapter)
            lora = slots.acquire(version, adapter, {version.uid})
            prompt = list(base.tokenizer(PROMPT)["input_ids"])
            cases: dict[str, tuple[str, list[int]]] = {}
            for n in (int(r) for r in args.rows.split(",")):
                label = "decode step" if n == 1 else f"decode step, {n} rows"
                cases[f"{label}, bare"] = ("decode", [BASE_SLOT] * n)
                cases[f"{label}, LoRA"] = ("decode", [lora] * n)
                if n > 1:
                    half = [lora, BASE_SLOT] * (n // 2) + [lora] * (n % 2)
                    cases[f"{label}, LoRA on half"] = ("decode", half)
            for name, s in (("bare", BASE_SLOT), ("LoRA", lora)):
                cases[f"prefill 9 after 31 cached, {name}"] = ("prefill", [s])
            times: dict[tuple[str, bool], list[float]] = {}
            for turn in range(args.turns):
                for on in (turn % 2 == 0, turn % 2 == 1):
                    runner.one_row = step if on else None
                    for name, (what, row_slots) in cases.items():
                        if what == "decode":
                            ms = _decode_ms(runner, row_slots, prompt, args.steps)
                        else:
                            ms = statistics.median(_prefill_ms(runner, row_slots[0], 31, 9) for _ in range(5))
                        times.setdefault((name, on), []).append(ms)
            for name in cases:
                fast = statistics.median(times[(name, True)])
                slow = statistics.median(times[(name, False)])
                rows.append((fmt, name, fast, slow))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(machine_line())
    print(f"default base, rank-{RANK} all-linear LoRA; medians of {args.turns} turns\n")
    print("| format | what | lean step | model forward | speed-up |")
    print("|---|---|---:|---:|---:|")
    for fmt, name, fast, slow in rows:
        print(f"| {fmt} | {name} | {fast:.1f} ms | {slow:.1f} ms | {slow / fast:.2f}x |")


if __name__ == "__main__":
    main()
