"""control.yaml loading and validation; `run()` as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from gateway.control.config import ControlConfig, is_control_config, load, load_text
from gateway.errors import ConfigError
from tests.conftest import ROOT, free_port, wait_port

GOOD = """
listen: "127.0.0.1:9100"
database: "data/c.db"
tokens:
  - {name: ops, role: admin, token: "${ADMIN_TOK}"}
  - {name: gw, role: gateway, token: "${INGEST_TOK:-ingest-default}"}
slos: [{name: api, service: svc, objective: 99.9}]
cost_models: {svc: {per_request: 0.001}}
budgets: []
notifications: [{name: hook, url: "http://x"}]
"""


def test_load_good_config():
    cfg = load_text(GOOD, env={"ADMIN_TOK": "s3cret"})
    assert cfg.listen == "127.0.0.1:9100" and cfg.database == "data/c.db"
    assert [(t.name, t.role, t.token) for t in cfg.tokens] == [
        ("ops", "admin", "s3cret"), ("gw", "gateway", "ingest-default")]
    # slos and notifications are parsed (see test_control_slo.py)
    assert [(s.name, s.service, s.objective) for s in cfg.slos] == [("api", "svc", 99.9)]
    assert cfg.cost_models == {"svc": {"per_request": 0.001}}
    assert [(t.name, t.url, t.format) for t in cfg.notifications] == [
        ("hook", "http://x", "alertmanager")]
    assert "s3cret" not in repr(cfg)


def test_defaults():
    cfg = load_text("tokens: [{name: a, role: admin, token: t}]", env={})
    assert cfg.listen == "127.0.0.1:9000" and cfg.database == "var/control.db"
    assert cfg.slos == () and cfg.budgets == ()


@pytest.mark.parametrize("text,errors", [
    ("tokens: [{name: a, role: admin, token: t}]\nlisen: x",
     ["lisen: unknown key (did you mean 'listen'?)"]),
    ("tokens: [{name: a, role: root, token: t}]",
     ["tokens[0].role: must be one of admin, monitor, reader, gateway, got 'root'"]),
    ("tokens: [{name: a, role: admin}]", ["tokens[0].token: is required"]),
    ("tokens: [{name: a, role: admin, token: t, extra: 1}]", ["tokens[0].extra: unknown key"]),
    ("tokens: [{name: a, role: admin, token: t}, {name: a, role: reader, token: u}]",
     ["tokens[1].name: duplicate name 'a' (also tokens[0])"]),
    ("tokens: [{name: a, role: admin, token: t}, {name: b, role: reader, token: t}]",
     ["tokens[1].token: the same token as tokens[0] (each token must map to one name and "
      "role)"]),
    ("tokens: [{name: a, role: admin, token: ''}]", ["tokens[0].token: must not be empty"]),
    ("tokens: []", ["tokens: must list at least one token"]),
    ("database: x", ["tokens: is required"]),
    ("tokens: [{name: a, role: admin, token: t}]\nlisten: nope",
     ["listen: must be host:port (e.g. 127.0.0.1:8080), got 'nope'"]),
    ("tokens: [{name: a, role: admin, token: t}]\nslos: {a: 1}", ["slos: must be a list, got a mapping"]),
    ("tokens: [{name: a, role: admin, token: t}]\nbudgets: [1]",
     ["budgets[0]: must be a mapping, got an integer"]),
    ("tokens: [{name: a, role: admin, token: t}]\ncost_models: 3",
     ["cost_models: must be a list or a mapping, got an integer"]),
    ("tokens: [{name: a, role: admin, token: '${NOPE}'}]",
     ["${NOPE}: environment variable is not set (use ${NOPE:-default})",
      "tokens[0].token: must not be empty"]),
    ("tokens: [{name: a, role: admin, token: t}]\ndatabase: 'postgresql:///gw'",
     ["database: a postgresql:// URL needs a host (postgresql://user:pass@host:port/db)"]),
    ("tokens: [{name: a, role: admin, token: t}]\ndatabase: 'postgresql://db.internal:5432'",
     ["database: a postgresql:// URL needs a database name (postgresql://user:pass@host:port/db)"]),
    ("tokens: [", None),
])
def test_errors_name_the_key(text, errors):
    with pytest.raises(ConfigError) as exc:
        load_text(text, env={})
    if errors is None:
        assert exc.value.errors[0].startswith("<yaml>:")
    else:
        assert exc.value.errors == errors


def test_shipped_control_yaml_is_valid_and_detected():
    cfg = load(ROOT / "config" / "control.yaml", env={})
    assert isinstance(cfg, ControlConfig)
    assert {t.role for t in cfg.tokens} == {"admin", "monitor", "reader", "gateway"}
    gw_token = next(t.token for t in cfg.tokens if t.role == "gateway")
    assert gw_token == "dev-ingest-token"    # = control_plane.token's default in gateway.yaml
    assert is_control_config(yaml.safe_load((ROOT / "config" / "control.yaml").read_text()))
    assert not is_control_config(yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text()))
    assert not is_control_config({"tokens": [], "routes": []})
    assert not is_control_config(None) and not is_control_config({"listen": "x"})


def _run_control(tmp_path: Path, *log_level: str) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    cfg = tmp_path / "control.yaml"
    cfg.write_text(f'listen: "127.0.0.1:{port}"\ndatabase: "db/c.db"\n'
                   "tokens: [{name: a, role: admin, token: tok}]\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *log_level, "control", "--config", str(cfg)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return port, proc


def test_log_level_is_honoured_by_the_control_plane(tmp_path: Path):
    port, proc = _run_control(tmp_path, "--log-level", "warning")
    try:
        wait_port(port, timeout=15)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [orjson.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert not [doc for doc in lines if doc["level"] == "info"], lines


def test_run_serves_logs_and_stops_on_sigterm(tmp_path: Path):
    port, proc = _run_control(tmp_path)
    try:
        wait_port(port, timeout=15)
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert orjson.loads(resp.read()) == {"status": "ok"}
        assert (tmp_path / "db" / "c.db").exists()          # relative to the working directory
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [orjson.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    started = [doc for doc in lines if doc.get("event") == "control_started"]
    assert started and started[0]["listen"] == f"127.0.0.1:{port}"


def test_run_with_a_bad_config_exits_2(tmp_path: Path, capsys):
    from gateway.control.app import run
    bad = tmp_path / "c.yaml"
    bad.write_text("tokens: [{name: a, role: boss, token: t}]\n")
    started = time.monotonic()
    assert run(str(bad)) == 2
    assert time.monotonic() - started < 5
    assert "tokens[0].role: must be one of" in capsys.readouterr().err
