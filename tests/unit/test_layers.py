"""The multi-adapter layers and their slot banks with toy dimensions and random weights (no model):
a mixed batch equals each row computed alone from the adapter's own tensors, whatever the slots,
ranks and kinds sharing the batch (the invariant of vLLM's tests/lora/test_layers.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.adapters.bottleneck_format import BottleneckAdapter
from app.adapters.lora_format import LoraAdapter, host_layout
from app.adapters.version import AdapterVersion
from app.engine.slots import Admission, DeviceSlots, SlotsExhausted
from app.models import multi_lora
from app.models.multi_lora import BASE_SLOT, Routing, RoutingContext, wrap_linear_layers

IN, HIDDEN, OUT = 10, 12, 10  # l0: IN -> HIDDEN, l1: HIDDEN -> OUT


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l0 = nn.Linear(IN, HIDDEN)
        self.l1 = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(torch.tanh(self.l0(x)))


def lora(seed: int, rank: int, modules: tuple[str, ...] = ("l0", "l1"), scale: float = 0.5) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"l0": (HIDDEN, IN), "l1": (OUT, HIDDEN)}
    weights = {
        m: (
            torch.randn(rank, shapes[m][1], generator=gen),
            torch.randn(shapes[m][0], rank, generator=gen),
            scale,
        )
        for m in modules
    }
    return LoraAdapter(
        task="generate",
        rank=rank,
        alpha=rank * scale,
        target_modules=list(modules),
        labels=[],
        weights=weights,
    )


def bottleneck(seed: int, size: int, activation: str = "relu") -> BottleneckAdapter:
    gen = torch.Generator().manual_seed(seed)
    block = (
        torch.randn(size, OUT, generator=gen),
        torch.randn(size, generator=gen),
        torch.randn(OUT, size, generator=gen),
        torch.randn(OUT, generator=gen),
    )
    return BottleneckAdapter(
        task="generate",
        rank=size,
        alpha=0.5,
        target_modules=["ffn"],
        labels=[],
        activation=activation,
        blocks={"l1": block},  # type: ignore[dict-item]
    )


def reference(model: Toy, x: torch.Tensor, adapter: LoraAdapter | BottleneckAdapter | None) -> torch.Tensor:
    """One row's output computed from the base and the adapter's own tensors."""

    def layer(name: str, inp: torch.Tensor) -> torch.Tensor:
        lin = getattr(model, name).base
        out = nn.functional.linear(inp, lin.weight, lin.bias)
        if isinstance(adapter, LoraAdapter) and name in adapter.weights:
            a, b, scale = adapter.weights[name]
            out = out + scale * (inp @ a.T @ b.T)
        if isinstance(adapter, BottleneckAdapter) and name in adapter.blocks:
            down, down_b, up, up_b = adapter.blocks[name]
            act = {"relu": torch.relu, "tanh": torch.tanh}[adapter.activation]
            out = out + adapter.alpha * (act(out @ down.T + down_b) @ up.T + up_b)
        return out

    return layer("l1", torch.tanh(layer("l0", x)))


@pytest.fixture
def toy() -> tuple[Toy, RoutingContext, DeviceSlots]:
    torch.manual_seed(0)
    model = Toy().eval()
    ctx = RoutingContext()
    slots = DeviceSlots(wrap_linear_layers(model, ctx), 8, torch.device("cpu"), torch.float32)
    return model, ctx, slots


def run(
    model: Toy, ctx: RoutingContext, x: torch.Tensor, slots: list[int], key: int | None = None
) -> torch.Tensor:
    ctx.routing = Routing.build(slots, x.device, key)
    try:
        with torch.inference_mode():
            return model(x)
    finally:
        ctx.routing = None


def version(name: str, adapter: LoraAdapter | BottleneckAdapter) -> AdapterVersion:
    return AdapterVersion.from_adapter(name, adapter)


@pytest.mark.parametrize("n_adapters", [1, 3, 6])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("side_by_side", [True, False], ids=["concatenated", "per-row"])
@pytest.mark.parametrize("key", [None, 1], ids=["prefill", "decode"])
def test_mixed_rows_equal_each_row_alone(
    toy: tuple[Toy, RoutingContext, DeviceSlots],
    n_adapters: int,
    tokens: int,
    side_by_side: bool,
    key: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multi_lora, "CONCAT_MAX_RANK", 64 if side_by_side else 0)
    model, ctx, slots = toy
    adapters: list[LoraAdapter | BottleneckAdapter] = [
        lora(i, rank=2 + 3 * i, modules=("l0", "l1") if i % 2 == 0 else ("l1",))
        if i % 3 != 2
        else bottleneck(i, 4)
        for i in range(n_adapters)
    ]
    ids = [slots.acquire(version(f"a{i}", a), a, set()) for i, a in enumerate(adapters)]
    rows = [BASE_SLOT, *ids, *reversed(ids)]
    by_slot = {s: a for s, a in zip(ids, adapters, strict=True)}
    x = torch.randn(len(rows), tokens, IN)
    mixed = run(model, ctx, x, rows, key)
    for i, slot in enumerate(rows):
        expected = reference(model, x[i : i + 1], by_slot.get(slot))
        torch.testing.assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=1e-5)
        alone = run(model, ctx, x[i : i + 1], [slot])  # the single-slot fast path
        torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side_by_side", [True, False], ids=["concatenated", "per-row"])
def test_gathered_weights_are_reused_only_for_the_same_composition(
    toy: tuple[Toy, RoutingContext, DeviceSlots], side_by_side: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multi_lora, "CONCAT_MAX_RANK", 64 if side_by_side else 0)
    model, ctx, slots = toy
    a, b = lora(1, 4), lora(2, 8)
    sa, sb = slots.acquire(version("a", a), a, set()), slots.acquire(version("b", b), b, set())
    x = torch.randn(2, 1, IN)
    first = run(model, ctx, x, [sa, sb], key=7)
    again = run(model, ctx, x, [sa, sb], key=7)  # decode step: gathered per-row weights reused
    swapped = run(model, ctx, x, [sb, sa], key=8)  # a new composition gathers anew
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(swapped[0:1], reference(model, x[0:1], b), atol=1e-5, rtol=1e-5)


def test_smaller_ranks_are_zero_padded_and_a_slot_takes_the_next_adapters_rank(
    toy: tuple[Toy, RoutingContext, DeviceSlots], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multi_lora, "CONCAT_MAX_RANK", 0)  # rows gather their own weights
    model, ctx, slots = toy
    big, small, other = lora(1, 8), lora(2, 2), lora(3, 8)
    v_big = version("big", big)
    slot = slots.acquire(v_big, big, set())
    slots.unload(v_big.uid)
    assert slots.acquire(version("small", small), small, set()) == slot  # the same slot, rank 2
    assert slots.layers["l0"].loras[slot][0].shape[1] == 2
    s_other = slots.acquire(version("other", other), other, set())
    x = torch.randn(2, 3, IN)
    out = run(model, ctx, x, [slot, s_other], key=3)  # rank 2 padded to 8 beside rank 8
    torch.testing.assert_close(out[0:1], reference(model, x[0:1], small), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:2], reference(model, x[1:2], other), atol=1e-5, rtol=1e-5)


def test_a_cpu_slot_holds_the_host_tensors_themselves(toy: tuple[Toy, RoutingContext, DeviceSlots]) -> None:
    """An adapter read from its files is held once: the slot computes with the host tier's tensors
    (their transposes), where a copy would hold its weights twice."""
    model, ctx, slots = toy
    raw = lora(1, 4)
    adapter = LoraAdapter(
        task="generate",
        rank=4,
        alpha=2.0,
        target_modules=["l0", "l1"],
        labels=[],
        weights={m: (*host_layout(a, b), s) for m, (a, b, s) in raw.weights.items()},
    )
    slot = slots.acquire(version("a", adapter), adapter, set())
    for module, (a, b, _) in adapter.weights.items():
        a_t, b_t, _ = slots.layers[module].loras[slot]
        assert a_t.data_ptr() == a.data_ptr() and b_t.data_ptr() == b.data_ptr()
    x = torch.randn(1, 3, IN)
    torch.testing.assert_close(run(model, ctx, x, [slot]), reference(model, x, raw), atol=1e-5, rtol=1e-5)
    # a half-precision adapter is converted into the layer's dtype: a copy of its own
    half = LoraAdapter(
        task="generate",
        rank=4,
        alpha=2.0,
        target_modules=["l0"],
        labels=[],
        weights={"l0": (*host_layout(*(t.half() for t in raw.weights["l0"][:2])), 0.5)},
    )
    s_half = slots.acquire(version("h", half), half, set())
    a_t, _, _ = slots.layers["l0"].loras[s_half]
    assert a_t.dtype == torch.float32 and a_t.data_ptr() != half.weights["l0"][0].data_ptr()


def test_compaction_moves_survivors_down(toy: tuple[Toy, RoutingContext, DeviceSlots]) -> None:
    model, ctx, slots = toy
    adapters = [lora(i, 4) if i % 2 else bottleneck(i, 4) for i in range(7)]
    versions = [version(f"a{i}", a) for i, a in enumerate(adapters)]
    placed = [slots.acquire(v, a, set()) for v, a in zip(versions, adapters, strict=True)]
    assert placed == list(range(1, 8))
    bank = slots.layers["l1"].bottleneck
    assert bank is not None and bank.down.shape[0] >= 8  # room for slots 0..7
    for v in versions[:5]:
        slots.unload(v.uid)
    moves = slots.compact()
    assert moves == {7: 1, 6: 2}
    assert {slots.slot_of(v.uid) for v in versions[5:]} == {1, 2}
    assert slots.layers["l1"].bottleneck.down.shape[0] == 4  # type: ignore[union-attr]  # shrunk to one chunk
    assert set(slots.layers["l1"].loras) == {slots.slot_of(versions[5].uid)}
    x = torch.randn(2, 1, IN)
    out = run(model, ctx, x, [slots.slot_of(versions[5].uid), slots.slot_of(versions[6].uid)])  # type: ignore[list-item]
    torch.testing.assert_close(out[0:1], reference(model, x[0:1], adapters[5]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:2], reference(model, x[1:2], adapters[6]), atol=1e-5, rtol=1e-5)
    assert slots.resident == frozenset(v.uid for v in versions[5:])


def test_eviction_is_lru_and_spares_kept_pinned_and_wanted(
    toy: tuple[Toy, RoutingContext, DeviceSlots],
) -> None:
    _, _, full = toy
    slots = DeviceSlots(full.layers, 3, torch.device("cpu"), torch.float32)
    adapters = [lora(i, 2) for i in range(5)]
    vs = [version(f"a{i}", a) for i, a in enumerate(adapters)]
    for v, a in zip(vs[:3], adapters[:3], strict=True):
        slots.acquire(v, a, set())
    slots.pinned = frozenset({"a0"})
    # a1 is in use (keep), a0 pinned: a2 is the only victim although a1 is older
    slots.acquire(vs[3], adapters[3], keep={vs[1].uid})
    assert [v.name for v in slots.lru_order()] == ["a0", "a1", "a3"]
    with pytest.raises(SlotsExhausted):
        slots.acquire(vs[4], adapters[4], keep={vs[1].uid, vs[3].uid})
    assert [v.name for v in slots.lru_order()] == ["a0", "a1", "a3"]  # nothing evicted for nothing
    # an admission prefers evicting what no queued work wants
    admission = Admission(slots, keep=set(), wanted=lambda: frozenset({vs[1].uid}))
    assert admission.admit(vs[4], adapters[4]) is not None
    assert [v.name for v in slots.lru_order()] == ["a0", "a1", "a4"]
    assert vs[4].uid in admission.keep
