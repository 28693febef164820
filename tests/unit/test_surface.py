"""The model surface: which base families the server serves, and a clear refusal of the others at
start (tiny configs saved to a folder; no weights loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BertConfig, GPT2Config, PretrainedConfig

from app.cli import main
from app.models.base_lm import check_base, load_base_model
from app.models.surface import SURFACES, UnsupportedBase, served_families, surface_for


def _folder(tmp_path: Path, config: PretrainedConfig) -> Path:
    config.save_pretrained(tmp_path)
    return tmp_path


def test_the_default_family_is_served_with_its_sites() -> None:
    llama = surface_for("llama")
    assert llama.kind == "decoder" and llama.can_generate and llama.pooling == "last"
    assert llama.attention_output == "self_attn.o_proj" and llama.ffn_output == "mlp.down_proj"
    assert {"llama", "mistral", "qwen2", "phi3"} <= set(served_families())
    assert all(SURFACES[f].served for f in served_families())


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            "encoder",
        ),
        (GPT2Config(n_embd=32, n_layer=1, n_head=2), "Conv1D"),
    ],
)
def test_families_not_served_yet_are_refused_with_the_reason(
    tmp_path: Path, config: PretrainedConfig, needle: str
) -> None:
    folder = _folder(tmp_path, config)
    with pytest.raises(UnsupportedBase, match=needle) as exc:
        check_base(str(folder), tmp_path / "cache")
    assert "llama" in exc.value.message  # the message lists what is served
    with pytest.raises(UnsupportedBase):  # before any tokenizer or weights are read
        load_base_model(str(folder), tmp_path / "cache", "cpu", "float32")


def test_an_unknown_family_is_refused_with_the_list() -> None:
    with pytest.raises(UnsupportedBase, match=r"'mamba' are not supported; supported: .*llama"):
        surface_for("mamba")


def test_serve_refuses_an_unsupported_base_with_a_message(tmp_path: Path) -> None:
    folder = _folder(tmp_path, BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--base-model", str(folder), "--cache-dir", str(tmp_path / "cache")])
    assert "cannot be served" in str(exc.value.code) and "encoder" in str(exc.value.code)
