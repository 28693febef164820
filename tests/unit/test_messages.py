"""What a client or a user reads: validation messages, archive rules, the training schedule, --help."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, field_validator

from app.adapters.archive import _plan
from app.cli import main
from app.errors import InvalidAdapter, register_error_handlers
from app.training.trainer import lr_factor


class Body(BaseModel):
    text: str

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text must not be blank")
        return v


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    register_error_handlers(app)

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, str]:
        return {"text": body.text}

    return TestClient(app)


def test_validator_messages_carry_no_pydantic_prefix(client: TestClient) -> None:
    err = client.post("/echo", json={"text": "  "}).json()["error"]
    assert err["message"] == "text: text must not be blank" and err["param"] == "text"


def test_a_body_without_content_type_is_told_to_send_json(client: TestClient) -> None:
    resp = client.post("/echo", content=b'{"text": "hi"}')
    assert resp.status_code == 422
    assert resp.json()["error"]["message"] == (
        "send the request body as JSON with Content-Type: application/json (got no Content-Type)"
    )


def test_malformed_json_names_the_position(client: TestClient) -> None:
    resp = client.post("/echo", content=b'{"text":\n  }', headers={"content-type": "application/json"})
    message = resp.json()["error"]["message"]
    assert message == "the request body is not valid JSON: Expecting value at line 2, column 3 (character 12)"


def test_archives_of_server_and_trainer_folders_plan_as_is() -> None:
    store_folder = ["chat/adapter_config.json", "chat/adapter_model.safetensors", "chat/adapterserve.json"]
    assert sorted(_plan(store_folder).values()) == ["adapter_config.json", "adapter_model.safetensors"]
    deep = [f"adapters_store/chat/{n}" for n in ("adapter_config.json", "labels.json", ".DS_Store")]
    assert sorted(_plan(deep).values()) == ["adapter_config.json", "labels.json"]
    with pytest.raises(InvalidAdapter, match="nested"):
        _plan(["a/adapter_config.json", "a/b/adapter_model.safetensors"])
    with pytest.raises(InvalidAdapter, match="twice"):
        _plan(["a/labels.json", "./a/labels.json"])


@pytest.mark.parametrize(("warmup", "total"), [(1, 1), (1, 5), (4, 64), (10, 10)])
def test_every_optimizer_step_learns(warmup: int, total: int) -> None:
    factors = [lr_factor(i, warmup, total) for i in range(total)]
    assert all(f > 0 for f in factors)
    assert factors[0] == pytest.approx(1 / warmup) and max(factors) == pytest.approx(1.0)


def test_train_and_upload_help_show_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("train", "upload"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in (
        "--rank RANK LoRA rank (default: 8)",
        "(default: 16)",
        "(default: 0.05)",
        "(default: 2; 6 on an encoder base)",
        "(default: http://127.0.0.1:8000)",
    ):
        assert shown in out, shown
    assert "(default: None)" not in out
