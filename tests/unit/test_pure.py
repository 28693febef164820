"""Unit tests of pure logic: patterns, sampling helpers, pooling, routing, error mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.adapters.lora_format import check_config, pattern_key
from app.engine.runner import last_non_pad_index
from app.engine.sampling import BLOCK, find_stop, greedy_tokens, make_generator, select_tokens, top_p_filter
from app.errors import (
    AdapterNotFound,
    DeadlineExceeded,
    InvalidAdapter,
    InvalidRequest,
    QueueFull,
    TaskMismatch,
    UploadTooLarge,
    status_of,
    to_response,
)
from app.models.base_lm import BaseSpec
from app.models.multi_lora import Routing
from app.models.sources import model_id_for


@pytest.mark.parametrize(
    ("patterns", "module", "expected"),
    [
        ({"q_proj": 4}, "model.layers.0.self_attn.q_proj", "q_proj"),
        ({"q_proj": 4}, "model.layers.0.self_attn.k_proj", None),
        ({"layers.3.mlp.down_proj": 12}, "model.layers.3.mlp.down_proj", "layers.3.mlp.down_proj"),
        ({"layers.3.mlp.down_proj": 12}, "model.layers.13.mlp.down_proj", None),
        ({r"layers\.[0-4]\..*proj": 2}, "model.layers.2.self_attn.v_proj", r"layers\.[0-4]\..*proj"),
        ({"proj": 2}, "model.layers.2.self_attn.v_proj", None),  # suffix match on whole names only
    ],
)
def test_pattern_key_follows_peft_semantics(
    patterns: dict[str, int], module: str, expected: str | None
) -> None:
    assert pattern_key(patterns, module) == expected


def _cfg(**kw: object) -> dict[str, object]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, **kw}


LLAMA = BaseSpec("tiny", hidden_size=8, vocab_size=10)
GPT2 = BaseSpec("tiny", hidden_size=8, vocab_size=10, family="gpt2")


def test_check_config_maps_tasks_and_rejects_unsupported() -> None:
    assert check_config(_cfg(), LLAMA) == "generate"
    assert check_config(_cfg(task_type="SEQ_CLS"), LLAMA) == "classify"
    assert check_config(_cfg(task_type=None), LLAMA) is None  # inferred from the weights
    for field, value in [  # (use_dora is served: checked against the weights when they are read)
        ("lora_bias", True),
        ("layer_replication", [[0, 2]]),
        ("fan_in_fan_out", True),  # Conv1D layers only
    ]:
        with pytest.raises(InvalidAdapter) as exc:
            check_config(_cfg(**{field: value}), LLAMA)
        assert exc.value.param == field
    assert check_config(_cfg(fan_in_fan_out=True), GPT2) == "generate"
    with pytest.raises(InvalidAdapter, match="rank_pattern"):
        check_config(_cfg(rank_pattern={"q_proj": "x"}), LLAMA)
    with pytest.raises(InvalidAdapter, match="invalid pattern"):
        check_config(_cfg(alpha_pattern={"(": 2}), LLAMA)


def test_find_stop_returns_earliest() -> None:
    assert find_stop("hello world. bye", (".", "bye")) == 11
    assert find_stop("hello", ("x",)) == -1
    assert find_stop("hello", ()) == -1


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = top_p_filter(probs, 0.7)
    assert out.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    assert top_p_filter(probs, 1.0) is probs
    # a top_p below float32's smallest value (found by fuzzing) keeps the most likely token only
    for tiny in (5e-324, 1e-50, 1e-12):
        assert top_p_filter(probs, tiny).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("vocab", [BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 17, 49152, 151936])
def test_greedy_tokens_equal_argmax(vocab: int) -> None:
    torch.manual_seed(vocab)
    logits = torch.randn(17, vocab)
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    # equal maxima in different blocks and in the tail, NaN, all -inf, a bf16 head's logits
    odd = torch.full((6, vocab), float("-inf"))
    odd[0, [5, vocab - 1]] = 1.0
    odd[1, [vocab - 1, vocab // 2]] = 3.0
    odd[2, [vocab - 2, 3]] = float("nan")
    odd[4] = 0.0
    odd[5, vocab - 1] = 2.0
    assert greedy_tokens(odd).tolist() == odd.argmax(-1).tolist()
    half = logits.bfloat16()
    assert torch.equal(greedy_tokens(half), half.argmax(-1))


def test_select_tokens_greedy_and_seeded() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [1.0, 1.0, 1.2]])
    gens = [make_generator(7, torch.device("cpu")) for _ in range(2)]
    assert select_tokens(logits, [0.0, 0.0], [1.0, 1.0], gens) == [1, 2]
    # a temperature too small to divide by (found by fuzzing) is greedy, its limit
    assert select_tokens(logits, [5e-324, 1e-9], [5e-324, 1.0], gens) == [1, 2]
    a = [
        select_tokens(logits, [1.0, 1.0], [1.0, 1.0], [make_generator(3, torch.device("cpu"))] * 2)
        for _ in range(2)
    ]
    assert a[0] == a[1]


def test_last_non_pad_index_matches_llama_pooling() -> None:
    ids = torch.tensor([[5, 6, 7, 2, 2], [5, 2, 2, 2, 2], [1, 2, 3, 4, 5]])
    assert last_non_pad_index(ids, pad_id=2).tolist() == [2, 0, 4]


def test_routing_fast_path_and_mixed() -> None:
    single = Routing.build([3, 3, 3], torch.device("cpu"))
    assert single.single == 3 and single.index is None
    mixed = Routing.build([0, 2, 1], torch.device("cpu"))
    assert mixed.single is None and mixed.index is not None and mixed.index.tolist() == [0, 2, 1]
    assert mixed.max_slot == 2


def test_error_mapping_is_one_table() -> None:
    assert status_of(AdapterNotFound("x")) == 404
    assert status_of(TaskMismatch("x")) == 409
    assert status_of(InvalidAdapter("x")) == 400
    assert status_of(UploadTooLarge("x")) == 413
    assert status_of(InvalidRequest("x")) == 422
    assert status_of(DeadlineExceeded("x")) == 504
    resp = to_response(QueueFull("busy"))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"


def test_model_id_strips_quantization_suffix() -> None:
    from pathlib import Path

    assert model_id_for(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert model_id_for(Path("/models/my-model")) == "my-model"
    assert model_id_for(Path("e5-small-q4.bin")) == "e5-small-q4"


def test_a_missing_base_names_the_packaged_ones(tmp_path: Path) -> None:
    from app.models.sources import PACKAGED, resolve_model_path

    with pytest.raises(RuntimeError, match="not found") as exc:
        resolve_model_path(str(tmp_path / "nowhere"), tmp_path)
    assert all(name in str(exc.value) for name in PACKAGED)


def test_bottleneck_config_sites_sizes_and_refusals() -> None:
    from app.adapters.bottleneck_format import check_bottleneck_config, sites
    from app.errors import InvalidAdapter
    from app.models.base_lm import BaseSpec

    shapes = {}
    for i in range(2):
        shapes[f"model.layers.{i}.self_attn.o_proj"] = (64, 64)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (64, 256)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (256, 64)
    spec = BaseSpec(model_id="tiny", hidden_size=64, vocab_size=10, linear_shapes=shapes)
    assert sites(spec) == {
        "attention": {0: "model.layers.0.self_attn.o_proj", 1: "model.layers.1.self_attn.o_proj"},
        "ffn": {0: "model.layers.0.mlp.down_proj", 1: "model.layers.1.mlp.down_proj"},
    }
    cfg = {
        "peft_type": "BOTTLENECK",
        "task_type": "CAUSAL_LM",
        "placement": "houlsby",
        "reduction_factor": 16,
    }
    got = check_bottleneck_config(cfg, spec)
    assert got["places"] == ("attention", "ffn") and got["size"] == 4 and got["layers"] == [0, 1]
    assert got["activation"] == "relu" and got["scaling"] == 1.0 and got["task"] == "generate"
    pfeiffer = check_bottleneck_config(
        {**cfg, "placement": "pfeiffer", "bottleneck_size": 8, "layers": [1]}, spec
    )
    assert pfeiffer["places"] == ("ffn",) and pfeiffer["size"] == 8 and pfeiffer["layers"] == [1]
    for bad, param in [
        ({"placement": "middle"}, "placement"),
        ({"bottleneck_size": 65}, "bottleneck_size"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"reduction_factor": 0.5}, "reduction_factor"),
        ({"activation": "sigmoid"}, "activation"),
        ({"layers": [2]}, "layers"),
        ({"layers": [0, 0]}, "layers"),
        ({"scaling": "big"}, "scaling"),
        ({"task_type": None}, "task_type"),
        ({"mh_adapter": True}, "mh_adapter"),
    ]:
        with pytest.raises(InvalidAdapter) as exc:
            check_bottleneck_config({**cfg, **bad}, spec)
        assert exc.value.param == param, bad


def test_adapter_metric_label_is_bounded_and_tier_series_exist() -> None:
    from app.metrics import Metrics

    m = Metrics(max_adapter_labels=2)
    assert [m.adapter_label(n) for n in ("a", "b", "c", "a", None)] == ["a", "b", "other", "a", "base"]
    text = m.render().decode()
    for tier in ("host", "device"):
        assert f'adapterserve_adapter_evictions_total{{tier="{tier}"}} 0.0' in text
    assert "adapterserve_adapter_load_failures_total 0.0" in text


def test_tool_arguments_are_closed_objects() -> None:
    from app.serving.tools import closed

    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "string"},  # a parameter named like the keyword
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
            "free": {"type": "object", "additionalProperties": True, "properties": {}},
        },
        "$defs": {"A": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"] == {"type": "string"}
    assert out["properties"]["where"]["additionalProperties"] is False
    assert out["properties"]["tags"]["items"]["additionalProperties"] is False
    assert out["properties"]["free"]["additionalProperties"] is True  # said: kept
    assert out["$defs"]["A"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not changed
