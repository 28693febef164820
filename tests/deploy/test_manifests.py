"""Deployment files: Kubernetes manifests against the Kubernetes schemas, the Grafana dashboard in
sync with its generator, the Prometheus config and rules through promtool."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parents[2]
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.33.0"


def dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard", ROOT / "deploy" / "grafana" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_schemas(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error


def test_the_kinds_the_deployment_needs_are_there() -> None:
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in K8S}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "Ingress",
        "ConfigMap",
    } <= kinds
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in container["lifecycle"]
    # the store URL from the ConfigMap, S3 credentials from an optional Secret
    env = {e["name"]: e for e in container["env"]}
    assert env["ADAPTERSERVE_STORE"]["valueFrom"]["configMapKeyRef"]["key"] == "store"
    assert {"name": "adapterserve-s3", "optional": True} in [e["secretRef"] for e in container["envFrom"]]
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    assert set(config["data"]) >= {"store", "store-sync-interval-s"}
    # routing: ingress-nginx hashes on the X-Adapter header
    ingress = yaml.safe_load((ROOT / "deploy" / "k8s" / "ingress.yaml").read_text())
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        == "$http_x_adapter"
    )


def test_tenants_secret_mount_and_the_inference_gateway_files() -> None:
    from app.metrics import Metrics
    from app.tenants import parse_tenants

    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = yaml.safe_load((ROOT / "deploy" / "k8s" / "tenants-secret.yaml").read_text())
    path = Path(env["ADAPTERSERVE_TENANTS_FILE"]["value"])
    assert mounts["tenants"]["mountPath"] == str(path.parent) and "subPath" not in mounts["tenants"]
    assert volumes["tenants"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert parse_tenants(secret["stringData"][path.name]) == {}  # the example lists no keys
    # the InferencePool selects the deployment's pods; the EPP reads metrics this service exports
    pool, route = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway" / "inferencepool.yaml").read_text())
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["kind"] == "InferencePool" and pool["spec"]["selector"]["matchLabels"] == labels
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]
    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "gateway" / "epp-values.yaml").read_text())
    exported = Metrics().render().decode()
    for flag, metric in values["inferenceExtension"]["flags"].items():
        assert f"# TYPE {metric} gauge" in exported, (flag, metric)


def test_dashboard_json_is_the_generators_output() -> None:
    committed = (ROOT / "deploy" / "grafana" / "dashboards" / "adapterserve.json").read_text()
    assert committed == dashboard_module().render(), "run: python deploy/grafana/dashboard.py > ...json"
    panels = json.loads(committed)["panels"]
    module = dashboard_module()
    rows = [p for p in panels if p["type"] == "row"]
    assert len(panels) == len(module.PANELS) + len(module.TENANT_PANELS) + 1
    assert all(p["targets"] for p in panels if p["type"] != "row")
    assert [r["repeat"] for r in rows] == ["tenant"]  # one row per tenant


@pytest.mark.prometheus
def test_promtool_checks_the_config_and_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (make test does it)"
    for args in (["check", "config"], ["check", "rules"]):
        target = "prometheus.yml" if args[1] == "config" else "rules.yml"
        proc = subprocess.run(
            [promtool, *args, str(ROOT / "deploy" / "prometheus" / target)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
