"""The native decode step (app/models/native_step.py) against the lean step it replaces, in the
engine, one process, in turns.

    python -m bench.native_step [--turns 5] [--steps 15] [--adapters 16] [--avx2 | --f32-attention] [--lora4]

The default base at ``int4`` on adapterserve's kernel, ``--adapters`` distinct rank-16 all-linear
LoRA adapters in slots. The engine's decode step (a ``GenerationBatch``, sampling included, after
~40 tokens; ``bench/one_row.py``'s batches) of one row bare and with an adapter, and of 16 rows:
bare, one adapter on every row, and a distinct adapter on each row; the prefill of one row's new
tokens after cached ones (a chat line after the template's 31 tokens, a conversation's turn after
~1,140; median of 3), bare and with an adapter; with the native step, and
with the one-row step's PyTorch operations around the same int4 matmuls
(``ADAPTERSERVE_NATIVE_STEP=false``). Every case runs once per turn both ways; medians.
``--avx2``: the native step on its AVX2 code paths instead of the lean step (what a CPU without
AVX-512 runs; timed on this one), on an AVX-512 machine. ``--f32-attention``: the native step with
its attention on bf16 dot products, over keys and values kept in bf16, against the same in float32
(a CPU with avx512_bf16). ``--lora4``: the adapters loaded a second time with 4-bit copies for the
native kernel (``ADAPTERSERVE_LORA_BITS=4``), their rows timed beside the 8-bit ones.
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
from app.models.base_lm import load_base_model
from app.models.multi_lora import BASE_SLOT, RoutingContext, wrap_linear_layers
from bench.common import PROMPT, machine_line, make_peft, save_adapters
from bench.one_row import RANK, _decode_ms, _prefill_ms
from tests.helpers.versions import held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--avx2", action="store_true", help="the native step's AVX2 paths, not the lean step")
    parser.add_argument("--f32-attention", action="store_true", help="bf16 attention against float32's")
    parser.add_argument("--lora4", action="store_true", help="the adapters also in 4 bits (LORA_BITS=4)")
    args = parser.parse_args()
    settings = Settings()
    kernels.configure(settings.cache_dir, True)
    kernel = kernels.q4()
    assert kernel is not None, "the int4 kernel did not build (a C++ compiler: make compiler)"
    base = load_base_model(settings.base_model, settings.cache_dir, "cpu", "auto", "int4")
    ctx = RoutingContext()
    copies = 2 if args.lora4 else 1
    layers = wrap_linear_layers(base.model, ctx)
    slots = DeviceSlots(layers, copies * args.adapters + 1, base.device, base.dtype)
    runner = Runner(base, ctx)
    assert runner.one_row is not None and runner.one_row.native is not None
    native = runner.one_row.native
    vnni, avx2 = native.kernel, kernels.Q4(native.kernel.lib, 1)
    if args.avx2 and vnni.isa == 1:
        raise SystemExit("this CPU has no AVX-512 VNNI: the native step already runs its AVX2 paths")
    if args.f32_attention and not vnni.bf16:
        raise SystemExit("this CPU has no avx512_bf16: the native step's attention is float32 already")
    f32 = kernels.Q4(vnni.lib, vnni.isa, bf16=False)
    work = Path(tempfile.mkdtemp(prefix="adapterserve-native-step-"))
    try:
        peft = make_peft(base.path, "generate", args.adapters, RANK, torch.float32, torch.device("cpu"))
        folders = save_adapters(peft, work, args.adapters)
        del peft
        ids: list[int] = []
        ids4: list[int] = []
        for bits, into in ((8, ids), (4, ids4))[:copies]:
            ctx.lora_bits = bits  # (the slots' copies for the native kernel are made as they load)
            for folder in folders:
                adapter = load_lora(folder, base.spec, 64)
                version = held(f"{folder.name}-{bits}", adapter)
                into.append(slots.acquire(version, adapter, {version.uid}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prompt = list(base.tokenizer(PROMPT)["input_ids"])
    cases = {
        "1 row, bare": [BASE_SLOT],
        "1 row, LoRA": ids[:1],
        "16 rows, bare": [BASE_SLOT] * 16,
        "16 rows, one LoRA adapter": ids[:1] * 16,
        f"16 rows, {min(16, len(ids))} distinct LoRA adapters": (ids * 16)[:16],
    }
    if ids4:
        cases |= {
            "1 row, LoRA in 4 bits": ids4[:1],
            "16 rows, one LoRA adapter in 4 bits": ids4[:1] * 16,
            f"16 rows, {min(16, len(ids4))} distinct LoRA adapters in 4 bits": (ids4 * 16)[:16],
        }
    prefills = {  # (cached tokens, new tokens): a chat line after the template, a conversation's turn
        f"prefill {new} after {cached} cached, {mode}": (slot, cached, new)
        for cached, new in ((31, 9), (1140, 20))
        for mode, slot in (("bare", BASE_SLOT), ("LoRA", ids[0]))
    }
    times: dict[tuple[str, bool], list[float]] = {}
    for turn in range(args.turns):
        for on in (turn % 2 == 0, turn % 2 == 1):
            if args.avx2 or args.f32_attention:
                native.kernel = vnni if on else avx2 if args.avx2 else f32
                # (float32 attention reads float32 keys)
                runner.kv_dtype = torch.bfloat16 if native.bf16_cache else None
            else:
                runner.one_row.native = native if on else None
            for name, row_slots in cases.items():
                times.setdefault((name, on), []).append(_decode_ms(runner, row_slots, prompt, args.steps))
            for name, (slot, cached, new) in prefills.items():
                ms = statistics.median(_prefill_ms(runner, slot, cached, new) for _ in range(3))
                times.setdefault((name, on), []).append(ms)
    attention = "bf16 dot products" if vnni.bf16 else "float32"
    print(machine_line())
    print(
        f"default base at int4 on adapterserve's kernel ({kernel.name}), rank-{RANK} all-linear LoRA; "
        f"attention on {attention}; the engine's decode step; medians of {args.turns} turns\n"
    )
    second = "native step, AVX2 paths" if args.avx2 else "lean step"
    second = "native step, float32 attention" if args.f32_attention else second
    print(f"| what | native step | {second} | speed-up |")
    print("|---|---:|---:|---:|")
    for name in [*cases, *prefills]:
        fast, slow = statistics.median(times[(name, True)]), statistics.median(times[(name, False)])
        print(f"| {name} | {fast:.2f} ms | {slow:.2f} ms | {slow / fast:.2f}x |")


if __name__ == "__main__":
    main()
