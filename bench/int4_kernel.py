"""adapterserve's int4 CPU kernel against PyTorch's, in the engine: one process, two int4 bases.

    python -m bench.int4_kernel [--turns 7] [--steps 20] [--rows 1,16]

The default base at ``int4`` twice: on adapterserve's kernel (``app/kernels``: 4-bit weights,
8-bit activations, the tied head in 8-bit groups) and on PyTorch's (``_weight_int4pack_mm_for_cpu``
on bf16 activations, the head on ``_weight_int8pack_mm``: ``ADAPTERSERVE_NATIVE_KERNELS=false``),
each with a rank-16 all-linear LoRA adapter in a slot. In turns (this machine's speed drifts):
the engine's decode step of ``--rows`` rows (``bench/one_row.py``'s batches: bare and with the
adapter on every row), and the prefill of a 9-token chat line after 31 cached tokens (the chat
template's prefix), bare and with the adapter; medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from app import kernels
from app.adapters.lora_format import load_lora
from app.config import Settings
from app.engine.runner import Runner
from app.engine.slots import DeviceSlots
from app.models.base_lm import load_base_model, resolve_model_path
from app.models.multi_lora import BASE_SLOT, RoutingContext, wrap_linear_layers
from bench.common import PROMPT, machine_line, make_peft, save_adapters
from bench.one_row import RANK, _decode_ms, _prefill_ms
from tests.helpers.versions import held


def _runner(settings: Settings, native: bool, folder: Path) -> tuple[Runner, int]:
    kernels.configure(settings.cache_dir, native)
    base = load_base_model(settings.base_model, settings.cache_dir, "cpu", "auto", "int4")
    ctx = RoutingContext()
    slots = DeviceSlots(wrap_linear_layers(base.model, ctx), 2, base.device, base.dtype)
    adapter = load_lora(folder, base.spec, 64)
    version = held(folder.name, adapter)
    return Runner(base, ctx), slots.acquire(version, adapter, {version.uid})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", default="1,16", help="decode steps of batches of these sizes")
    args = parser.parse_args()
    settings = Settings()
    work = Path(tempfile.mkdtemp(prefix="adapterserve-int4-"))
    try:
        path, _ = resolve_model_path(settings.base_model, settings.cache_dir)
        peft = make_peft(path, "generate", 1, RANK, torch.float32, torch.device("cpu"))
        (folder,) = save_adapters(peft, work, 1)
        del peft
        runners = {
            name: _runner(settings, native, folder) for name, native in (("ours", True), ("torch", False))
        }
        kernels.configure(settings.cache_dir, True)
        kernel = kernels.q4()
        prompt = list(runners["ours"][0].base.tokenizer(PROMPT)["input_ids"])
        cases = {f"decode step, {n} row{'s' if n > 1 else ''}": n for n in map(int, args.rows.split(","))}
        times: dict[tuple[str, str, str], list[float]] = {}
        for _ in range(args.turns):
            for name, (runner, lora) in runners.items():
                for mode, slot in (("bare", BASE_SLOT), ("LoRA", lora)):
                    for case, rows in cases.items():
                        ms = _decode_ms(runner, [slot] * rows, prompt, args.steps)
                        times.setdefault((case, mode, name), []).append(ms)
                    ms = statistics.median(_prefill_ms(runner, slot, 31, 9) for _ in range(5))
                    times.setdefault(("prefill 9 after 31 cached", mode, name), []).append(ms)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(machine_line())
    isa = kernel.name if kernel is not None else "not built"
    print(
        f"default base at int4, rank-{RANK} all-linear LoRA; our kernel: {isa}; "
        f"medians of {args.turns} turns\n"
    )
    print("| what | adapterserve's kernel | PyTorch's kernels | speed-up |")
    print("|---|---:|---:|---:|")
    for what, mode, name in times:
        if name != "ours":
            continue
        ours = statistics.median(times[(what, mode, "ours")])
        theirs = statistics.median(times[(what, mode, "torch")])
        print(f"| {what}, {mode} | {ours:.1f} ms | {theirs:.1f} ms | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
