"""The `gateway` command: run, control, check, the operator commands admin and ctl (and the
bundled demo upstream)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from gateway import __version__


def _check(path: str) -> int:
    from gateway import config as gw_config
    from gateway.errors import ConfigError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"<file>: cannot read {path!r}: {exc.strerror}", file=sys.stderr)
        return 2
    expanded, _ = gw_config.interpolate(text)
    try:
        doc = yaml.safe_load(expanded)
    except yaml.YAMLError:
        doc = None
    kind = "gateway"
    if isinstance(doc, dict) and not ({"upstreams", "routes"} & doc.keys()):
        from gateway.control.config import is_control_config
        if is_control_config(doc):
            kind = "control"
    try:
        if kind == "control":
            from gateway.control import config as cp_config
            cp_config.load(path)
            print(f"ok: {path} is a valid control-plane config")
        else:
            cfg = gw_config.load(path)
            print(f"ok: {path} is a valid gateway config (version {cfg.version}; "
                  f"{len(cfg.routes)} routes, {len(cfg.upstreams)} upstreams, "
                  f"{len(cfg.limits)} limits)")
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="start the data plane (and the embedded control plane)")
    p_run.add_argument("--config", default="config/gateway.yaml")
    p_run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p_run.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p_run.add_argument("--admin-unix", help=argparse.SUPPRESS)

    p_control = sub.add_parser("control", help="start the control plane alone")
    p_control.add_argument("--config", default="config/control.yaml")

    p_check = sub.add_parser("check", help="validate a gateway or control-plane config")
    p_check.add_argument("--config", required=True)

    p_rules = sub.add_parser("slo-rules", help="print Prometheus recording and alerting rules "
                                               "for the SLOs of a control-plane config")
    p_rules.add_argument("--config", default="config/control.yaml")
    p_rules.add_argument("--gateway-config", help="map each SLO's service to its routes")

    p_cdb = sub.add_parser("control-db", help="back up or restore the control plane's database")
    p_cdb.add_argument("action", choices=("backup", "restore"))
    p_cdb.add_argument("path", help="the backup file (written by backup, read by restore)")
    p_cdb.add_argument("--config", default="config/control.yaml")

    p_schema = sub.add_parser("schema", help="print the JSON Schema of the gateway or the "
                                             "control-plane config (for editors)")
    p_schema.add_argument("which", choices=("gateway", "control"))

    p_demo = sub.add_parser("demo-upstream", help="run the bundled demo upstream")
    p_demo.add_argument("--listen", default="127.0.0.1:9001")

    from gateway import cli
    cli.add_parsers(sub)                 # admin ..., ctl ...: operator commands over HTTP

    args = parser.parse_args(argv)
    from gateway import logs
    logs.setup(args.log_level.upper())

    if args.command == "check":
        return _check(args.config)
    if args.command in ("admin", "ctl"):
        return cli.run(args)
    if args.command == "run":
        from gateway import app
        if args.worker_index is not None:
            return app.run_worker(args.config, args.worker_index, args.port, args.admin_unix)
        return app.run(args.config)
    if args.command == "control":
        from gateway.control import app as control_app
        return control_app.run(args.config)
    if args.command == "slo-rules":
        from gateway.control import slorules
        return slorules.run(args.config, args.gateway_config)
    if args.command == "control-db":
        from gateway.control import backup
        return backup.run(args.action, args.config, args.path)
    if args.command == "schema":
        from gateway import schema
        sys.stdout.write(schema.render(args.which))
        return 0
    if args.command == "demo-upstream":
        from gateway import demo
        from gateway.config import split_hostport
        host, port = split_hostport(args.listen)
        demo.run(host, port)
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
