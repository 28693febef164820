"""Folders the server or `adapterserve train` wrote upload as they are: through the archive route
(packed with the `tar` command the README shows) and through `adapterserve upload`; the copies
answer exactly as the originals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.adapters.store import folder_store
from app.cli import main
from tests.conftest import ADMIN_TOKEN, upload_archive
from tests.helpers.peft_ref import CLASSIFY_TEXTS, RefAdapter

ROOT = Path(__file__).resolve().parents[2]


def _tar(folder: Path, out: Path) -> bytes:
    """``tar czf OUT -C FOLDER .``, as the README says."""
    subprocess.run(["tar", "czf", str(out), "-C", str(folder), "."], check=True)
    return out.read_bytes()


def _cli_upload(folder: Path, name: str, url: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "app.cli", "upload", str(folder), "--name", name, "--url", url]
    return subprocess.run([*cmd, "--admin-token", ADMIN_TOKEN], capture_output=True, text=True, cwd=ROOT)


def _scores(client: TestClient, name: str) -> list[dict[str, float]]:
    resp = client.post("/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS})
    assert resp.status_code == 200, resp.text
    return [r["scores"] for r in resp.json()["results"]]


def _same(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert [sorted(x) for x in a] == [sorted(y) for y in b]
    assert all(abs(x[k] - y[k]) <= 1e-6 for x, y in zip(a, b, strict=True) for k in x)


def test_a_store_folder_uploads_as_is(
    client: TestClient, uploaded: dict[str, RefAdapter], store_dir: Path, live_url: str, tmp_path: Path
) -> None:
    store = folder_store(store_dir)
    current = store.current("cls-4")
    assert current is not None
    folder = store.folder(current)  # the files of the version the server serves
    resp = upload_archive(client, "cls-4-copy", _tar(folder, tmp_path / "a.tar.gz"), "a.tar.gz")
    assert resp.status_code == 201, resp.text
    done = _cli_upload(folder, "cls-4-cli", live_url)
    assert done.returncode == 0, done.stderr
    assert "uploaded cls-4-cli version 1" in done.stdout
    original = _scores(client, "cls-4")
    _same(_scores(client, "cls-4-copy"), original)
    _same(_scores(client, "cls-4-cli"), original)


def test_a_trained_folder_uploads_as_is(
    client: TestClient,
    live_url: str,
    base_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADAPTERSERVE_BASE_MODEL", str(base_path))  # train on the server's base
    data = tmp_path / "topics.csv"
    rows = ["text,label"] + [f"match {i} won by the home side,sport" for i in range(6)]
    rows += [f"shares fell {i} percent today,business" for i in range(6)]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "trained"
    argv = ["train", "--task", "classify", "--data", str(data), "--output", str(out), "--name", "t"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--max-steps", "2", "--batch-size", "4", "--rank", "2", "--device", "cpu"])
    assert exc.value.code == 0
    assert "warning: only 2 optimizer steps" in capsys.readouterr().err  # a run that learns little
    assert (out / "metrics.json").is_file()
    done = _cli_upload(out, "trained-orig", live_url)
    assert done.returncode == 0, done.stderr
    resp = upload_archive(client, "trained-tar", _tar(out, tmp_path / "t.tar.gz"), "t.tar.gz")
    assert resp.status_code == 201, resp.text
    _same(_scores(client, "trained-tar"), _scores(client, "trained-orig"))


def test_upload_cli_errors_are_clear(live_url: str, tmp_path: Path) -> None:
    done = _cli_upload(tmp_path, "x", live_url)
    assert done.returncode == 2 and "not an adapter folder" in done.stderr
    cmd = [sys.executable, "-m", "app.cli", "upload", str(tmp_path), "--url", live_url]
    no_token = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert no_token.returncode == 2 and "--admin-token" in no_token.stderr
