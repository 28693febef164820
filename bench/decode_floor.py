"""Why mixed-adapter decoding costs what it costs here: decode step times and the bandwidth floor.

    python -m bench.decode_floor [--rows 16] [--rank 16]

Measures, on the engine's own generation batch, one decode step with (a) no adapter, (b) one
adapter for every row and (c) a distinct adapter per row (in turns; medians); then the machine's
read bandwidth and the bytes of adapter weights one mixed step must read, which bound (c) from
below.
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
from app.engine.generation import GenerationBatch
from app.engine.runner import Runner
from app.engine.slots import DeviceSlots
from app.engine.types import GenerateWork, Generation, SamplingParams
from app.models.base_lm import load_base_model
from app.models.multi_lora import BASE_SLOT, RoutingContext, wrap_linear_layers
from bench.common import PROMPT, make_peft, save_adapters
from tests.helpers.versions import held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="decode steps per timed round")
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    base = load_base_model("", Settings().cache_dir, "cpu", "float32")
    tmp = Path(tempfile.mkdtemp(prefix="adapterserve-floor-"))
    peft = make_peft(base.path, "generate", args.rows, args.rank, torch.float32, torch.device("cpu"))
    folders = save_adapters(peft, tmp / "gen", args.rows)
    del peft
    ctx = RoutingContext()
    runner = Runner(base, ctx)
    slots = DeviceSlots(wrap_linear_layers(base.model, ctx), args.rows, base.device, base.dtype)
    adapters = [load_lora(f, base.spec, 64) for f in folders]
    infos = [held(f.name, a) for f, a in zip(folders, adapters, strict=True)]
    slot_ids = [slots.acquire(i, a, {x.uid for x in infos}) for i, a in zip(infos, adapters, strict=True)]
    shutil.rmtree(tmp, ignore_errors=True)  # the weights are in the slots now
    tok = base.tokenizer
    prompts = [tok(f"{i} {PROMPT}")["input_ids"] for i in range(args.rows)]

    def decoder(slot_of: list[int]) -> GenerationBatch:
        params = SamplingParams(max_new_tokens=args.steps * args.turns + 10, ignore_eos=True)
        works = [(GenerateWork(Generation(p, params)), [s]) for p, s in zip(prompts, slot_of, strict=True)]
        batch = GenerationBatch.start(runner, works, decode)
        while batch.prefill_chunk(4096) is None:
            pass
        for _ in range(3):
            batch.step()
        return batch

    decode = lambda ids: str(tok.decode(ids))  # noqa: E731
    configs = {
        "no adapter": decoder([BASE_SLOT] * args.rows),
        "one adapter for all rows": decoder([slot_ids[0]] * args.rows),
        f"{args.rows} distinct adapters": decoder(slot_ids),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.turns):  # in turns: the machine's drift weighs on all alike
        for name, batch in configs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                batch.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    base_ms, single_ms, mixed_ms = (statistics.median(t) for t in times.values())
    adapter_bytes = sum(a.numel() * 4 + b.numel() * 4 for a, b, _ in adapters[0].weights.values())
    probe = torch.randn(adapter_bytes * args.rows // 4)
    probe.sum()
    start = time.perf_counter()
    for _ in range(5):
        probe.sum()
    read_s = (time.perf_counter() - start) / 5
    floor_ms = read_s * 1000
    print(
        f"\n{args.rows} rows, rank-{args.rank} all-linear adapters, fp32 on {torch.get_num_threads()} threads"
    )
    print("| decode step | ms | vs no adapter |\n|---|---:|---:|")
    for name, ms in (
        ("no adapter", base_ms),
        ("one adapter for all rows", single_ms),
        (f"{args.rows} distinct adapters", mixed_ms),
    ):
        print(f"| {name} | {ms:.1f} | {base_ms / ms:.2f}x |")
    mb = adapter_bytes * args.rows / 1e6
    print(
        f"\nadapter weights read per mixed step: {mb:.0f} MB; read bandwidth {mb / 1000 / read_s:.1f} GB/s "
        f"-> at least {floor_ms:.1f} ms per step; ceiling {base_ms / (base_ms + floor_ms):.2f}x of no adapter"
    )


if __name__ == "__main__":
    main()
