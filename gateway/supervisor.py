"""`workers: N`: a supervisor process and N workers sharing the proxy port with SO_REUSEPORT.

The supervisor owns the public admin listener. Each worker serves the same admin API on a
private unix socket in a 0700 directory; the supervisor fans requests out to them: metrics are
merged (one scrape covers every worker), breakers are reported per upstream (the most open state
across workers, with the per-worker detail), reload is validated once and then applied by every
worker. A worker that dies is restarted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway import admin as admin_api
from gateway import config as config_mod
from gateway import logs, metrics
from gateway.app import bind_socket, spawn_children, stop_children
from gateway.config import Config, ConfigError, split_hostport
from gateway.eventloop import background, new_loop

log = logging.getLogger("gateway.supervisor")

_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


class Worker:
    def __init__(self, index: int, sock_path: str) -> None:
        self.index = index
        self.sock_path = sock_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0


class Supervisor:
    def __init__(self, config_path: str, cfg: Config) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.token = cfg.admin.token
        self.shared_dir = tempfile.mkdtemp(prefix="gateway-")
        os.chmod(self.shared_dir, 0o700)
        self.workers = [Worker(i, os.path.join(self.shared_dir, f"worker-{i}.sock"))
                        for i in range(cfg.workers)]
        self.state = "starting"
        self._stopping = False
        self.port = 0
        self._port_holder: socket.socket | None = None
        self.admin_address: tuple[str, int] | None = None

    # -- workers --------------------------------------------------------------------------

    def _spawn(self, w: Worker) -> None:
        env = dict(os.environ, GATEWAY_WORKERS=str(len(self.workers)),
                   GATEWAY_WORKER_INDEX=str(w.index), GATEWAY_SHARED_DIR=self.shared_dir)
        if os.path.exists(w.sock_path):
            os.unlink(w.sock_path)
        w.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--log-level", logs.level(), "run",
             "--config", self.config_path,
             "--worker-index", str(w.index), "--port", str(self.port),
             "--admin-unix", w.sock_path], env=env)
        log.info("worker started", extra={"worker": w.index, "pid": w.proc.pid})

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for w in self.workers:
                if self._stopping:
                    return
                if w.proc is not None and w.proc.poll() is not None:
                    w.restarts += 1
                    log.error("worker died; restarting", extra={
                        "worker": w.index, "pid": w.proc.pid, "exit_code": w.proc.returncode,
                        "restarts": w.restarts})
                    self._spawn(w)

    async def _call(self, w: Worker, method: str, path: str, body: Any = None,
                    timeout: float = 5.0) -> tuple[int, bytes]:
        conn = aiohttp.UnixConnector(path=w.sock_path)
        data = orjson.dumps(body) if body is not None else None
        async with aiohttp.ClientSession(connector=conn) as session, session.request(
                method, f"http://worker{path}", data=data,
                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.read()

    async def _call_all(self, method: str, path: str, body: Any = None) -> list[tuple[int, bytes]]:
        results = await asyncio.gather(*(self._call(w, method, path, body) for w in self.workers),
                                       return_exceptions=True)
        out = []
        for r in results:
            out.append((599, str(r).encode()) if isinstance(r, BaseException) else r)
        return out

    # -- AdminBackend ---------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        return self.state == "ready", self.state

    async def metrics(self) -> tuple[bytes, str]:
        texts = [body for status, body in await self._call_all("GET", "/metrics") if status == 200]
        return metrics.merge_expositions(texts), metrics.CONTENT_TYPE

    async def breakers(self) -> list[dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for i, (status, body) in enumerate(await self._call_all("GET", "/admin/breakers")):
            if status != 200:
                continue
            for b in orjson.loads(body):
                m = merged.get(b["upstream"])
                if m is None:
                    m = merged[b["upstream"]] = dict(b, failure_count=0, workers=[])
                m["workers"].append(dict(b, worker=i))
                m["failure_count"] += b["failure_count"]
                if _SEVERITY[b["state"]] > _SEVERITY[m["state"]]:
                    m.update(state=b["state"], opened_at=b["opened_at"], retry_at=b["retry_at"])
        return list(merged.values())

    async def reset_breaker(self, upstream: str) -> dict[str, Any] | None:
        results = await self._call_all("POST", f"/admin/breakers/{upstream}/reset")
        if any(status == 404 for status, _ in results):
            return None
        return next((b for b in await self.breakers() if b["upstream"] == upstream), None)

    async def limits_test(self, limit: str, key: str, requests: int) -> dict[str, Any]:
        status, body = await self._call(self.workers[0], "POST", "/admin/limits/test",
                                        {"limit": limit, "key": key, "requests": requests})
        if status == 404:
            raise KeyError(limit)
        return orjson.loads(body)  # type: ignore[no-any-return]

    async def reload(self) -> str:
        cfg = config_mod.load(self.config_path)
        errors = [f"{k}: cannot change on reload (restart the gateway)"
                  for k in ("listen", "workers") if getattr(cfg, k) != getattr(self.cfg, k)]
        if cfg.admin.listen != self.cfg.admin.listen:
            errors.append("admin.listen: cannot change on reload (restart the gateway)")
        if (cfg.tls is None) != (self.cfg.tls is None):
            errors.append("tls: turning TLS on the listener on or off needs a restart")
        if errors:
            raise ConfigError(errors)
        results = await self._call_all("POST", "/admin/reload")
        failed = [f"worker {i}: {body.decode(errors='replace')}"
                  for i, (status, body) in enumerate(results) if status != 200]
        self.cfg = cfg
        self.token = cfg.admin.token
        if failed:
            log.error("some workers failed to reload", extra={"errors": failed})
        log.info("config reloaded", extra={"version": cfg.version})
        return cfg.version

    def effective_config(self) -> dict[str, Any]:
        return {"version": self.cfg.version, "config": self.cfg.redacted(),
                "workers": [{"index": w.index, "pid": w.proc.pid if w.proc else None,
                             "restarts": w.restarts} for w in self.workers]}

    # -- main -----------------------------------------------------------------------------

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = split_hostport(self.cfg.listen)
        if port == 0:
            # Reserve a concrete port the workers can all bind with SO_REUSEPORT.
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._port_holder = socket.socket(family, socket.SOCK_STREAM)
            self._port_holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._port_holder.bind((host, 0))
            port = self._port_holder.getsockname()[1]
        self.port = port
        for w in self.workers:
            self._spawn(w)
        runner = web.AppRunner(admin_api.make_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, bind_socket(self.cfg.admin.listen))
        await site.start()
        self.admin_address = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
        await self._wait_ready(timeout=30)
        self.state = "ready"
        log.info("gateway started", extra={"listen": f"{host}:{port}",
                                           "admin": f"{self.admin_address[0]}:{self.admin_address[1]}",
                                           "workers": len(self.workers),
                                           "version": self.cfg.version, "pid": os.getpid()})
        watcher = loop.create_task(self._watch())
        stop = asyncio.Event()

        async def reload_from_signal() -> None:
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("reload rejected; the old config keeps serving",
                          extra={"errors": exc.errors})

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: background(reload_from_signal()))
        await stop.wait()
        self.state = "draining"
        self._stopping = True
        watcher.cancel()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.drain_s + 10
        for w in self.workers:
            while w.proc is not None and w.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
        await runner.cleanup()

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.workers)))
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                try:
                    status, _ = await self._call(self.workers[i], "GET", "/readyz", timeout=1)
                    if status == 200:
                        pending.discard(i)
                except (TimeoutError, OSError, aiohttp.ClientError):
                    pass
            if pending:
                await asyncio.sleep(0.05)
        if pending:
            log.error("workers not ready in time", extra={"workers": sorted(pending)})

    def run(self) -> int:
        children = spawn_children(self.cfg, self.config_path)
        loop = new_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            stop_children(children)
            loop.close()
            shutil.rmtree(self.shared_dir, ignore_errors=True)
            if self._port_holder is not None:
                self._port_holder.close()
        return 0
