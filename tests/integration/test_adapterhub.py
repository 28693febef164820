"""Importing AdapterHub `adapters` bottleneck adapters: the served outputs equal the library's own.

The fixture ``tests/fixtures/adapterhub-houlsby`` was written by `adapters` 1.3.0 (transformers
4.57, which cannot share this project's environment): a ``DoubleSeqBnConfig`` (Houlsby) adapter on
the default base with random weights, ``leave_out`` layers 4-29, swish, scaling 1.5, saved with
``use_safetensors=True``; beside it, the library's last-token logits and greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.adapters.adapterhub import convert_adapterhub
from app.adapters.kinds import load_adapter
from app.adapters.store import folder_store
from app.cli import main
from app.config import Settings
from app.errors import InvalidAdapter
from app.main import create_app
from app.models.base_lm import BaseLM, read_spec
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, upload_archive
from tests.helpers.harness import last_logits, wrapped_model
from tests.helpers.peft_ref import zip_folder
from tests.helpers.versions import held

FIXTURE = Path(__file__).parents[1] / "fixtures" / "adapterhub-houlsby"


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], list[list[int]], torch.Tensor]:
    meta = json.loads((FIXTURE / "reference.json").read_text())
    logits = load_file(str(FIXTURE / "reference_logits.safetensors"))["logits"]
    return meta["prompts"], meta["greedy_token_ids"], logits


@pytest.fixture(scope="module")
def converted(base_model: BaseLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "hub-houlsby"
    adapter = convert_adapterhub(FIXTURE, out, base_model.spec)
    assert adapter.kind == "bottleneck" and adapter.target_modules == ["attention", "ffn"]
    assert adapter.rank == 9 and adapter.activation == "silu" and adapter.alpha == 1.5
    assert len(adapter.blocks) == 8  # layers 0-3, attention and feed-forward
    return out


def test_imported_logits_equal_the_adapters_library(
    converted: Path,
    base_model: BaseLM,
    base_path: Path,
    reference: tuple[list[str], list[list[int]], torch.Tensor],
) -> None:
    prompts, _, expected = reference
    base, runner, slots = wrapped_model(base_path, CACHE_DIR, 2)
    info = held("hub", load_adapter(converted, base.spec, 64))
    slot = slots.acquire(info, info.weights, {info.uid})  # type: ignore[arg-type]
    tok = base.tokenizer
    rows = [(slot, tok(p)["input_ids"]) for p in prompts]
    got = last_logits(base, runner, rows)
    assert (got - expected).abs().max().item() <= 1e-4
    bare = last_logits(base, runner, [(0, ids) for _, ids in rows])
    assert (bare - expected).abs().max().item() > 0.5  # the adapter changes the output a lot


def test_imported_adapter_serves_the_librarys_greedy_tokens(
    converted: Path,
    client: TestClient,
    base_model: BaseLM,
    reference: tuple[list[str], list[list[int]], torch.Tensor],
) -> None:
    resp = upload_archive(client, "hub-houlsby", zip_folder(converted), "a.zip")
    assert resp.status_code == 201, resp.text
    prompts, greedy, _ = reference
    for prompt, ids in zip(prompts, greedy, strict=True):
        body = {"adapter": "hub-houlsby", "prompt": prompt, "max_new_tokens": len(ids)}
        out = client.post("/generate", json=body).json()
        assert out["text"] == base_model.tokenizer.decode(ids) and out["usage"]["completion_tokens"] == len(
            ids
        )


def test_cli_imports_into_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("ADAPTERSERVE_STORE", str(store))
    argv = [
        "import-adapterhub",
        str(FIXTURE),
        "--name",
        "hub",
        "--output",
        str(tmp_path / "out"),
        "--into-store",
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    installed = folder_store(store).current("hub")
    assert installed is not None and installed.version == 1
    assert installed.meta["kind"] == "bottleneck" and installed.meta["target_modules"] == ["attention", "ffn"]


def _hub_copy(tmp_path: Path, **config: object) -> Path:
    folder = tmp_path / "hub-copy"
    shutil.copytree(FIXTURE, folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    saved["config"].update(config)
    (folder / "adapter_config.json").write_text(json.dumps(saved))
    return folder


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"original_ln_before": True}, "residual stream"),
        ({"use_gating": True}, "use_gating"),
        ({"ln_after": True}, "ln_after"),
        ({"non_linearity": "leakyrelu"}, "non_linearity"),
        ({"scaling": "learned"}, "scaling"),
    ],
)
def test_unsupported_adapterhub_configs_are_refused(
    change: dict[str, object], needle: str, tmp_path: Path, base_model: BaseLM
) -> None:
    with pytest.raises(InvalidAdapter) as exc:
        convert_adapterhub(_hub_copy(tmp_path, **change), tmp_path / "out", base_model.spec)
    assert needle in exc.value.message


def test_pickle_checkpoints_are_refused(tmp_path: Path, base_model: BaseLM) -> None:
    folder = _hub_copy(tmp_path)
    (folder / "adapter.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_adapter.bin")
    with pytest.raises(InvalidAdapter) as exc:
        convert_adapterhub(folder, tmp_path / "out", base_model.spec)
    assert "pickle" in exc.value.message and not (tmp_path / "out" / "adapter_model.safetensors").exists()


BERT_FIXTURE = Path(__file__).parents[1] / "fixtures" / "adapterhub-bert-houlsby"


@pytest.fixture(scope="module")
def minilm_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        base_model="all-minilm-l6-v2",
        store=tmp_path_factory.mktemp("minilm-store"),
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        device="cpu",
        dtype="float32",
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_bert_houlsby_adapter_and_head_classify_as_the_library_does(
    tmp_path: Path, minilm_client: TestClient
) -> None:
    """The BERT fixture: a DoubleSeqBnConfig adapter (swish, scaling 1.5, layer 5 left out) with a
    2-layer classification head, written by `adapters` 1.3.0 on all-MiniLM-L6-v2 with the library's
    class probabilities (scripts/make_adapterhub_bert_fixture.py)."""
    reference = json.loads((BERT_FIXTURE / "reference.json").read_text())
    spec = read_spec("all-minilm-l6-v2", CACHE_DIR)
    adapter = convert_adapterhub(BERT_FIXTURE, tmp_path / "out", spec)
    assert adapter.task == "classify" and adapter.labels == reference["labels"]
    assert adapter.target_modules == ["attention", "ffn"] and len(adapter.blocks) == 10  # 5 layers x 2
    resp = upload_archive(minilm_client, "hub-sentiment", zip_folder(tmp_path / "out"))
    assert resp.status_code == 201, resp.text
    resp = minilm_client.post("/classify", json={"adapter": "hub-sentiment", "inputs": reference["texts"]})
    assert resp.status_code == 200, resp.text
    for result, want in zip(resp.json()["results"], reference["probs"], strict=True):
        got = [result["scores"][label] for label in reference["labels"]]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4, (got, want)


def test_a_head_the_family_does_not_serve_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hub-bert"
    shutil.copytree(BERT_FIXTURE, folder)
    saved = json.loads((folder / "head_config.json").read_text())
    saved["config"]["use_pooler"] = True
    (folder / "head_config.json").write_text(json.dumps(saved))
    with pytest.raises(InvalidAdapter, match="use_pooler"):
        convert_adapterhub(folder, tmp_path / "out", read_spec("all-minilm-l6-v2", CACHE_DIR))
