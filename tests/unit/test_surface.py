"""The model surface: which base families the server serves and what it knows of each, and a
clear refusal of unknown families at start (tiny configs saved to a folder; no weights loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import MambaConfig, PretrainedConfig

from app.cli import main
from app.models.base_lm import check_base, load_base_model
from app.models.surface import UnsupportedBase, served_families, surface_for


def _folder(tmp_path: Path, config: PretrainedConfig) -> Path:
    config.save_pretrained(tmp_path)
    return tmp_path


def test_the_default_family_and_its_sites() -> None:
    llama = surface_for("llama")
    assert llama.kind == "decoder" and llama.can_generate and llama.pooling == "last"
    assert llama.attention_output == "self_attn.o_proj" and llama.ffn_output == "mlp.down_proj"
    assert llama.head_modules == ("score",)
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gpt2"} <= set(served_families())


def test_encoders_classify_through_their_own_heads() -> None:
    bert, roberta = surface_for("bert"), surface_for("roberta")
    assert bert.kind == "encoder" and not bert.can_generate and bert.pooling == "first"
    assert bert.head == (("bert.pooler.dense", "tanh"), ("classifier", None))  # BERT's pooler, as HF
    assert roberta.head_modules == ("classifier.dense", "classifier.out_proj")
    # post-LayerNorm blocks: modules follow the output projections, before the residual LayerNorm
    assert bert.attention_output == "attention.output.dense" and bert.ffn_output == "output.dense"
    assert surface_for("distilbert").head_modules == ("pre_classifier", "classifier")


def test_gpt2_projections_are_conv1d() -> None:
    gpt2 = surface_for("gpt2")
    assert gpt2.conv1d and gpt2.blocks == "h" and gpt2.lora_targets == ("c_attn", "c_proj", "c_fc")


def test_an_unknown_family_is_refused_with_the_list(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedBase, match=r"'mamba' are not supported; supported: .*bert.*llama"):
        surface_for("mamba")
    folder = _folder(tmp_path, MambaConfig(hidden_size=32, num_hidden_layers=1))
    with pytest.raises(UnsupportedBase, match="mamba"):
        check_base(str(folder), tmp_path / "cache")
    with pytest.raises(UnsupportedBase):  # before any tokenizer or weights are read
        load_base_model(str(folder), tmp_path / "cache", "cpu", "float32")


def test_serve_refuses_an_unsupported_base_with_a_message(tmp_path: Path) -> None:
    folder = _folder(tmp_path, MambaConfig(hidden_size=32, num_hidden_layers=1))
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--base-model", str(folder), "--cache-dir", str(tmp_path / "cache")])
    assert "not supported" in str(exc.value.code) and "llama" in str(exc.value.code)
