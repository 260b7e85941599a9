"""deploy/kubernetes/: every manifest valid against the Kubernetes schemas (kubernetes-validate,
offline: it ships them), the Prometheus Operator's ServiceMonitor checked structurally, the
wiring between objects consistent, the shutdown timing fitting drain_s, and every embedded
gateway or control-plane config accepted by `gateway check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30"          # native preStop `sleep` is GA from 1.30
FILES = sorted(DEPLOY.glob("*.yaml"))
# The Secret the README tells operators to create; `gateway check` needs every ${VAR} set.
SECRET_ENV = {"GATEWAY_ADMIN_TOKEN": "a", "GATEWAY_INGEST_TOKEN": "i", "SERVICE_NAME": "orders",
              "CONTROL_ADMIN_TOKEN": "c", "CONTROL_MONITOR_TOKEN": "m",
              "CONTROL_DATABASE_URL": "postgresql://control:secret@db.example:5432/control"}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for f in FILES for d in docs(f) if d["kind"] == kind]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in by_kind("Deployment") + by_kind("StatefulSet")]


def test_the_three_layouts_are_there() -> None:
    assert {f.name for f in FILES} >= {"edge.yaml", "sidecar.yaml", "control-plane.yaml"}
    assert (DEPLOY / "README.md").exists()
    kinds = {d["kind"] for f in FILES for d in docs(f)}
    assert kinds >= {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                     "ServiceMonitor", "StatefulSet", "PodDisruptionBudget"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in docs(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; checked below
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_validator_rejects_a_broken_manifest() -> None:
    """The check above is not vacuous: a typo in a probe is caught."""
    doc = docs(DEPLOY / "edge.yaml")[1]
    assert doc["kind"] == "Deployment"
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_service_monitors_select_a_service_and_a_named_port() -> None:
    services = by_kind("Service")
    monitors = by_kind("ServiceMonitor")
    assert len(monitors) == 3
    for mon in monitors:
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(mon) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(mon["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        match = mon["spec"]["selector"]["matchLabels"]
        selected = [s for s in services
                    if match.items() <= s["metadata"].get("labels", {}).items()]
        assert len(selected) == 1, (mon["metadata"]["name"], [s["metadata"]["name"]
                                                              for s in selected])
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        assert mon["spec"]["endpoints"], mon["metadata"]["name"]
        for ep in mon["spec"]["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert ep["port"] in port_names and ep["path"] == "/metrics"
            assert ep["interval"].endswith("s") and int(ep["interval"][:-1]) > 0


def test_services_and_hpa_point_at_existing_workloads_and_ports() -> None:
    workloads = {d["metadata"]["name"]: d for d in by_kind("Deployment") + by_kind("StatefulSet")}
    for svc in by_kind("Service"):
        sel = svc["spec"]["selector"]
        matching = [w for w in workloads.values()
                    if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in matching[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)
    for hpa in by_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert workloads[ref["name"]]["kind"] == ref["kind"]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        target = workloads[ref["name"]]["spec"]["template"]["spec"]["containers"][0]
        assert "cpu" in target["resources"]["requests"]   # utilisation needs a request
    stateful = by_kind("StatefulSet")
    assert [s["spec"]["replicas"] for s in stateful] == [1]   # SQLite: one writer


def _gateway_config(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The gateway container, its ConfigMap's config text (found through the volume mount)."""
    containers = [c for c in pod["containers"] if c["image"].startswith("gateway:")]
    assert len(containers) == 1
    gw = containers[0]
    config_path = gw.get("args", gw.get("command"))[-1]
    mount = next(m for m in gw["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = next(c for c in by_kind("ConfigMap")
              if c["metadata"]["name"] == volume["configMap"]["name"])
    text = cm["data"][config_path[len(mount["mountPath"]) + 1:]]
    return gw, cm, text


@pytest.mark.parametrize("name", ["gateway-edge", "orders", "gateway-control",
                                  "gateway-control-pg"])
def test_embedded_configs_pass_gateway_check(name: str, tmp_path: Path) -> None:
    pod = dict(pod_specs())[name]
    gw, _cm, text = _gateway_config(pod)
    env_names = {e["name"] for e in gw.get("env", [])}
    # every variable the config needs comes from the container's env
    for var in SECRET_ENV:
        if "${" + var in text:
            assert var in env_names, (name, var)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    env = {**os.environ, **SECRET_ENV, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(path)],
                         capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok: ")


@pytest.mark.parametrize("name", ["gateway-edge", "orders"])
def test_probes_on_the_admin_port_and_grace_period_fits_drain(name: str) -> None:
    pod = dict(pod_specs())[name]
    gw, _cm, text = _gateway_config(pod)
    cfg = yaml.safe_load(text)
    admin_port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
    assert cfg["admin"]["listen"].startswith("0.0.0.0:")          # reachable by the kubelet
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports["admin"] == admin_port
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pre_stop = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 1
    # preStop, then drain_s for in-flight requests, then a few seconds for the final flush
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + cfg["drain_s"] + 5
    for other in pod["containers"]:
        if other is not gw:      # the app outlives the gateway's drain (sidecar)
            assert other["lifecycle"]["preStop"]["sleep"]["seconds"] >= pre_stop + cfg["drain_s"]
