"""Three real server processes on one store, for each backend (a folder, and an S3 server over
HTTP): a change made through any replica reaches every replica within the bound, running
generations finish on the version they started with, concurrent uploads of one name all land."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.adapters.objects import open_objects
from app.adapters.store import AdapterStore
from bench.server import running_servers
from tests.conftest import ADMIN_TOKEN
from tests.helpers.peft_ref import CLASSIFY_TEXTS, GENERATE_PROMPTS, RefAdapter, zip_folder
from tests.helpers.s3 import aws_env, new_bucket

pytestmark = pytest.mark.usefixtures("tiny_base_env")  # servers of the tiny model

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SYNC_S = 0.5  # each replica's sync interval here; the bound asserted below is the documented default
BOUND_S = 2.0
LONG = 1200  # new tokens of the generations that run across a replace or a delete (~3 s, tiny model)


@contextmanager
def fleet(store: str, logs: Path, env: dict[str, str]) -> Iterator[list[str]]:
    """Three ``adapterserve serve`` processes on ``store``; yields their URLs."""
    settings = {
        "admin_token": ADMIN_TOKEN,
        "device": "cpu",
        "store_sync_interval_s": str(SYNC_S),
        "max_new_tokens": str(LONG),
    }
    with aws_env(env), running_servers(3, store, logs, **settings) as started:
        yield [url for _, url in started]


def _upload(url: str, name: str, folder: Path) -> httpx.Response:
    files = {"file": (f"{name}.zip", zip_folder(folder), "application/zip")}
    return httpx.post(f"{url}/admin/adapters", headers=ADMIN, data={"name": name}, files=files, timeout=120)


def _scores(url: str, name: str) -> list[dict[str, float]] | int:
    resp = httpx.post(f"{url}/classify", json={"adapter": name, "inputs": CLASSIFY_TEXTS}, timeout=60)
    return [r["scores"] for r in resp.json()["results"]] if resp.status_code == 200 else resp.status_code


def _generate(url: str, name: str, tokens: int) -> dict[str, Any]:
    body = {"adapter": name, "prompt": GENERATE_PROMPTS[1], "max_new_tokens": tokens, "min_tokens": tokens}
    resp = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _version(url: str, name: str) -> int | None:
    resp = httpx.get(f"{url}/v1/adapters/{name}", timeout=10)
    return int(resp.json()["version"]) if resp.status_code == 200 else None


def _pinned(url: str, name: str) -> bool:
    resp = httpx.get(f"{url}/v1/adapters/{name}", timeout=10).json()
    return bool(resp["pinned"]) and resp["tier"] == "device"


def _within(bound: float, check: Callable[[], bool]) -> float:
    """Seconds until ``check()`` holds; fails past ``bound``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start <= bound, f"not converged within {bound} s"
        time.sleep(0.05)
    return time.monotonic() - start


def _close(a: list[dict[str, float]] | int, ref: RefAdapter) -> bool:
    return not isinstance(a, int) and all(
        abs(row[label] - p) <= 1e-4
        for row, probs in zip(a, ref.probs, strict=True)
        for label, p in zip(ref.labels, probs, strict=True)
    )


def _during_a_generation(url: str, expected: str, change: Callable[[], httpx.Response]) -> None:
    """Run a generation of adapter ``talk`` on ``url`` and make ``change`` while it runs; the
    generation's text must be ``expected`` (its version's)."""
    got: dict[str, Any] = {}
    running = threading.Thread(target=lambda: got.update(_generate(url, "talk", LONG)))
    running.start()
    time.sleep(0.3)  # under way
    assert change().status_code in (201, 204)
    running.join(120)
    assert got["text"] == expected


@pytest.fixture(params=["filesystem", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    if request.param == "filesystem":
        return str(tmp_path / "store"), {}
    env: dict[str, str] = request.getfixturevalue("s3_env")
    return new_bucket(env), env


def test_three_replicas_converge_on_one_store(
    store_url: tuple[str, dict[str, str]], ref_adapters: dict[str, RefAdapter], tmp_path: Path
) -> None:
    store, env = store_url
    refs = ref_adapters
    lags: dict[str, float] = {}
    with fleet(store, tmp_path, env) as (a, b, c):
        # upload on A: B answers at once (a miss looks in the store), C lists it within the bound
        assert _upload(a, "shared", refs["cls-4"].folder).status_code == 201
        assert _close(_scores(b, "shared"), refs["cls-4"])
        lags["upload"] = _within(BOUND_S, lambda: _version(c, "shared") == 1)
        assert _close(_scores(c, "shared"), refs["cls-4"])

        # a pin made through A holds on every replica; an unpin through C releases it everywhere
        assert httpx.put(f"{a}/admin/adapters/shared/pin", headers=ADMIN).json()["pinned"] is True
        lags["pin"] = _within(BOUND_S, lambda: all(_pinned(u, "shared") for u in (b, c)))
        assert httpx.delete(f"{c}/admin/adapters/shared/pin", headers=ADMIN).json()["pinned"] is False
        lags["unpin"] = _within(BOUND_S, lambda: not any(_pinned(u, "shared") for u in (a, b)))

        # replace on B: all three serve the new version, exactly as a fresh upload of its files
        assert _upload(b, "shared", refs["cls-pattern"].folder).json()["version"] == 2
        assert _upload(a, "fresh", refs["cls-pattern"].folder).status_code == 201
        lags["replace"] = _within(BOUND_S, lambda: all(_version(u, "shared") == 2 for u in (a, b, c)))
        for url in (a, b, c):
            assert _scores(url, "shared") == _scores(url, "fresh")
            assert _close(_scores(url, "shared"), refs["cls-pattern"])

        # a composition named through A: B serves it at once, C lists it within the bound; the
        # member it uses cannot be deleted through C; deleted through B, it is gone everywhere
        body = {"name": "pair", "members": ["shared", "fresh"], "method": "mean"}
        assert httpx.post(f"{a}/admin/compositions", json=body, headers=ADMIN).status_code == 201
        ensemble = _scores(b, "pair")
        assert not isinstance(ensemble, int) and not isinstance(_scores(b, "shared"), int)
        lags["composition"] = _within(
            BOUND_S,
            lambda: "pair" in {x["name"] for x in httpx.get(f"{c}/v1/adapters").json()["compositions"]},
        )
        assert _scores(c, "pair") == ensemble
        assert httpx.delete(f"{c}/admin/adapters/fresh", headers=ADMIN).status_code == 409
        assert httpx.delete(f"{b}/admin/compositions/pair", headers=ADMIN).status_code == 204
        lags["composition-delete"] = _within(BOUND_S, lambda: all(_scores(u, "pair") == 404 for u in (a, c)))

        # delete on C: A and B answer 404 and list nothing of it within the bound
        assert httpx.delete(f"{c}/admin/adapters/shared", headers=ADMIN).status_code == 204
        lags["delete"] = _within(
            BOUND_S,
            lambda: all(
                _scores(u, "shared") == 404
                and "shared" not in {x["name"] for x in httpx.get(f"{u}/v1/adapters").json()["adapters"]}
                for u in (a, b)
            ),
        )

        # a generation running on A across a replace (through B) and a delete (through C)
        # finishes on the version it started with
        assert _upload(a, "talk", refs["gen-qv-r8"].folder).status_code == 201
        expected = _generate(a, "talk", LONG)
        assert expected["usage"]["completion_tokens"] == LONG
        _during_a_generation(a, expected["text"], lambda: _upload(b, "talk", refs["gen-all-rslora"].folder))
        assert _upload(a, "talk", refs["gen-qv-r8"].folder).json()["version"] == 3
        _during_a_generation(
            a, expected["text"], lambda: httpx.delete(f"{c}/admin/adapters/talk", headers=ADMIN)
        )
        lags["delete-after-run"] = _within(BOUND_S, lambda: _version(a, "talk") is None)

        # concurrent uploads of one name through A and B: both acknowledged, one current version
        answers: dict[str, httpx.Response] = {}
        racers = [
            threading.Thread(target=lambda u=u, r=r: answers.update({u: _upload(u, "race", refs[r].folder)}))
            for u, r in ((a, "cls-4"), (b, "cls-pattern"))
        ]
        for t in racers:
            t.start()
        for t in racers:
            t.join(120)
        versions = sorted(r.json()["version"] for r in answers.values())
        assert [r.status_code for r in answers.values()] == [201, 201] and versions[0] != versions[1]
        winner = "cls-4" if answers[a].json()["version"] == versions[1] else "cls-pattern"
        lags["race"] = _within(BOUND_S, lambda: all(_version(u, "race") == versions[1] for u in (a, b, c)))
        for url in (a, b, c):
            assert _close(_scores(url, "race"), refs[winner])
    with aws_env(env):
        recorded = AdapterStore(open_objects(store), tmp_path / "check")._listing()[0]["race"]
    assert set(versions) <= set(recorded)  # both acknowledged versions are in the store's history
    backend = "s3" if store.startswith("s3://") else "filesystem"
    print(f"\nconvergence on {backend}: " + ", ".join(f"{k} {v:.2f} s" for k, v in lags.items()))
