"""What each part of w8a8 buys in accuracy: the default base's next-token distributions under each
variant of the w8a8 layer, against fp32, next to the weight-only int8 and int4 layers.

    python -m bench.w8a8_variants [--tokens 16]

Each prompt is continued greedily by the fp32 model; every variant then reads the same tokens
(one forward pass) and is scored at each generated position by the KL divergence of its
next-token distribution from fp32's and by whether its top token is fp32's. "Float paths" is the
mean gap between the variant's log-probabilities of its own greedy tokens computed two ways (token
by token with a KV cache, and in one pass): how far rounding activations amplifies last-bit float
differences (weight-only layers: ~1e-5).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.config import Settings
from app.models import w8a8
from app.models.base_lm import resolve_model_path
from app.models.quantize import snap_to_quantized

PROMPTS = [
    "The capital of France is",
    "Customer: my printer does not work.\nAgent:",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
    "To reset your password, first",
    "In 1969, the first humans",
]
VARIANTS: dict[str, dict[str, Any]] = {
    "w8a8, 7-bit activations per row, no smoothing": {"act_bits": 7, "alpha": None, "outliers": 0},
    "+ SmoothQuant smoothing": {"act_bits": 7, "alpha": w8a8.ALPHA, "outliers": 0},
    "+ 8-bit activations, 7-bit weights": {"act_bits": 8, "alpha": w8a8.ALPHA, "outliers": 0},
    f"+ {w8a8.OUTLIERS} float outlier channels per layer": {},
}


def _w8a8(path: str, tok: Any, **knobs: Any) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    act_max = w8a8.calibrate(model, tok, names)[0]
    for name in names:
        layer = model.get_submodule(name)
        kernel = w8a8.Kernel(layer.weight, act_max[name], **knobs)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, w8a8.W8A8Linear(kernel, layer.bias))
    return model


def _snapped(path: str, tok: Any, kind: str) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    snap_to_quantized(model, kind, tokenizer=tok)  # type: ignore[arg-type]
    return model


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    path = str(resolve_model_path("", Settings().cache_dir)[0])
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runs = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        seq = ref.generate(**enc, max_new_tokens=args.tokens, do_sample=False)
        n = enc.input_ids.shape[1]
        runs.append((n, seq, torch.log_softmax(ref(seq).logits[0, n - 1 : -1], -1)))
    models: dict[str, Callable[[], nn.Module]] = {
        "int8 weight-only": partial(_snapped, path, tok, "int8"),
        "int4 weight-only": partial(_snapped, path, tok, "int4"),
        **{label: partial(_w8a8, path, tok, **knobs) for label, knobs in VARIANTS.items()},
        "+ one kernel per input (w8a8 as served)": partial(_snapped, path, tok, "w8a8"),
    }
    print(f"\n{len(PROMPTS)} prompts × {args.tokens} greedy tokens of fp32, default base\n")
    print("| variant | KL to fp32 | same top token | float paths: mean log-prob gap |")
    print("|---|---:|---:|---:|")
    for label, build in models.items():
        model: Any = build()
        kl, same, gap = [], [], []
        for n, seq, fp32 in runs:
            lp = torch.log_softmax(model(seq).logits[0, n - 1 : -1], -1)
            kl.append(float((fp32.exp() * (fp32 - lp)).sum(-1).mean()))
            same.append(float((lp.argmax(-1) == fp32.argmax(-1)).float().mean()))
            out = model.generate(
                input_ids=seq[:, :n], attention_mask=torch.ones_like(seq[:, :n]), max_new_tokens=args.tokens,
                do_sample=False, output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
            ids = out.sequences[0, n:, None]
            stepwise = torch.stack([torch.log_softmax(s[0], -1) for s in out.scores]).gather(1, ids)
            whole = torch.log_softmax(model(out.sequences).logits[0, n - 1 : -1], -1).gather(1, ids)
            gap.append(float((stepwise - whole).abs().mean()))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(f"| {label} | {mean(kl):.4f} | {mean(same):.3f} | {mean(gap):.4f} |", flush=True)


if __name__ == "__main__":
    main()
