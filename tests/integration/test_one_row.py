"""The lean step (app/models/one_row.py) computes what the model's forward computes: one row's
prefill and decode steps, and decode steps of several left-padded rows of one or several adapters.

Tiny random bases of the families it serves, in each weight format, with LoRA adapters on every
layer and on some layers of a group (the direct kernel path) and a DoRA adapter (the general,
routed module path): a prompt is prefilled,
then the same decode steps run through the model's forward on one cache and through the one-row
step on another; the logits and the caches' keys and values agree at every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig

from app import kernels
from app.adapters.kinds import load_adapter
from app.engine import kv_cache
from app.engine.runner import Runner
from app.engine.slots import DeviceSlots
from app.models.base_lm import load_base_model
from app.models.multi_lora import BASE_SLOT, RoutingContext, wrap_linear_layers
from app.models.native_step import NativeStep
from app.models.one_row import FAMILIES, OneRowDecoder
from tests.conftest import CACHE_DIR
from tests.helpers.families import tiny_base
from tests.helpers.peft_ref import make_adapter
from tests.helpers.versions import held

FORMATS = ("none", "bf16", "int4")
STEPS = 6


@pytest.fixture
def native_steps(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The slots of every decode step run on the native kernels (app/models/native_step.py)."""
    calls: list[int | None] = []
    call = NativeStep.__call__

    def counted(self: NativeStep, *args: Any) -> torch.Tensor:
        calls.append(args[3])
        return call(self, *args)

    monkeypatch.setattr(NativeStep, "__call__", counted)
    return calls


def _check_native(
    step: OneRowDecoder, family: str, fmt: str, calls: list[int | None], general: set[int]
) -> bool:
    """Whether the base decoded on the native kernels: an int4 base of a family without sliding
    windows does, except for rows whose adapter needs its modules (``general``: DoRA's slot)."""
    if fmt != "int4" or family == "mistral":  # (the tiny mistral's window: the lean step)
        assert fmt == "int4" or step.native is None
        assert not calls
        return False
    assert step.native is not None and calls
    assert general.isdisjoint(c for c in calls if c is not None)
    return True


@pytest.fixture(scope="module")
def tiny(base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """Each family's tiny base with a LoRA and a DoRA adapter on every linear layer."""
    made = {}
    for family in FAMILIES:
        base = tiny_base(family, base_path, tmp_path_factory.mktemp(f"one-row-{family}"))
        if family == "mistral":  # a window the steps go past
            config = AutoConfig.from_pretrained(base)
            config.sliding_window = 4
            config.save_pretrained(base)
        out = tmp_path_factory.mktemp(f"one-row-{family}-adapters")
        kinds: list[tuple[str, int, dict[str, Any]]] = [
            ("lora", 1, {"target_modules": "all-linear"}),
            ("lora-qv", 3, {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 8}),  # parts of groups
            ("dora", 2, {"target_modules": "all-linear", "use_dora": True}),
        ]
        adapters = [
            make_adapter(base, out, name, "generate", seed, **({"r": 4} | extra)).folder
            for name, seed, extra in kinds
        ]
        made[family] = (base, adapters)
    return made


def _served(
    tiny: dict[str, tuple[Path, list[Path]]], family: str, fmt: str
) -> tuple[Any, Runner, OneRowDecoder, list[int]]:
    """The family's tiny base in ``fmt`` wrapped as the engine wraps it, its runner and lean step,
    and the slots of its adapters (LoRA, LoRA on parts of groups, DoRA). Where the native step
    reads LoRA weights in 8 bits, the layers' float32 weights are set to what those stand for:
    both paths then compute with the same weights (their rounding against PEFT is the int4
    parity test's, tests/api/test_quantized_parity.py)."""
    path, adapters = tiny[family]
    base = load_base_model(str(path), CACHE_DIR, "cpu", "float32", fmt)  # type: ignore[arg-type]
    ctx = RoutingContext()
    layers = wrap_linear_layers(base.model, ctx)
    slots = DeviceSlots(layers, 4, base.device, base.dtype)
    runner = Runner(base, ctx)
    step = runner.one_row
    assert step is not None
    versions = [held(folder.name, load_adapter(folder, base.spec, 64)) for folder in adapters]
    keep = {v.uid for v in versions}
    acquired = [slots.acquire(v, v.weights, keep) for v in versions]
    for layer in layers.values():
        for slot, weights in layer.loras8.items():
            a_t, b_t, _ = layer.loras[slot]
            exact_a, exact_b, _ = kernels.dequantize_lora(weights)
            with torch.inference_mode(False), torch.no_grad():
                a_t.copy_(exact_a)
                b_t.copy_(exact_b)
    return base, runner, step, acquired


def _assert_same(
    got: torch.Tensor, want: torch.Tensor, caches: list[Any], fmt: str, where: object, lora: bool = False
) -> None:
    """The lean step's logits and every layer's keys (``caches[1]``) as the model's (``caches[0]``)."""
    tolerance = 1e-4 if fmt == "none" else 2e-2  # bf16 rounding: each path rounds the same inputs
    if fmt == "int4" and lora:  # the native step's LoRA deltas from the base's 8-bit rows (~1 % of
        tolerance = 0.15  # a delta; the tiny bases' random adapters are large, and it adds up over steps)
    bound = tolerance * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound, where
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert a.keys is not None and b.keys is not None
        torch.testing.assert_close(a.keys, b.keys, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_one_row_step_equals_the_model_forward(
    tiny: dict[str, tuple[Path, list[Path]]], family: str, fmt: str, native_steps: list[int | None]
) -> None:
    base, runner, step, adapter_slots = _served(tiny, family, fmt)
    slot_ids = [BASE_SLOT, *adapter_slots]
    prompt = base.tokenizer("The weather today is")["input_ids"]
    for slot in slot_ids:
        caches = [kv_cache.new_cache(base.model.config) for _ in range(2)]
        token = torch.tensor([prompt[:3]])  # a prefill in two chunks, then decode steps
        with runner.routed([slot]), torch.inference_mode():
            for i, width in enumerate([3, len(prompt) - 3] + [1] * STEPS):
                start = 0 if i == 0 else 3 if i == 1 else len(prompt) + i - 2
                position = torch.arange(start, start + width).unsqueeze(0)
                mask = torch.ones(1, start + width, dtype=torch.long)
                if i == 1:
                    token = torch.tensor([prompt[3:]])
                assert step.applies(caches[1], mask, width) == (width == 1 or family != "mistral")
                inputs = {"input_ids": token, "position_ids": position, "attention_mask": mask}
                want = base.model(**inputs, cache=caches[0], use_cache=True).logits[:, -1]
                if width == 1 or family != "mistral":  # (several tokens over a sliding window: no)
                    got = step(token, position, caches[1], slot)
                else:
                    got = base.model(**inputs, cache=caches[1], use_cache=True).logits[:, -1]
                _assert_same(got, want, caches, fmt, (family, fmt, slot, i), slot != BASE_SLOT)
                token = want.argmax(-1, keepdim=True)
    if _check_native(step, family, fmt, native_steps, {slot_ids[-1]}):
        assert set(native_steps) == set(slot_ids[:-1])  # bare, LoRA, LoRA on parts of groups


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_of_padded_rows_equal_the_model_forward(
    tiny: dict[str, tuple[Path, list[Path]]], family: str, fmt: str, native_steps: list[int | None]
) -> None:
    """Several rows of different prompt lengths (left padding), prefilled together by the model,
    then decode steps of one token per row: all rows on one adapter (the direct kernels), and each
    row on its own (LoRA adapters and the bare base: the kernels and the adapters side by side for
    a whole group; with a DoRA row: the routed modules)."""
    base, runner, step, (lora, lora_qv, dora) = _served(tiny, family, fmt)
    prompts = ["The weather today is", "Hi", "A long day at the office ends with"]
    ids, mask = runner.pad([base.tokenizer(p)["input_ids"] for p in prompts], left=True)
    for routed in (
        [lora, lora, lora],
        [BASE_SLOT, lora_qv, dora],
        [lora, BASE_SLOT, lora],
        [lora_qv, lora, BASE_SLOT],
    ):
        caches = [kv_cache.new_cache(base.model.config) for _ in range(2)]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        seen = mask
        token = ids
        with runner.routed(routed), torch.inference_mode():
            for cache in caches:  # the prompts: the model's forward on both caches
                out = base.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for i in range(STEPS):
                positions = positions[:, -1:] + 1
                seen = torch.cat([seen, seen.new_ones(len(prompts), 1)], dim=1)
                assert step.applies(caches[1], seen, 1)
                inputs = {"input_ids": token, "position_ids": positions, "attention_mask": seen}
                want = base.model(**inputs, cache=caches[0], use_cache=True).logits[:, -1]
                single = routed[0] if len(set(routed)) == 1 else None
                got = step(token, positions, caches[1], single, seen)
                _assert_same(got, want, caches, fmt, (family, fmt, routed, i), set(routed) != {BASE_SLOT})
                token = want.argmax(-1, keepdim=True)
    # natively: one adapter on every row, and mixed rows without DoRA's
    if _check_native(step, family, fmt, native_steps, {dora}):
        assert lora in native_steps and native_steps.count(None) == 2 * STEPS


def test_it_applies_to_one_token_a_row_or_one_unpadded_row_of_the_families_it_knows(
    tiny: dict[str, tuple[Path, list[Path]]], base_path: Path, tmp_path: Path
) -> None:
    path, _ = tiny["llama"]
    base = load_base_model(str(path), CACHE_DIR, "cpu", "float32")
    step = OneRowDecoder.of(base.model)
    assert step is not None
    cache = kv_cache.new_cache(base.model.config)
    with torch.inference_mode():
        base.model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, use_cache=True)
    assert step.applies(cache, torch.ones(2, 4, dtype=torch.long), 1)  # two rows, a token each
    assert step.applies(cache, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), 1)  # padding
    assert not step.applies(cache, torch.ones(2, 5, dtype=torch.long), 2)  # two rows, two tokens
    assert not step.applies(cache, torch.ones(2, 5, dtype=torch.long), 1)  # a mask not of this cache
    one = kv_cache.new_cache(base.model.config)
    with torch.inference_mode():
        base.model(input_ids=torch.tensor([[1, 2, 3]]), cache=one, use_cache=True)
    assert step.applies(one, torch.ones(1, 5, dtype=torch.long), 2)
    assert not step.applies(one, torch.tensor([[0, 1, 1, 1, 1]]), 2)  # several tokens after padding
    for family in ("gpt2", "phi3", "gemma3_text"):  # other layouts: the model's forward
        other = tiny_base(family, base_path, tmp_path / family)
        config = AutoConfig.from_pretrained(other)
        assert config.model_type == family
        assert OneRowDecoder.of(load_base_model(str(other), CACHE_DIR, "cpu", "float32").model) is None
