"""The default base quantized (bf16, int8, int4, w8a8): /classify and /generate through mixed
batches equal HF PEFT run on the same quantized-then-dequantized weights (w8a8 and bf16, which also
round activations: PEFT on the HF model whose linear layers compute as theirs) (int8, int4:
probabilities ≤ 1e-4, greedy text equal), so adapters are applied exactly on top; the base's weight
bytes shrink as documented and the server reports its quantization."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, DynamicCache

from app import kernels
from app.config import Settings
from app.main import create_app
from app.models.base_lm import BaseLM, load_base_model
from app.models.quantize import rounds_activations, snap_to_quantized, weight_bytes
from app.models.quantized_layers import QuantizedEmbedding, QuantizedLinear
from app.models.surface import surface_for
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, zip_folder

SHARE = {"bf16": 0.62, "int8": 0.45, "int4": 0.30, "w8a8": 0.35}  # of the fp32 base's weight bytes
# w8a8 and bf16 round activations: a last-bit difference in a float op elsewhere (attention over
# another batch shape, oneDNN's summation order against PyTorch's) can move a value to the next
# step, so the served rows are compared with PEFT's along the served tokens (each one of PEFT's top
# 20, log-probabilities close), not bit for bit
# (int8 and int4 too where their CPU kernels take bf16 activations, or int4 on our kernel 8-bit ones:
# rounds_activations)
ROUNDS_ACTIVATIONS = tuple(
    k for k in ("w8a8", "bf16", "int8", "int4") if rounds_activations(k, torch.device("cpu"))
)
ROUNDED = 2e-2  # the tolerance of a format that rounds activations to bf16
TOLERANCE = {"bf16": ROUNDED, "int8": ROUNDED, "int4": ROUNDED, "w8a8": 5e-2}
if "int8" not in ROUNDS_ACTIVATIONS:
    TOLERANCE |= {"int8": 1e-4, "int4": 1e-4}
BF16_GAP = (0.05, 0.5)  # mean, largest (nats): the format's own noise
EIGHT_BIT_GAP = (0.15, 1.0)  # activations rounded to 8 bits: a last-bit difference moves a whole step
GAP = {"w8a8": EIGHT_BIT_GAP, "bf16": BF16_GAP, "int8": BF16_GAP, "int4": BF16_GAP}
if kernels.q4() is not None:  # int4 on our CPU kernel: 8-bit activations per group of 32
    GAP["int4"] = EIGHT_BIT_GAP


@pytest.fixture(scope="module", params=["bf16", "int8", "int4", "w8a8"])
def quantized(request: pytest.FixtureRequest, base_path: Path) -> tuple[str, BaseLM, dict[str, torch.Tensor]]:
    """The quantized base and the exact weights it computes with (module name -> weight)."""
    kind = request.param
    base = load_base_model(str(base_path), CACHE_DIR, "cpu", "float32", kind)
    weights: dict[str, torch.Tensor] = {}
    for name, mod in base.model.named_modules():
        if isinstance(mod, QuantizedLinear | QuantizedEmbedding):
            weights[name] = mod.dequantized()
    return kind, base, weights


@pytest.fixture(scope="module")
def served(
    quantized: tuple[str, BaseLM, dict[str, torch.Tensor]],
    ref_adapters: dict[str, RefAdapter],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    _, base, _ = quantized
    settings = Settings(
        store=tmp_path_factory.mktemp("qstore"),
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        max_new_tokens=64,
        device="cpu",
        dtype="float32",
    )
    with TestClient(create_app(settings, base=base)) as client:
        for name in ("gen-qv-r8", "gen-pattern", "cls-4"):
            ref = ref_adapters[name]
            assert upload_archive(client, name, zip_folder(ref.folder), f"{name}.zip").status_code == 201
        yield client


def _dequantized(model: Any, weights: dict[str, torch.Tensor], kind: str, tok: Any) -> Any:
    """An HF model of the base with the quantized base's exact weights (w8a8, bf16: its linear
    layers computing as the served ones)."""
    if kind in ROUNDS_ACTIVATIONS:
        snap_to_quantized(model, kind, keep=surface_for(model.config.model_type).head_modules, tokenizer=tok)
        return model.eval()
    with torch.no_grad():
        for name, w in weights.items():
            if name == "lm_head" and model.config.tie_word_embeddings:
                continue  # tied to the embeddings, which carry the same rows
            if name.startswith("lm_head") and not hasattr(model, "lm_head"):
                continue
            model.get_submodule(name).weight.copy_(w)
    return model.eval()


def peft_generators(
    base_path: Path,
    weights: dict[str, torch.Tensor],
    kind: str,
    tok: Any,
    ref_adapters: dict[str, RefAdapter],
) -> tuple[Any, Callable[[str | None], AbstractContextManager[Any]]]:
    """One dequantized model with both generation adapters loaded, and the context that runs it
    with one of them (None: the adapters disabled, the bare base)."""
    model = _dequantized(AutoModelForCausalLM.from_pretrained(base_path), weights, kind, tok)
    peft = PeftModel.from_pretrained(model, ref_adapters["gen-qv-r8"].folder, adapter_name="gen-qv-r8")
    peft.load_adapter(ref_adapters["gen-pattern"].folder, adapter_name="gen-pattern")
    peft.eval()

    def using(name: str | None) -> AbstractContextManager[Any]:
        if name is None:
            return peft.disable_adapter()
        peft.set_adapter(name)
        return nullcontext()

    return peft, using


def _followed(model: Any, tok: Any, prompt: str, served: list[dict[str, Any]]) -> list[float]:
    """PEFT's model fed the served tokens one by one: each served token must be one of its 20
    most likely; the gaps between its log-probabilities and the served ones."""
    ids, cache = tok(prompt, return_tensors="pt").input_ids, DynamicCache()  # a KV cache, as generate()'s
    gaps = []
    for entry in served:
        with torch.inference_mode():
            out = model(input_ids=ids, cache=cache, use_cache=True)
        logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
        top = logprobs.topk(20).indices.tolist()
        match = [i for i in top if tok.decode([i]).encode() == bytes(entry["bytes"])]
        assert match, (prompt, entry["token"], [tok.decode([i]) for i in top[:5]])
        gaps.append(abs(logprobs[match[0]].item() - entry["logprob"]))
        ids = torch.tensor([[match[0]]])
    return gaps


def test_quantized_base_equals_peft_on_the_dequantized_weights(
    quantized: tuple[str, BaseLM, dict[str, torch.Tensor]],
    served: TestClient,
    ref_adapters: dict[str, RefAdapter],
    base_path: Path,
    base_model: BaseLM,
) -> None:
    kind, base, weights = quantized
    tok = AutoTokenizer.from_pretrained(base_path)
    expected_text: dict[tuple[str | None, str], str] = {}
    peft, using = peft_generators(base_path, weights, kind, tok, ref_adapters)

    for name in (None, "gen-qv-r8", "gen-pattern"):
        for prompt in GENERATE_PROMPTS:
            expected_text[(name, prompt)] = ""
            if kind in ROUNDS_ACTIVATIONS:
                continue  # compared along the served tokens below, not as a whole text
            enc = tok(prompt, return_tensors="pt")
            with using(name), torch.inference_mode():
                out = peft.generate(**enc, max_new_tokens=GEN_TOKENS, do_sample=False)
            expected_text[(name, prompt)] = tok.decode(
                out[0, enc.input_ids.shape[1] :], skip_special_tokens=True
            )
    cls = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=4)
    cls.config.pad_token_id = tok.pad_token_id
    cls = _dequantized(cls, weights, kind, tok)
    cls = PeftModel.from_pretrained(cls, ref_adapters["cls-4"].folder).eval()
    with torch.inference_mode():
        expected_probs = [
            torch.softmax(cls(**tok(t, return_tensors="pt")).logits[0], -1) for t in CLASSIFY_TEXTS
        ]

    def generate(key: tuple[str | None, str]) -> Any:
        body = {"adapter": key[0], "prompt": key[1], "max_new_tokens": GEN_TOKENS, "logprobs": 0}
        return served.post("/generate", json=body)

    def classify() -> Any:
        return served.post("/classify", json={"adapter": "cls-4", "inputs": CLASSIFY_TEXTS})

    gaps: list[float] = []
    with ThreadPoolExecutor(8) as pool:  # base rows, two adapters and a classifier in shared batches
        texts = {key: pool.submit(generate, key) for key in expected_text}
        scores = pool.submit(classify)
        for key, future in texts.items():
            resp = future.result()
            assert resp.status_code == 200, resp.text
            if kind not in ROUNDS_ACTIVATIONS:
                assert resp.json()["text"] == expected_text[key], (kind, key)
            else:
                with using(key[0]):
                    gaps += _followed(peft, tok, key[1], resp.json()["logprobs"])
        labels = ref_adapters["cls-4"].labels
        for result, probs in zip(scores.result().json()["results"], expected_probs, strict=True):
            for label, p in zip(labels, probs.tolist(), strict=True):
                assert abs(result["scores"][label] - p) <= TOLERANCE[kind], (kind, label)
    if gaps:
        mean = sum(gaps) / len(gaps)
        print(f"\n{kind}: log-probability gaps along the served tokens: mean {mean:.4f}, max {max(gaps):.4f}")
        assert mean <= GAP[kind][0] and max(gaps) <= GAP[kind][1]

    full = weight_bytes(base_model.model)
    assert base.weight_bytes <= SHARE[kind] * full, (kind, base.weight_bytes, full)
    print(f"\n{kind}: base weights {base.weight_bytes / 1e6:.1f} MB = {base.weight_bytes / full:.1%} of fp32")
    assert served.get("/readyz").json()["quantization"] == kind
    assert served.get("/v1/models").json()["data"][0]["quantization"] == kind
    metric = [
        x for x in served.get("/metrics").text.splitlines() if x.startswith("adapterserve_base_weight_bytes ")
    ]
    assert len(metric) == 1 and float(metric[0].split()[1]) == base.weight_bytes
    # compositions run on a quantized base too
    body = {"adapters": ["gen-qv-r8", "gen-pattern"], "merge": "average", "prompt": "Hi", "max_new_tokens": 3}
    assert served.post("/generate", json=body).status_code == 200


def test_training_on_the_quantized_weights_serves_the_trained_predictions(
    quantized: tuple[str, BaseLM, dict[str, torch.Tensor]], served: TestClient, tmp_path: Path
) -> None:
    """``train --quantization`` learns on the weights the quantized server computes with: the
    served probabilities equal the trained model's."""
    from app.training.trainer import TrainOptions, train
    from tests.integration.test_training import HELD_OUT, TOPICS

    kind = quantized[0]
    data = tmp_path / "topics.csv"
    rows = [{"text": t, "label": label} for label, texts in TOPICS.items() for t in texts]
    data.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))
    opts = TrainOptions(
        task="classify", data=data, output=tmp_path / "out", rank=4, alpha=8.0, batch_size=4,
        max_length=48, max_steps=3, lr=1e-2, cache_dir=CACHE_DIR, device="cpu", quantization=kind,
    )  # fmt: skip
    result = train(opts)
    assert upload_archive(served, f"q-topics-{kind}", zip_folder(tmp_path / "out")).status_code == 201
    resp = served.post("/classify", json={"adapter": f"q-topics-{kind}", "inputs": HELD_OUT})
    assert resp.status_code == 200, resp.text
    labels = result.labels
    assert labels is not None
    with torch.no_grad():
        for text, row in zip(HELD_OUT, resp.json()["results"], strict=True):
            probs = torch.softmax(result.model(**result.tokenizer(text, return_tensors="pt")).logits[0], -1)
            got = torch.tensor([row["scores"][name] for name in labels])
            assert torch.allclose(got, probs, atol=TOLERANCE[kind]), (kind, got, probs)


def test_a_turn_served_from_the_prefix_cache_answers_as_prefilled_whole(
    quantized: tuple[str, BaseLM, dict[str, torch.Tensor]],
    served: TestClient,
    ref_adapters: dict[str, RefAdapter],
) -> None:
    """Each format: a conversation's second turn, its first turn's prompt and decoded answer taken
    from the prefix cache, answers what the same adapter under another name (a version with an
    empty tree) answers prefilling it whole. On ``int4``'s native step with bf16 attention the
    engine's caches and the prefixes keep bf16 keys and values (half the bytes a token)."""
    kind, base, _ = quantized
    cold = f"gen-cold-{kind}"
    assert (
        upload_archive(served, cold, zip_folder(ref_adapters["gen-qv-r8"].folder), f"{cold}.zip").status_code
        == 201
    )
    opening = "User: my parcel has not arrived and the tracking page shows nothing.\nAgent:"
    first = served.post("/generate", json={"adapter": "gen-qv-r8", "prompt": opening, "max_new_tokens": 16})
    assert first.status_code == 200, first.text
    second = f"{opening}{first.json()['text']}\nUser: it was due on Monday.\nAgent:"
    body = {"prompt": second, "max_new_tokens": 16}
    warm = served.post("/generate", json={"adapter": "gen-qv-r8", **body}).json()
    whole = served.post("/generate", json={"adapter": cold, **body}).json()
    assert warm["usage"]["cached_tokens"] >= first.json()["usage"]["prompt_tokens"] - 1
    assert whole["usage"]["cached_tokens"] == 0
    assert warm["text"] == whole["text"] and warm["usage"]["completion_tokens"] > 0
    engine: Any = served.app.state.engine  # type: ignore[attr-defined]
    kernel = kernels.q4()
    if kind == "int4" and kernel is not None and kernel.bf16:
        config = base.model.config
        per_token = (
            config.num_hidden_layers
            * 2
            * config.num_key_value_heads
            * (config.hidden_size // config.num_attention_heads)
            * 2
        )
        prefix = engine.gen.prefix
        assert engine.runner.kv_dtype == torch.bfloat16 and prefix.dtype == torch.bfloat16
        assert prefix.bytes == sum(prefix.tokens(key) for key in prefix._roots) * per_token > 0
    else:
        assert engine.runner.kv_dtype is None
