"""The two LoRA paths of a mixed batch, timed on one layer of the default base's shape.

    python -m bench.lora_paths [--rows 33] [--rank 16] [--turns 7]

A ``MultiLoraLinear`` over ``nn.Linear(576, 1536)`` (a SmolLM2-135M MLP projection) with k distinct
rank-``--rank`` adapters spread over ``--rows`` decode rows (one token each), timed in turns: the
adapters side by side as one LoRA of their ranks (two GEMMs and a row mask), and each row's own
gathered weights (batched matmuls), both with their weights kept across steps as in decode; the
single-adapter path and the base alone for scale. Prints microseconds per call (median over turns)
and which path the layer takes (``CONCAT_MAX_RANK``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from app.adapters.lora_format import LoraAdapter
from app.adapters.version import AdapterVersion
from app.engine.slots import DeviceSlots
from app.models import multi_lora
from app.models.multi_lora import Routing, RoutingContext, wrap_linear_layers
from bench.common import machine_line

IN, OUT = 576, 1536


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapter(seed: int, rank: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {"proj": (torch.randn(rank, IN, generator=gen), torch.randn(OUT, rank, generator=gen), 0.5)}
    return LoraAdapter(
        task="generate", rank=rank, alpha=rank * 0.5, target_modules=["proj"], labels=[], weights=weights
    )


def timed(fn: Callable[[], object], calls: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=33)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--turns", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = One().eval()
    ctx = RoutingContext()
    slots = DeviceSlots(wrap_linear_layers(model, ctx), 32, torch.device("cpu"), torch.float32)
    ids = [
        slots.acquire(
            AdapterVersion.from_adapter(f"a{i}", adapter(i, args.rank)), adapter(i, args.rank), set()
        )
        for i in range(16)
    ]
    x = torch.randn(args.rows, 1, IN)
    layer = model.proj
    assert isinstance(layer, multi_lora.MultiLoraLinear)
    threshold = multi_lora.CONCAT_MAX_RANK
    results: dict[int, dict[str, list[float]]] = {}
    for turn in range(args.turns):
        for k in (1, 2, 4, 8, 16):
            row_slots = [ids[i % k] for i in range(args.rows)]
            runs = results.setdefault(k, {})
            for path, limit in (("side by side", 10**9), ("per row", 0)):
                if k == 1 and path == "per row":
                    continue
                multi_lora.CONCAT_MAX_RANK = limit
                ctx.routing = Routing.build(row_slots, x.device, reuse_key=1000 * turn + k + limit % 7)
                with torch.inference_mode():
                    runs.setdefault(path, []).append(timed(lambda: layer(x)))
        ctx.routing = None
        with torch.inference_mode():
            results.setdefault(0, {}).setdefault("base", []).append(timed(lambda: layer.base(x)))
    print(machine_line())
    print(f"{args.rows} rows × 1 token, rank {args.rank}, µs per call, median of {args.turns} turns\n")
    multi_lora.CONCAT_MAX_RANK = threshold
    print(f"| distinct adapters | side by side | per row | taken (CONCAT_MAX_RANK = {threshold}) |")
    print("|---:|---:|---:|---|")
    base = statistics.median(results[0]["base"])
    for k in (1, 2, 4, 8, 16):
        side = statistics.median(results[k]["side by side"])
        if k == 1:
            print(f"| 1 | {side:.0f} (one adapter's own path) | – | single |")
            continue
        per_row = statistics.median(results[k]["per row"])
        taken = "side by side" if k * args.rank <= threshold else "per row"
        print(f"| {k} | {side:.0f} | {per_row:.0f} | {taken} |")
    print(f"\nthe base GEMM alone: {base:.0f} µs")


if __name__ == "__main__":
    main()
