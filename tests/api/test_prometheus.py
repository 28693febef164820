"""A real Prometheus scrapes the running service on loopback: after mixed traffic, every PromQL
expression of the Grafana dashboard and of the alert rules evaluates without error and returns data."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from bench.server import free_port
from tests.conftest import upload_archive
from tests.deploy.test_manifests import ROOT, dashboard_module
from tests.helpers.peft_ref import GENERATE_PROMPTS, RefAdapter, zip_folder

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"


@pytest.fixture(scope="module")
def prometheus(live_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: apt-get install prometheus (make test does it)"
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "adapterserve",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [live_url.removeprefix("http://")]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "log.txt").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("prometheus did not start: " + (work / "log.txt").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _traffic(client: TestClient, round_: int) -> None:
    """Classification, generation (plain, streamed, OpenAI), a fresh adapter load, and refusals."""
    for text in ("Shares fell after the results.", "The striker scored twice."):
        assert client.post("/classify", json={"adapter": "cls-4", "inputs": text}).status_code == 200
    for adapter in ("gen-qv-r8", None, f"prom-gen-{round_}"):
        body = {"adapter": adapter, "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 4}
        assert client.post("/generate", json=body).status_code == 200
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.read()
    chat = {"model": "gen-qv-r8", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    pair = ["gen-qv-r8", f"prom-gen-{round_}"]
    for merge in ("average", "cat"):  # compositions: an ensemble and a merge
        body = {"adapters": pair, "merge": merge, "prompt": GENERATE_PROMPTS[0], "max_new_tokens": 2}
        assert client.post("/generate", json=body).status_code == 200
    assert client.post("/classify", json={"adapter": "no-such", "inputs": "x"}).status_code == 404
    assert client.post("/generate", json={"prompt": ""}).status_code == 422


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", (expr, resp)
    result: list[dict[str, Any]] = resp["data"]["result"]
    return result


def _grafana(expr: str) -> str:
    """The expression as Grafana would send it, with the dashboard's variables filled in."""
    return expr.replace("$__rate_interval", "30s").replace("$adapter", ".*").replace("$tenant", ".*")


def test_dashboard_and_alert_expressions_evaluate_with_data(
    prometheus: str, client: TestClient, uploaded: dict[str, RefAdapter]
) -> None:
    for round_ in range(2):  # rates need two scrapes with traffic between them
        archive = zip_folder(uploaded["gen-qv-r8"].folder)
        resp = upload_archive(client, f"prom-gen-{round_}", archive)
        assert resp.status_code == 201, resp.text
        _traffic(client, round_)
        time.sleep(2.5)
    deadline = time.monotonic() + 30  # (a loaded machine may scrape late: wait for two scrapes' rate)
    while not _query(prometheus, "rate(adapterserve_requests_total[30s])") and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.5)
    up = _query(prometheus, 'up{job="adapterserve"}')
    assert up and up[0]["value"][1] == "1"
    assert not _query(prometheus, 'adapterserve_requests_total{endpoint="/metrics"}')  # scrapes not counted

    module = dashboard_module()
    for title, (_, queries, _) in (module.PANELS | module.TENANT_PANELS).items():
        for legend, expr in queries:
            result = _query(prometheus, _grafana(expr))
            assert result, f"panel {title!r} ({legend}) returned no data: {expr}"

    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    deadline = time.monotonic() + 10  # every rule evaluated by Prometheus itself, without error
    while time.monotonic() < deadline:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        if len(loaded) == len(rules) and all(
            r.get("lastEvaluation", "").startswith("2") for r in loaded.values()
        ):
            break
        time.sleep(0.5)
    assert set(loaded) == {r["alert"] for r in rules}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["state"] == "inactive", (name, rule)  # a healthy service raises no alert
    for rule in rules:
        _query(prometheus, rule["expr"])
        measured = re.split(r"\s(?:>|<|==)\s[\d.]+\s*$", rule["expr"].strip())[0]
        assert measured != rule["expr"].strip(), rule["alert"]
        assert _query(prometheus, measured), f"alert {rule['alert']}: no data for {measured}"
