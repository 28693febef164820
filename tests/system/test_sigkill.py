"""Crash safety of the real process: ``adapterserve serve`` is killed with SIGKILL while uploads,
deletes and inference requests are in flight, then restarted on the same store. The store must
hold every acknowledged upload (201) and none that was acknowledged deleted (204); an operation
cut off by the kill may have landed or not, but never half; every adapter left serves its exact
outputs, and no temporary folder survives the restart."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.server import running_server
from tests.conftest import ADMIN_TOKEN
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GEN_TOKENS, GENERATE_PROMPTS, RefAdapter, zip_folder
from tests.helpers.s3 import new_bucket

pytestmark = pytest.mark.usefixtures("tiny_base_env")  # servers of the tiny model

KINDS = ("cls-4", "gen-qv-r8")  # uploaded in turns under new names
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SERVER = {"admin_token": ADMIN_TOKEN, "device": "cpu", "log_level": "info"}  # ADAPTERSERVE_* values


@dataclass
class Ledger:
    """What the clients were told, and what was cut off."""

    kind_of: dict[str, str] = field(default_factory=dict)  # every name ever sent -> its adapter kind
    uploaded: set[str] = field(default_factory=set)  # 201
    deleted: set[str] = field(default_factory=set)  # 204
    cut: set[str] = field(default_factory=set)  # upload or delete without an answer
    server_errors: list[str] = field(default_factory=list)
    served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def live(self) -> list[str]:
        with self.lock:
            return sorted(self.uploaded - self.deleted)


def _upload(http: httpx.Client, url: str, name: str, data: bytes) -> int:
    files = {"file": (f"{name}.zip", data, "application/zip")}
    return http.post(f"{url}/admin/adapters", headers=ADMIN, data={"name": name}, files=files).status_code


def _uploads_and_deletes(url: str, prefix: str, archives: dict[str, bytes], ledger: Ledger) -> None:
    with httpx.Client(timeout=60) as http:
        for i in range(10_000):
            name, kind = f"{prefix}{i}", KINDS[i % 2]
            with ledger.lock:
                ledger.kind_of[name] = kind
            try:
                status = _upload(http, url, name, archives[kind])
                if status == 201:
                    with ledger.lock:
                        ledger.uploaded.add(name)
                deleted = i % 3 == 2 and (  # every third one is deleted again at once
                    http.delete(f"{url}/admin/adapters/{name}", headers=ADMIN).status_code == 204
                )
                if deleted:
                    with ledger.lock:
                        ledger.deleted.add(name)
            except httpx.TransportError:
                ledger.cut.add(name)
                return
            if status >= 500:
                ledger.server_errors.append(f"upload {name}: {status}")
            time.sleep(0.05)  # room for the inference traffic on a small machine


def _traffic(url: str, ledger: Ledger) -> None:
    with httpx.Client(timeout=60) as http:
        while True:
            for name in ledger.live()[-4:] or ["-"]:
                try:
                    resp = _ask(http, url, name, ledger.kind_of.get(name, "cls-4"))
                except httpx.TransportError:
                    return
                if resp.status_code >= 500:
                    ledger.server_errors.append(f"{name}: {resp.status_code} {resp.text[:200]}")
                ledger.served += resp.status_code == 200


def _ask(http: httpx.Client, url: str, name: str, kind: str) -> httpx.Response:
    if kind == "cls-4":
        return http.post(f"{url}/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS})
    body = {"adapter": name, "prompt": GENERATE_PROMPTS[0], "max_new_tokens": GEN_TOKENS}
    return http.post(f"{url}/generate", json=body)


def _check_serves(url: str, name: str, kind: str, refs: dict[str, RefAdapter]) -> None:
    with httpx.Client(timeout=60) as http:
        resp = _ask(http, url, name, kind)
    assert resp.status_code == 200, (name, resp.text)
    ref = refs[kind]
    if kind == "cls-4":
        for result, probs in zip(resp.json()["results"], ref.probs, strict=True):
            for label, p in zip(ref.labels, probs, strict=True):
                assert abs(result["scores"][label] - p) <= 1e-4, name
    else:
        assert resp.json()["text"] == ref.texts[GENERATE_PROMPTS[0]], name


@pytest.mark.parametrize(("backend", "kill_after_s"), [("filesystem", 1.0), ("s3", 3.0)])
def test_sigkill_during_uploads_deletes_and_traffic_loses_nothing_acknowledged(
    ref_adapters: dict[str, RefAdapter],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    backend: str,
    kill_after_s: float,
) -> None:
    folder = tmp_path_factory.mktemp("killed-store")
    store: Path | str = folder
    if backend == "s3":
        env: dict[str, str] = request.getfixturevalue("s3_env")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        store = new_bucket(env)
    scratch = tmp_path_factory.mktemp("server-tmpdir")  # the servers' TMPDIR
    monkeypatch.setenv("TMPDIR", str(scratch))
    log = folder.parent / f"server-{backend}-{kill_after_s}.log"
    archives = {kind: zip_folder(ref_adapters[kind].folder) for kind in KINDS}
    ledger = Ledger()
    with running_server(store, log, **SERVER) as (proc, url):
        with httpx.Client(timeout=60) as http:  # two adapters that exist before the crash
            for i, kind in enumerate(KINDS):
                ledger.kind_of[f"base{i}"] = kind
                assert _upload(http, url, f"base{i}", archives[kind]) == 201
                ledger.uploaded.add(f"base{i}")
                _check_serves(url, f"base{i}", kind, ref_adapters)
        workers = [
            threading.Thread(target=_uploads_and_deletes, args=(url, "a", archives, ledger)),
            threading.Thread(target=_uploads_and_deletes, args=(url, "b", archives, ledger)),
            threading.Thread(target=_traffic, args=(url, ledger)),
            threading.Thread(target=_traffic, args=(url, ledger)),
        ]
        for w in workers:
            w.start()
        time.sleep(kill_after_s)
        os.kill(proc.pid, signal.SIGKILL)
        for w in workers:
            w.join(60)
    assert not ledger.server_errors, ledger.server_errors

    with running_server(store, log, **SERVER) as (_, url):
        names = {a["name"] for a in httpx.get(f"{url}/v1/adapters").json()["adapters"]}
        must = ledger.uploaded - ledger.deleted - ledger.cut
        must_not = ledger.deleted | (set(ledger.kind_of) - ledger.uploaded - ledger.cut)
        assert must <= names, f"acknowledged uploads lost: {sorted(must - names)}"
        assert not names & must_not, f"deleted or refused adapters present: {sorted(names & must_not)}"
        for name in sorted(names):  # whatever is there is whole: it serves its exact outputs
            _check_serves(url, name, ledger.kind_of[name], ref_adapters)
    if backend == "filesystem":
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
        assert not leftovers, f"temporary folders survived the restart: {leftovers}"
    spooled = [p.name for p in scratch.iterdir()]
    assert not spooled, f"temporary files left behind: {spooled}"
    print(
        f"\n{backend}, kill after {kill_after_s} s: {len(ledger.uploaded)} uploads acknowledged, "
        f"{len(ledger.deleted)} deletes, {len(ledger.cut)} cut off by the kill, "
        f"{ledger.served} inference answers; {len(names)} adapters after restart"
    )
