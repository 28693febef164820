"""A mixed batch through the multi-adapter layers equals each row run alone (and PEFT's logits)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.adapters.lora_format import load_lora
from app.engine.runner import Row, Runner
from app.engine.slots import DeviceSlots
from app.models.base_lm import BaseLM, load_base_model
from app.models.heads import head_nbytes
from app.models.multi_lora import BASE_SLOT, RoutingContext, wrap_linear_layers
from tests.conftest import CACHE_DIR
from tests.helpers.harness import last_logits, wrapped_model
from tests.helpers.peft_ref import GENERATE_PROMPTS, RefAdapter
from tests.helpers.versions import HeldVersion, held


@pytest.fixture(scope="module")
def wrapped(base_path: Path) -> tuple[BaseLM, Runner, DeviceSlots]:
    return wrapped_model(base_path, CACHE_DIR, 4)


def _info(base: BaseLM, ref: RefAdapter) -> HeldVersion:
    return held(ref.name, load_lora(ref.folder, base.spec, 64))


def test_mixed_generation_batch_equals_rows_alone_and_peft(
    wrapped: tuple[BaseLM, Runner, DeviceSlots], ref_adapters: dict[str, RefAdapter]
) -> None:
    base, runner, slots = wrapped
    refs = [ref_adapters[n] for n in ("gen-qv-r8", "gen-all-rslora", "gen-pattern")]
    infos = [_info(base, r) for r in refs]
    keep = {i.uid for i in infos}
    slot_ids = [slots.acquire(i, i.weights, keep) for i in infos]
    tok = base.tokenizer
    prompts = [GENERATE_PROMPTS[0], GENERATE_PROMPTS[1], GENERATE_PROMPTS[0], "Hello there, how"]
    rows = [(s, tok(p)["input_ids"]) for s, p in zip([*slot_ids, BASE_SLOT], prompts, strict=True)]
    mixed = last_logits(base, runner, rows)
    for i, row in enumerate(rows):
        alone = last_logits(base, runner, [row])[0]
        assert (mixed[i] - alone).abs().max().item() <= 1e-4, f"row {i}"
    for i, ref in enumerate(refs):  # and each adapter row equals PeftModel's logits
        expected = ref.last_logits[prompts[i]]
        assert (mixed[i] - expected).abs().max().item() <= 1e-4, ref.name
    # the base row is untouched by the adapters sharing its batch
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base.path).eval()
    with torch.inference_mode():
        base_logits = plain(input_ids=torch.tensor([rows[3][1]])).logits[0, -1]
    assert (mixed[3] - base_logits).abs().max().item() <= 1e-4


def test_mixed_classification_batch_equals_rows_alone(
    wrapped: tuple[BaseLM, Runner, DeviceSlots], ref_adapters: dict[str, RefAdapter]
) -> None:
    base, runner, slots = wrapped
    refs = [ref_adapters["cls-4"], ref_adapters["cls-pattern"]]
    infos = [_info(base, r) for r in refs]
    keep = {i.uid for i in infos}
    s1, s2 = (slots.acquire(i, i.weights, keep) for i in infos)
    tok = base.tokenizer
    texts = ["Stocks fell sharply today.", "A thrilling final match!", "New laptop released", "Short"]
    rows = [Row(s, tok(t)["input_ids"]) for s, t in zip([s1, s2, s1, s2], texts, strict=True)]
    mixed = runner.classify(rows, slots.heads)
    for i, row in enumerate(rows):
        alone = runner.classify([row], slots.heads)[0]
        assert max(abs(a - b) for a, b in zip(mixed[i], alone, strict=True)) <= 1e-5


def test_unload_frees_the_slot_and_zeroes_banks(
    wrapped: tuple[BaseLM, Runner, DeviceSlots], ref_adapters: dict[str, RefAdapter]
) -> None:
    base, _runner, slots = wrapped
    info = _info(base, ref_adapters["gen-qv-r8"])
    slot = slots.acquire(info, info.weights, set())
    layer = slots.layers["model.layers.0.self_attn.q_proj"]
    assert slot in layer.loras
    slots.unload(info.uid)
    assert info.uid not in slots and slot not in layer.loras
    assert info.uid not in slots.resident


def test_unload_and_compaction_free_device_memory_and_keep_results(
    wrapped: tuple[BaseLM, Runner, DeviceSlots], ref_adapters: dict[str, RefAdapter]
) -> None:
    """Unloading returns the bank memory (compaction moves the survivor down); outputs stay exact."""
    base, runner, slots = wrapped
    for uid in [i.uid for i in slots.lru_order()]:
        slots.unload(uid)
    slots.compact()
    assert slots.bank_bytes == 0 and slots.resident_bytes == 0
    infos = [_info(base, ref_adapters[n]) for n in ("gen-all-rslora", "gen-pattern", "cls-4")]
    placed = [slots.acquire(i, i.weights, set()) for i in infos]
    assert placed == [1, 2, 3]
    survivor = infos[2]
    assert survivor.weights is not None
    ids = base.tokenizer(GENERATE_PROMPTS[1])["input_ids"]
    before = runner.classify([Row(3, ids)], slots.heads)
    full = slots.bank_bytes
    for info in infos[:2]:
        slots.unload(info.uid)
    assert slots.compact() == {3: 1}
    assert slots.slot_of(survivor.uid) == 1
    # what is left is exactly the survivor's own weights (no padding, no room for more slots)
    expected = sum(a.nbytes + b.nbytes for a, b, _ in survivor.weights.weights.values()) + head_nbytes(
        survivor.weights.head
    )
    assert slots.bank_bytes == expected < full
    after = runner.classify([Row(1, ids)], slots.heads)
    assert torch.allclose(torch.tensor(after), torch.tensor(before), atol=1e-6, rtol=0)
    slots.unload(survivor.uid)
    slots.compact()
    assert slots.bank_bytes == 0


def test_device_byte_budget_evicts_lru_and_refuses_what_cannot_fit(
    base_path: Path, ref_adapters: dict[str, RefAdapter]
) -> None:
    from app.engine.slots import SlotsExhausted

    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32")
    ctx = RoutingContext()
    small = [_info(base, ref_adapters[n]) for n in ("gen-qv-r8", "gen-pattern")]
    big = _info(base, ref_adapters["gen-all-rslora"])
    budget = big.size_bytes + small[0].size_bytes + small[1].size_bytes - 1  # not all three
    slots = DeviceSlots(wrap_linear_layers(base.model, ctx), 8, base.device, base.dtype, byte_budget=budget)
    for info in small:
        slots.acquire(info, info.weights, set())  # type: ignore[arg-type]
    slots.acquire(big, big.weights, set())  # type: ignore[arg-type]
    assert [i.name for i in slots.lru_order()] == ["gen-pattern", "gen-all-rslora"]  # LRU one evicted
    assert slots.resident_bytes <= budget
    with pytest.raises(SlotsExhausted):  # everything resident is in use: nothing is evicted
        slots.acquire(small[0], small[0].weights, {i.uid for i in slots.lru_order()})  # type: ignore[arg-type]
    assert big.uid in slots
