"""`adapterserve train`: a short real training run gives an adapter that the server loads and that
predicts exactly what the trained PEFT model in memory predicts; bad data gets clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.adapters.publish import install_into_store, upload
from app.cli import main
from app.config import Settings
from app.models.base_lm import BaseLM
from app.training.trainer import TrainOptions, train
from tests.conftest import ADMIN_TOKEN, CACHE_DIR, upload_archive

TOPICS = {
    "sport": [
        "The striker scored twice as the home side won the cup final.",
        "She won the marathon in record time despite the heat.",
        "The coach praised his defence after a goalless draw.",
        "Tennis fans watched the champion lose in five sets.",
        "The rugby team lost their captain to a knee injury.",
        "Cricket selectors named three new bowlers for the tour.",
        "The sprinter was disqualified for a false start in the final.",
        "A late penalty gave the visitors a narrow victory.",
    ],
    "tech": [
        "The new phone ships with a faster chip and a better camera.",
        "Hackers stole passwords from millions of online accounts.",
        "The software update fixes a bug that drained laptop batteries.",
        "Engineers built a robot that learns to sort parcels.",
        "The search company unveiled a cheaper cloud storage plan.",
        "Broadband speeds doubled across rural areas this year.",
        "A games console shortage frustrated buyers before the holidays.",
        "Researchers released an open source tool for data compression.",
    ],
    "business": [
        "Shares fell after the bank reported lower quarterly profits.",
        "The airline cut its fares to win back passengers.",
        "Oil prices rose on fears of tighter supply.",
        "The retailer will close forty stores and cut jobs.",
        "Investors cheered the merger of the two carmakers.",
        "Inflation slowed for a third month, the figures showed.",
        "The brewer raised its dividend after strong sales.",
        "Exports grew faster than economists had expected.",
    ],
}
HELD_OUT = ["The goalkeeper saved a penalty in extra time.", "Chip makers expect record demand for servers."]
QA = [
    ("My computer won't turn on.", "Check that it is plugged in and hold the power button for ten seconds."),
    ("I forgot my password.", "Use the password reset link on the sign-in page."),
    ("My internet is not working.", "Restart your router and check that the cables are connected."),
    ("The screen is black.", "Raise the brightness or connect an external monitor."),
    ("I can't hear any sound.", "Check the volume and make sure the right output device is selected."),
    ("My mouse is not responding.", "Try another USB port or change the batteries."),
    ("The printer is offline.", "Turn the printer off and on and check its network connection."),
    ("My laptop is overheating.", "Make sure the air vents are not blocked and clean out the dust."),
]


def _write_csv(path: Path, rows: list[dict[str, str]], fields: list[str] | None = None) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def topic_csv(tmp_path: Path) -> Path:
    rows = [{"text": t, "label": label} for label, texts in TOPICS.items() for t in texts]
    rows.append({"text": " ".join(TOPICS["sport"]) * 3, "label": "sport"})  # longer than max_length
    return _write_csv(tmp_path / "topics.csv", rows)


@pytest.fixture
def qa_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA))
    return path


def _opts(task: str, data: Path, output: Path, **kw: object) -> TrainOptions:
    base = dict(
        rank=4,
        alpha=8.0,
        batch_size=4,
        max_length=48,
        max_steps=3,
        lr=1e-2,  # a few steps must move the weights far enough for the checks to mean something
        cache_dir=CACHE_DIR,
        device="cpu",
    )
    return TrainOptions(task=task, data=data, output=output, **{**base, **kw})  # type: ignore[arg-type]


def test_classify_training_serves_the_trained_predictions(
    topic_csv: Path, tmp_path: Path, client: TestClient, live_url: str
) -> None:
    result = train(_opts("classify", topic_csv, tmp_path / "out", val_fraction=0.25))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
        "metrics.json",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["truncated"]["train"] + metrics["truncated"]["val"] == 1
    assert set(metrics["final"]) == {"accuracy", "macro_f1"} and 0 <= metrics["final"]["accuracy"] <= 1
    assert json.loads((out / "labels.json").read_text()) == ["business", "sport", "tech"]

    # a real HTTP upload, as `--upload` does it
    info = upload(out, "trained-topics", live_url, ADMIN_TOKEN)
    assert info["task"] == "classify" and info["labels"] == ["business", "sport", "tech"]
    resp = client.post("/classify", json={"adapter": "trained-topics", "inputs": HELD_OUT})
    assert resp.status_code == 200, resp.text
    model, tok = result.model, result.tokenizer
    with torch.no_grad():
        base_scores = None
        for text, served in zip(HELD_OUT, resp.json()["results"], strict=True):
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0].float(), -1)
            assert served["label"] == result.labels[int(probs.argmax())]  # type: ignore[index]
            got = torch.tensor([served["scores"][name] for name in result.labels])  # type: ignore[union-attr]
            assert torch.allclose(got, probs, atol=1e-4), (got, probs)
            base_scores = probs
    assert base_scores is not None and float(base_scores.max()) > 1 / 3 + 1e-3  # not a uniform guess


def test_generate_training_serves_the_trained_text(
    qa_jsonl: Path, tmp_path: Path, client: TestClient, base_model: BaseLM
) -> None:
    result = train(_opts("generate", qa_jsonl, tmp_path / "gen", val_fraction=0.25))
    metrics = result.metrics
    assert set(metrics["final"]) == {"loss", "perplexity"} and metrics["final"]["perplexity"] > 1
    assert not (tmp_path / "gen" / "labels.json").exists()

    store = tmp_path / "store"
    installed = install_into_store(tmp_path / "gen", "support", Settings(store=store), base_model.spec)
    assert installed.meta["task"] == "generate" and installed.version == 1
    resp = upload_archive(client, "trained-support", _tar(tmp_path / "gen"), "a.tar.gz")
    assert resp.status_code == 201, resp.text
    messages = [{"role": "user", "content": "My printer is not working."}]
    served = client.post(
        "/generate", json={"adapter": "trained-support", "messages": messages, "max_new_tokens": 12}
    ).json()
    tok, model = result.tokenizer, result.model
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        with model.disable_adapter():
            plain = model.generate(**ids, max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert served["text"] == expected
    assert not torch.equal(out, plain), "three steps at lr 1e-2 must change the greedy output"


def _tar(folder: Path) -> bytes:
    from app.adapters.publish import archive_bytes

    return archive_bytes(folder)


def test_training_is_deterministic_with_a_seed(topic_csv: Path, tmp_path: Path) -> None:
    a = train(_opts("classify", topic_csv, tmp_path / "a", max_steps=2, seed=7))
    b = train(_opts("classify", topic_csv, tmp_path / "b", max_steps=2, seed=7))
    wa = load_file(tmp_path / "a" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.metrics["epochs"][0]["train_loss"] == b.metrics["epochs"][0]["train_loss"]


def test_the_first_optimizer_step_changes_the_weights(qa_jsonl: Path, tmp_path: Path) -> None:
    """One step at the default learning rate: LoRA's B starts at zero, so it must move off zero
    (a warm-up that starts at learning rate 0 left it there)."""
    result = train(_opts("generate", qa_jsonl, tmp_path / "one", max_steps=1, lr=2e-4))
    assert result.metrics["steps"] == 1
    weights = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert b and all(float(w.abs().max()) > 0 for w in b)


def test_cli_trains_and_uploads(topic_csv: Path, tmp_path: Path, client: TestClient, live_url: str) -> None:
    argv = ["train", "--task", "classify", "--data", str(topic_csv), "--output", str(tmp_path / "cli")]
    argv += ["--name", "cli-topics", "--max-steps", "1", "--batch-size", "4", "--max-length", "32"]
    argv += ["--rank", "2", "--device", "cpu", "--upload", live_url, "--admin-token", ADMIN_TOKEN]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["cli-topics"]["rank"] == 2 and listed["cli-topics"]["labels"] == [
        "business",
        "sport",
        "tech",
    ]


def _cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["train", *args, "--device", "cpu", "--output", "/nonexistent/never-written"])
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "fields", "message"),
    [
        ([{"sentence": "a", "label": "x"}], None, "missing column(s) 'text'"),
        ([], ["text", "label"], "has no rows"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], None, "at least two classes"),
        ([{"text": "a", "label": "x"}, {"text": "", "label": "y"}], None, "row 2: column 'text' is empty"),
    ],
)
def test_bad_classification_data(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rows: list[dict[str, str]],
    fields: list[str] | None,
    message: str,
) -> None:
    data = _write_csv(tmp_path / "bad.csv", rows, fields)
    assert message in _cli_error(capsys, "--task", "classify", "--data", str(data))


def test_bad_data_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], topic_csv: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty" in _cli_error(capsys, "--task", "classify", "--data", str(empty))
    val = _write_csv(tmp_path / "val.csv", [{"text": "a", "label": "weather"}])
    err = _cli_error(capsys, "--task", "classify", "--data", str(topic_csv), "--val-data", str(val))
    assert "labels that the training data does not: 'weather'" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": \n')
    assert "broken.jsonl:2: not a JSON object" in _cli_error(
        capsys, "--task", "generate", "--data", str(broken)
    )
    no_answer = tmp_path / "chat.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    err = _cli_error(capsys, "--task", "generate", "--data", str(no_answer))
    assert "row 1: no assistant message" in err
    xlsx = tmp_path / "data.xlsx"
    xlsx.write_text("x")
    assert "unknown format '.xlsx'" in _cli_error(capsys, "--task", "classify", "--data", str(xlsx))
    missing = _cli_error(capsys, "--task", "generate", "--data", str(topic_csv))
    assert "missing column(s) 'prompt', 'response'" in missing
    err = _cli_error(capsys, "--task", "classify", "--data", str(topic_csv), "--target-modules", "qq_proj")
    assert "--target-modules 'qq_proj'" in err


def test_chat_examples_take_the_loss_on_assistant_turns_only(base_model: BaseLM) -> None:
    from app.training.data import encode_chat

    tok = base_model.tokenizer
    conv = [
        {"role": "system", "content": "You help with computers."},
        {"role": "user", "content": "My mouse is not responding."},
        {"role": "assistant", "content": "Try another USB port."},
        {"role": "user", "content": "Still nothing."},
        {"role": "assistant", "content": "Then change the batteries."},
    ]
    enc = encode_chat(tok, [conv], max_length=512)
    ids, labels = enc.input_ids[0], enc.targets[0]
    learned = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert learned.replace("\n", "") == "Try another USB port.<|im_end|>Then change the batteries.<|im_end|>"
    short = encode_chat(tok, [conv], max_length=20)  # the cut leaves no assistant token
    assert short.dropped == 1 and short.truncated == 1 and not short.input_ids


def test_bottleneck_training_serves_the_trained_predictions(
    topic_csv: Path, qa_jsonl: Path, tmp_path: Path, client: TestClient, base_model: BaseLM
) -> None:
    # classification: Houlsby placement (attention and feed-forward) and a fresh head
    result = train(
        _opts(
            "classify",
            topic_csv,
            tmp_path / "bn-cls",
            kind="bottleneck",
            placement="houlsby",
            bottleneck_size=8,
        )
    )
    config = json.loads((tmp_path / "bn-cls" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["placement"] == "both"
    meta = install_into_store(
        tmp_path / "bn-cls", "bn-topics", Settings(store=tmp_path / "store"), base_model.spec
    ).meta
    assert (
        meta["kind"] == "bottleneck" and meta["rank"] == 8 and meta["labels"] == ["business", "sport", "tech"]
    )
    resp = upload_archive(client, "bn-topics", _tar(tmp_path / "bn-cls"), "a.tar.gz")
    assert resp.status_code == 201, resp.text
    served = client.post("/classify", json={"adapter": "bn-topics", "inputs": HELD_OUT}).json()["results"]
    model, tok, labels = result.model, result.tokenizer, result.labels
    assert labels is not None
    with torch.no_grad():
        for text, row in zip(HELD_OUT, served, strict=True):
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0].float(), -1)
            with model.disable_adapter():
                head_only = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0].float(), -1)
            got = torch.tensor([row["scores"][name] for name in labels])
            assert torch.allclose(got, probs, atol=1e-4), (got, probs)
            assert not torch.allclose(probs, head_only, atol=1e-3)  # the trained modules matter

    # generation: Pfeiffer placement (feed-forward only)
    result = train(_opts("generate", qa_jsonl, tmp_path / "bn-gen", kind="bottleneck", reduction_factor=32))
    resp = upload_archive(client, "bn-support", _tar(tmp_path / "bn-gen"), "a.tar.gz")
    assert resp.status_code == 201 and resp.json()["rank"] == base_model.spec.hidden_size // 32, resp.text
    messages = [{"role": "user", "content": "My printer is not working."}]
    text = client.post(
        "/generate", json={"adapter": "bn-support", "messages": messages, "max_new_tokens": 12}
    ).json()["text"]
    tok, model = result.tokenizer, result.model
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        with model.disable_adapter():
            plain = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert text == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert not torch.equal(out, plain), "three steps at lr 1e-2 must change the greedy output"


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_dora_and_ia3_training_serves_the_trained_predictions(
    kind: str, topic_csv: Path, tmp_path: Path, client: TestClient
) -> None:
    """``--kind dora`` / ``--kind ia3``: PEFT trains the adapter, the server serves the trained model's
    scores (and the trained weights matter: they differ from the same head without the adapter)."""
    out = tmp_path / kind
    result = train(_opts("classify", topic_csv, out, kind=kind))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config.get("use_dora", False)) == (
        ("IA3", False) if kind == "ia3" else ("LORA", True)
    )
    resp = upload_archive(client, f"trained-{kind}", _tar(out), "a.tar.gz")
    assert resp.status_code == 201 and resp.json()["kind"] == kind, resp.text
    served = client.post("/classify", json={"adapter": f"trained-{kind}", "inputs": HELD_OUT}).json()[
        "results"
    ]
    model, tok, labels = result.model, result.tokenizer, result.labels
    assert labels is not None
    with torch.no_grad():
        for text, row in zip(HELD_OUT, served, strict=True):
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0].float(), -1)
            got = torch.tensor([row["scores"][name] for name in labels])
            assert torch.allclose(got, probs, atol=1e-4), (got, probs)
