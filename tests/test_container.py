"""The Docker image's command, config and environment, without Docker: the admin listener must
be reachable on a non-loopback address (probes, Prometheus) and the HEALTHCHECK must pass.

The image is emulated from the Dockerfile itself: its ENV lines, WORKDIR, `COPY config
/etc/gateway`, ENTRYPOINT + CMD and HEALTHCHECK are parsed, and the command runs inside a
network namespace of its own (`unshare --net`) with a veth pair carrying 198.18.0.10 (a
benchmarking address, RFC 2544). Nothing leaves that namespace; the image's fixed ports
(8080, 9901, 9000, 9001) are free there whatever else runs on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "198.18.0.10"


def dockerfile() -> dict[str, object]:
    """The final stage's ENV, WORKDIR, entrypoint + command and healthcheck command."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)                      # join continuation lines
    final = text[text.rindex("\nFROM "):]
    env: dict[str, str] = {}
    out: dict[str, object] = {"env": env}
    for line in final.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif word == "WORKDIR":
            out["workdir"] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            out[word] = json.loads(rest)
        elif word == "HEALTHCHECK":
            out["healthcheck"] = json.loads(rest[rest.index(" CMD ") + 5:])
        elif word == "COPY" and rest.split()[0] == "config":
            out["config_dir"] = rest.split()[1]
    return out


def test_dockerfile_sets_a_reachable_admin_listener_and_a_healthcheck() -> None:
    image = dockerfile()
    assert image["env"]["GATEWAY_ADMIN_LISTEN"] == "0.0.0.0:9901"
    assert image["env"]["GATEWAY_LISTEN"] == "0.0.0.0:8080"
    assert "healthcheck" in image
    assert '"${GATEWAY_ADMIN_LISTEN:-127.0.0.1:9901}"' in (ROOT / "config/gateway.yaml").read_text()


# Runs inside the namespace: brings up the veth pair, starts the image's command, and reports
# what a remote prober sees on 198.18.0.10 as one JSON line.
INSIDE = r"""
import json, os, subprocess, sys, time, urllib.error, urllib.request
spec = json.loads(sys.argv[1])
for cmd in (["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "gw0", "type", "veth", "peer", "name", "gw1"],
            ["ip", "addr", "add", spec["address"] + "/24", "dev", "gw0"],
            ["ip", "link", "set", "gw0", "up"], ["ip", "link", "set", "gw1", "up"]):
    subprocess.run(cmd, check=True)

def get(url, token=None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)

proc = subprocess.Popen(spec["command"], cwd=spec["workdir"], env=spec["env"],
                        stdout=subprocess.DEVNULL, stderr=open(spec["log"], "wb"))
report = {}
try:
    admin = "http://" + spec["address"] + ":9901"
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        status, body = get(admin + "/readyz")
        if status == 200:
            break
        time.sleep(0.2)
    report["readyz"] = [status, body]
    report["metrics"] = get(admin + "/metrics")[0]
    report["admin_config"] = get(admin + "/admin/config")[0]
    report["proxy"] = get("http://" + spec["address"] + ":8080/")[0]
    hc = subprocess.run(spec["healthcheck"], env=spec["env"], timeout=10)
    report["healthcheck"] = hc.returncode
finally:
    proc.terminate()
    try:
        report["exit"] = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        report["exit"] = "killed"
print(json.dumps(report))
"""


@pytest.mark.timeout(90)
def test_image_command_serves_readyz_on_a_non_loopback_address(tmp_path: Path) -> None:
    assert shutil.which("unshare") and shutil.which("ip"), "needs util-linux and iproute2"
    image = dockerfile()
    # The image's filesystem: the config directory copied to /etc/gateway, an empty workdir.
    etc = tmp_path / "etc-gateway"
    shutil.copytree(ROOT / "config", etc)
    workdir = tmp_path / "workdir"
    workdir.mkdir()

    def in_tmp(arg: str) -> str:
        return arg.replace(str(image["config_dir"]), str(etc))

    entry = [*image["ENTRYPOINT"], *image["CMD"]]
    assert entry[0] == "gateway"
    command = [sys.executable, "-m", "gateway", *map(in_tmp, entry[1:])]
    healthcheck = list(image["healthcheck"])
    assert healthcheck[0] == "python"
    healthcheck[0] = sys.executable
    env = {"PATH": os.environ["PATH"], "HOME": str(workdir), "PYTHONPATH": str(ROOT),
           **image["env"]}
    spec = {"address": ADDRESS, "command": command, "workdir": str(workdir), "env": env,
            "healthcheck": healthcheck, "log": str(tmp_path / "gateway.log")}
    run = subprocess.run(["unshare", "--net", sys.executable, "-c", INSIDE, json.dumps(spec)],
                         capture_output=True, text=True, timeout=80)
    log = (tmp_path / "gateway.log").read_text() if (tmp_path / "gateway.log").exists() else ""
    assert run.returncode == 0, run.stderr + log
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["readyz"][0] == 200, (report, log)
    assert report["metrics"] == 200                 # Prometheus scrapes from another address
    assert report["admin_config"] == 403            # no token: the rest is loopback-only
    assert report["proxy"] == 200                   # the demo upstream behind the proxy
    assert report["healthcheck"] == 0
    assert report["exit"] == 0, log                 # SIGTERM drains and exits cleanly
