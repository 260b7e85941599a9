"""`gateway slo-rules`: the real command's output passes `promtool check rules` and the unit tests
of tests/data/slo_rules_test.yml (the page alert fires on its input series); the thresholds are
the control plane's; services map to routes with --gateway-config; bad configs exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from gateway.control.config import load
from tests.harness import gateway_yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CONTROL = DATA / "slo_control.yaml"


def slo_rules(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway", "slo-rules", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def promtool(cwd: Path, *args: str) -> str:
    assert shutil.which("promtool"), "promtool is not installed (apt-get install prometheus)"
    r = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_rules_pass_promtool_check_and_unit_tests(tmp_path):
    r = slo_rules("--config", str(CONTROL))
    assert r.returncode == 0, r.stderr
    (tmp_path / "slo_rules.yml").write_text(r.stdout)
    shutil.copy(DATA / "slo_rules_test.yml", tmp_path / "slo_rules_test.yml")
    assert "SUCCESS: 48 rules found" in promtool(tmp_path, "check", "rules", "slo_rules.yml")
    promtool(tmp_path, "test", "rules", "slo_rules_test.yml")


def test_thresholds_are_the_control_planes_scaled_for_the_window():
    r = slo_rules("--config", str(CONTROL))
    doc = yaml.safe_load(r.stdout)
    alerts = {(rule["labels"]["slo"], rule["labels"]["severity"]): rule["expr"]
              for g in doc["groups"] for rule in g["rules"] if "alert" in rule}
    records = {rule["record"] for g in doc["groups"] for rule in g["rules"] if "record" in rule}
    assert {f"slo:sli_error:ratio_rate{w}" for w in
            ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d", "7d")} <= records
    for s in load(CONTROL).slos:
        for rule, threshold in s.rules():
            expr = alerts[(s.id, rule.tier)]
            limit = f"({threshold:.6g} * {s.budget_fraction:.12g})"
            assert f"slo:sli_error:ratio_rate{rule.long}{{slo=\"{s.id}\", service=\"" \
                   f"{s.service}\"}} > {limit}" in expr
            assert f"slo:sli_error:ratio_rate{rule.short}{{slo=\"{s.id}\", service=\"" \
                   f"{s.service}\"}} > {limit}" in expr
    # 30 days: 14.4 / 6 / 3 / 1; a 7-day window scales them by 7/30
    assert "(14.4 * 0.001)" in alerts[("pay-availability", "page")]
    assert "(3.36 * 0.005)" in alerts[("search-availability", "page")]
    assert "(0.233333 * 0.005)" in alerts[("search-availability", "ticket")]
    assert 'code=~"5..|429"' in r.stdout                           # count_429
    assert "# pay-availability: series of upstream 'payments'" in r.stdout


def test_services_map_to_their_routes_with_the_gateway_config(tmp_path):
    gw = tmp_path / "gateway.yaml"
    gw.write_text(gateway_yaml(["http://127.0.0.1:9"], extra=(
        "  - {name: pay.v2, match: {path_prefix: /v2/pay}, upstream: up, service: payments}\n"
        "  - {name: pay-v1, match: {path_prefix: /pay}, upstream: up, service: payments}\n")))
    r = slo_rules("--config", str(CONTROL), "--gateway-config", str(gw))
    assert r.returncode == 0, r.stderr
    assert 'gateway_requests_total{route=~"pay-v1|pay\\\\.v2"}' in r.stdout
    assert 'upstream="payments"' not in r.stdout
    assert 'route="__none__"' in r.stdout          # search: no route serves it
    (tmp_path / "rules.yml").write_text(r.stdout)
    promtool(tmp_path, "check", "rules", "rules.yml")


def test_bad_config_exits_2_naming_the_key_and_no_slos_is_an_empty_file(tmp_path):
    bad = tmp_path / "control.yaml"
    bad.write_text("tokens: [{name: a, role: admin, token: t}]\n"
                   "slos: [{name: x, service: s, objective: 120}]\n")
    r = slo_rules("--config", str(bad))
    assert r.returncode == 2 and r.stdout == ""
    assert "slos[0].objective: must be a percentage" in r.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("tokens: [{name: a, role: admin, token: t}]\n")
    r = slo_rules("--config", str(empty))
    assert r.returncode == 0 and "defines no SLOs" in r.stderr
    assert yaml.safe_load(r.stdout) == {"groups": []}
    (tmp_path / "none.yml").write_text(r.stdout)
    promtool(tmp_path, "check", "rules", "none.yml")
