"""The prefix cache under a budget far smaller than the load (the tiny model): sessions of several
turns, interleaved, answer exactly as with the cache off, while the cache evicts and never holds
more than its budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.models.base_lm import BaseLM
from tests.conftest import app_settings, upload_all
from tests.helpers.peft_ref import RefAdapter

SESSIONS, TURNS = 6, 4
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4  # the tiny model: layers × (keys, values) × kv heads × head_dim × fp32
BUDGET = 60 * TOKEN_BYTES  # about one conversation


def _conversations(client: TestClient, budget_check: int | None) -> tuple[list[str], int]:
    """Every session's turns, one turn of each session after the other; the texts and the prompt
    tokens taken from the cache."""
    history = [f"Session {i}: hello, I need help with order {100 + i}.\nAgent:" for i in range(SESSIONS)]
    texts: list[str] = []
    cached = 0
    engine = client.app.state.engine  # type: ignore[attr-defined]
    for turn in range(TURNS):
        for i in range(SESSIONS):
            body = {"adapter": "gen-qv-r8" if i % 2 else None, "prompt": history[i], "max_new_tokens": 8}
            resp = client.post("/generate", json=body)
            assert resp.status_code == 200, resp.text
            out = resp.json()
            texts.append(out["text"])
            cached += out["usage"]["cached_tokens"]
            history[i] += f"{out['text']}\nUser: and turn {turn}?\nAgent:"
            if budget_check is not None:
                assert engine.gen.prefix.bytes <= budget_check
    return texts, cached


def test_a_tiny_budget_evicts_and_answers_exactly(
    own_tiny: BaseLM, ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    refs = {"gen-qv-r8": ref_adapters["gen-qv-r8"]}
    with TestClient(create_app(app_settings(tmp_path / "off", prefix_cache_bytes=0), base=own_tiny)) as off:
        upload_all(off, refs)
        expected, none = _conversations(off, None)
    assert none == 0
    assert own_tiny.model.config.num_hidden_layers * 2 * 2 * 16 * 4 == TOKEN_BYTES
    settings = app_settings(tmp_path / "tiny", prefix_cache_bytes=BUDGET)
    with TestClient(create_app(settings, base=own_tiny)) as tiny:
        upload_all(tiny, refs)
        got, cached = _conversations(tiny, BUDGET)
        metrics = tiny.get("/metrics").text
    assert got == expected
    assert cached > 0
    evictions = float(re.search(r"^adapterserve_prefix_cache_evictions_total (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    hits = float(re.search(r"^adapterserve_prefix_cache_hit_tokens_total (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    held = float(re.search(r"^adapterserve_prefix_cache_bytes (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert evictions > 0 and hits == cached and 0 < held <= BUDGET


@pytest.mark.parametrize("budget", [1])
def test_a_budget_smaller_than_one_token_caches_nothing(
    own_tiny: BaseLM, ref_adapters: dict[str, RefAdapter], tmp_path: Path, budget: int
) -> None:
    settings = app_settings(tmp_path / "store", prefix_cache_bytes=budget)
    with TestClient(create_app(settings, base=own_tiny)) as client:
        for _ in range(2):
            resp = client.post("/generate", json={"prompt": "Hello there, how are you?", "max_new_tokens": 4})
            assert resp.status_code == 200 and resp.json()["usage"]["cached_tokens"] == 0
        assert client.app.state.engine.gen.prefix.bytes == 0  # type: ignore[attr-defined]
