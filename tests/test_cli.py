"""`gateway admin ...` and `gateway ctl ...` against a real `gateway run` and a real
`gateway control`: tables, --json, tokens from the environment, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, wait_port
from tests.harness import GatewayProcess, gateway_yaml, write_config

ADMIN_TOKEN = "cli-admin-token"
CONTROL_ADMIN = "cli-control-admin"
CONTROL_READER = "cli-control-reader"


def gw_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=30,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("cli-gw")
    port, admin_port = free_port(), free_port()
    dead = f"http://127.0.0.1:{free_port()}"      # nothing listens: the breaker can open
    text = gateway_yaml([dead], listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin_port}",
                        upstream_extra="breaker: {failure_threshold: 1, reset_timeout_s: 300}",
                        route_extra="limits: [per_ip]",
                        extra="limits:\n  - {name: per_ip, key: ip_address, rate: 10/second, "
                              "burst: 4}\n")
    text = text.replace(f'admin: {{listen: "127.0.0.1:{admin_port}"}}',
                        f'admin: {{listen: "127.0.0.1:{admin_port}", token: "{ADMIN_TOKEN}"}}')
    gw = GatewayProcess(write_config(tmp, text), port, admin_port)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cli-cp")
    port = free_port()
    path = tmp / "control.yaml"
    path.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'database: "{tmp / "control.db"}"\n'
        "tokens:\n"
        f"  - {{name: root, role: admin, token: {CONTROL_ADMIN}}}\n"
        f"  - {{name: viewer, role: reader, token: {CONTROL_READER}}}\n"
        "slos:\n"
        "  - {name: svc-availability, service: svc, objective: 99.9, sli: availability, "
        "window: 30d}\n")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "control", "--config", str(path)],
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_port(port, timeout=15)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def admin_env(gw: GatewayProcess, token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"GATEWAY_ADMIN_URL": gw.admin, "GATEWAY_ADMIN_TOKEN": token}


def ctl_env(url: str, token: str = CONTROL_ADMIN) -> dict[str, str]:
    return {"GATEWAY_CONTROL_URL": url, "GATEWAY_CONTROL_TOKEN": token}


def post(url: str, body: dict[str, Any], token: str = CONTROL_ADMIN) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


# --- gateway admin ----------------------------------------------------------------------------


def test_admin_breakers_table_json_and_reset(gateway: GatewayProcess) -> None:
    with pytest.raises(urllib.error.HTTPError):     # a 502 trips the one-failure breaker
        urllib.request.urlopen(gateway.url + "/x", timeout=5)
    run = gw_cli("admin", "breakers", env=admin_env(gateway))
    assert run.returncode == 0, run.stderr
    header, row = run.stdout.splitlines()[:2]
    assert header.split()[:3] == ["UPSTREAM", "STATE", "FAILURES"]
    assert row.split()[:2] == ["up", "open"]
    run = gw_cli("admin", "breakers", "--json", env=admin_env(gateway))
    doc = json.loads(run.stdout)
    assert [(b["upstream"], b["state"]) for b in doc] == [("up", "open")]

    run = gw_cli("admin", "reset", "up", env=admin_env(gateway))
    assert run.returncode == 0 and run.stdout.strip() == "up: closed", run
    run = gw_cli("admin", "reset", "nope", env=admin_env(gateway))
    assert run.returncode == 5
    assert run.stderr.startswith("gateway admin reset: not found (404)"), run.stderr


def test_admin_url_flag_overrides_the_environment(gateway: GatewayProcess) -> None:
    env = {"GATEWAY_ADMIN_URL": "http://127.0.0.1:1", "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    run = gw_cli("admin", "breakers", "--json", "--admin", gateway.admin, env=env)
    assert run.returncode == 0, run.stderr


def test_admin_reload_limits_test_and_config(gateway: GatewayProcess) -> None:
    run = gw_cli("admin", "reload", "--json", env=admin_env(gateway))
    assert run.returncode == 0, run.stderr
    version = json.loads(run.stdout)["version"]
    run = gw_cli("admin", "reload", env=admin_env(gateway))
    assert run.stdout.strip() == f"reloaded: config version {version}"

    run = gw_cli("admin", "limits-test", "--limit", "per_ip", "--key", "10.1.2.3",
                 "--requests", "3", "--json", env=admin_env(gateway))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["allowed"] is True and doc["remaining"] == 5     # capacity burst + 1: untouched
    run = gw_cli("admin", "limits-test", "--limit", "per_ip", "--key", "10.1.2.3",
                 "--requests", "9", env=admin_env(gateway))
    lines = dict(line.split(None, 1) for line in run.stdout.splitlines())
    assert lines["allowed"] == "False"
    run = gw_cli("admin", "limits-test", "--limit", "nope", "--key", "k", env=admin_env(gateway))
    assert run.returncode in (1, 5) and "nope" in run.stderr

    run = gw_cli("admin", "config", env=admin_env(gateway))
    assert run.returncode == 0, run.stderr
    assert f"version: {version}" in run.stdout and "per_ip" in run.stdout
    assert ADMIN_TOKEN not in run.stdout                    # redacted


def test_admin_auth_errors_and_unreachable(gateway: GatewayProcess) -> None:
    run = gw_cli("admin", "breakers", env={"GATEWAY_ADMIN_URL": gateway.admin})
    assert run.returncode == 4
    assert "not authorised (401)" in run.stderr and "set GATEWAY_ADMIN_TOKEN" in run.stderr
    run = gw_cli("admin", "breakers", env=admin_env(gateway, token="wrong"))
    assert run.returncode == 4 and "check GATEWAY_ADMIN_TOKEN" in run.stderr
    run = gw_cli("admin", "breakers", "--admin", f"http://127.0.0.1:{free_port()}")
    assert run.returncode == 3
    assert "cannot connect to http://127.0.0.1:" in run.stderr
    assert "refused" in run.stderr.lower()
    assert run.stdout == ""


# --- gateway ctl ------------------------------------------------------------------------------


def test_ctl_incidents_ack_and_resolve(control: str) -> None:
    inc = post(control + "/v1/incidents", {"title": "checkout errors", "severity": "SEV-2",
                                           "affected_service": "svc"})
    run = gw_cli("ctl", "incidents", env=ctl_env(control))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "SEV", "STATUS"]
    assert lines[1].split()[:4] == [inc["id"], "SEV-2", "investigating", "svc"]
    assert lines[1].endswith("checkout errors")

    run = gw_cli("ctl", "ack", inc["id"], "--reason", "on it", env=ctl_env(control))
    assert run.returncode == 0 and run.stdout.strip() == f"incident {inc['id']}: acknowledged"
    run = gw_cli("ctl", "resolve", inc["id"], env=ctl_env(control))       # no root cause
    assert run.returncode == 2 and "needs --root-cause and --notes" in run.stderr, run.stderr
    run = gw_cli("ctl", "resolve", inc["id"], "--root-cause", "bad deploy",
                 "--notes", "rolled back", "--json", env=ctl_env(control))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "resolved"
    run = gw_cli("ctl", "ack", "INC-1999-999", env=ctl_env(control))
    assert run.returncode == 5 and "not found (404)" in run.stderr


def test_ctl_alerts_ack_resolve(control: str) -> None:
    alert = post(control + "/v1/alerts", {"title": "latency high", "service": "svc",
                                          "severity": "ticket"})
    run = gw_cli("ctl", "alerts", "--open", env=ctl_env(control))
    assert run.returncode == 0, run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith(str(alert["id"])))
    assert row.split()[1:4] == ["ticket", "firing", "svc"]
    run = gw_cli("ctl", "ack", str(alert["id"]), env=ctl_env(control))
    assert run.returncode == 0 and run.stdout.strip() == f"alert {alert['id']}: acknowledged"
    run = gw_cli("ctl", "resolve", str(alert["id"]), "--json", env=ctl_env(control))
    assert run.returncode == 0 and json.loads(run.stdout)["status"] == "resolved"


def test_ctl_budgets(control: str) -> None:
    run = gw_cli("ctl", "budgets", env=ctl_env(control))
    assert run.returncode == 0, run.stderr
    header, row = run.stdout.splitlines()[:2]
    assert header.split()[:3] == ["SLO", "SERVICE", "OBJECTIVE"]
    assert row.split()[1] == "svc"
    run = gw_cli("ctl", "budgets", "--service", "svc", "--json", env=ctl_env(control))
    assert [b["service"] for b in json.loads(run.stdout)["budgets"]] == ["svc"]
    run = gw_cli("ctl", "budgets", "--service", "other", env=ctl_env(control))
    assert run.returncode == 5
    run = gw_cli("ctl", "budgets", "--cost", env=ctl_env(control))
    assert run.returncode == 0 and run.stdout.strip() == "(none)", run.stderr


def test_ctl_role_and_token_errors(control: str) -> None:
    run = gw_cli("ctl", "incidents", env=ctl_env(control, token=CONTROL_READER))
    assert run.returncode == 4 and "forbidden (403)" in run.stderr
    run = gw_cli("ctl", "incidents", env={"GATEWAY_CONTROL_URL": control})
    assert run.returncode == 4 and "set GATEWAY_CONTROL_TOKEN" in run.stderr
    run = gw_cli("ctl", "alerts", "--control", f"http://127.0.0.1:{free_port()}")
    assert run.returncode == 3 and "cannot connect" in run.stderr


def test_ctl_tenants_lists_plans_and_usage(control: str) -> None:
    req = urllib.request.Request(control + "/v1/tenants/acme", method="PUT",
                                 data=json.dumps({"plan": "starter"}).encode(),
                                 headers={"Authorization": f"Bearer {CONTROL_ADMIN}",
                                          "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).close()
    run = gw_cli("ctl", "tenants", env=ctl_env(control))
    assert run.returncode == 0, run.stderr
    header, *rows = run.stdout.splitlines()
    assert header.split()[:4] == ["TENANT", "PLAN", "SOURCE", "OVERRIDE"]
    assert any(r.split()[:2] == ["acme", "starter"] for r in rows), run.stdout
    run = gw_cli("ctl", "tenants", "--json", env=ctl_env(control))
    assert any(t["tenant"] == "acme" and t["plan"] == "starter"
               for t in json.loads(run.stdout)["tenants"])
