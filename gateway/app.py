"""One gateway process: builds runtimes from configs, serves the proxy and admin listeners,
reloads atomically, drains on shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import admin as admin_api
from gateway import config as config_mod
from gateway import logs, metrics
from gateway.breaker import BreakerSet
from gateway.budgetguard import BudgetGuard
from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.concurrency import GradientLimit
from gateway.config import Config, ConfigError, split_hostport
from gateway.downstream import DownstreamServer
from gateway.eventloop import background, new_loop
from gateway.proxy import Proxy, Runtime, UpstreamRuntime
from gateway.ratelimit import Limiter
from gateway.routing import Router
from gateway.shedding import ShedGuard
from gateway.signals import LoopLagMonitor, Signals
from gateway.tenants import Tenancy, TenantTable
from gateway.tls import ListenerTls, TlsFileError, client_context, files_stamp
from gateway.tracing import Tracer, make_tracer
from gateway.upstream import EndpointPool

log = logging.getLogger("gateway")

QUANTILE_INTERVAL_S = 10.0
"""The interval of the quantile gauges when no control plane is configured (with one, the
shipper's `ship_interval_s`, 10 s by default, closes the intervals)."""


def bind_socket(listen: str, *, reuse_port: bool = False) -> socket.socket:
    host, port = split_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _limit_reader(lim: GradientLimit) -> Callable[[], int]:
    return lambda: lim.limit


def _pool_key(upstream: Any, url: str) -> tuple[Any, ...]:
    return (url, upstream.connect_timeout_s, upstream.timeout_s, upstream.max_connections,
            upstream.tls if url.startswith("https:") else None)


TLS_HANDSHAKE_TIMEOUT_S = 10.0


class GatewayServer:
    """A gateway process (the only one with `workers: 1`, or one worker of a supervisor).

    Implements `admin.AdminBackend`, so the same admin API serves it directly.
    """

    def __init__(self, config_path: str, cfg: Config, *, clock: Clock = SYSTEM_CLOCK,
                 worker_index: int | None = None, admin_unix: str | None = None,
                 listen_sock: socket.socket | None = None) -> None:
        self.config_path = config_path
        self.clock = clock
        self.worker_index = worker_index
        self.admin_unix = admin_unix
        self._listen_sock = listen_sock
        self.signals = Signals(clock, **({"buckets_s": cfg.metrics.latency_buckets}
                                         if cfg.metrics.latency_buckets else {}))
        self.lag = LoopLagMonitor(self.signals)
        self._pools: dict[tuple[Any, ...], EndpointPool] = {}
        # The contents of each https pool's TLS files when its context was made (files_stamp)
        self._tls_stamps: dict[tuple[Any, ...], bytes] = {}
        self.tenant_table = TenantTable(clock)  # fed by the shipper's ingest responses
        # Adaptive concurrency limits, kept across reloads while an upstream's settings hold
        self._limits: dict[str, tuple[Any, GradientLimit]] = {}
        self.runtime = self._build_runtime(cfg, None)
        self.access_log = self._make_access_log(cfg)
        self.budget_guard = BudgetGuard(clock)  # fed by the shipper's ingest responses
        self.shed_guard = ShedGuard(clock)      # likewise
        self.proxy = Proxy(self.runtime, self.signals, self.access_log, self.budget_guard,
                           self.shed_guard, tracer=make_tracer(cfg.tracing))
        self.tls = ListenerTls(cfg.tls) if cfg.tls is not None else None
        if self.tls is not None:
            self.proxy.scheme = "https"
        # A worker's admin socket is private to its supervisor (0700 directory): no token there.
        self.token = "" if admin_unix else cfg.admin.token
        self.state = "starting"
        self._server: DownstreamServer | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._shipper: Any = None
        self._ticker: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.proxy_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None

    @property
    def cfg(self) -> Config:
        return self.runtime.cfg

    # -- runtime construction -------------------------------------------------------------

    def _build_runtime(self, cfg: Config, previous: Runtime | None) -> Runtime:
        breakers = BreakerSet(cfg.upstreams, self.clock,
                              previous.breakers if previous else None)
        breakers.add_listener(self._on_breaker_transition)
        limiter = Limiter(cfg, clock=self.clock, previous=previous.limiter if previous else None)
        limiter.add_listener(self.signals.record_limit)
        self.signals.set_evictions_source(lambda: limiter.evictions)
        tenancy = None
        if cfg.tenants is not None:
            tenancy = Tenancy(cfg.tenants, trusted=cfg.trusted_proxies, clock=self.clock,
                              table=self.tenant_table, redis=limiter.redis,
                              previous=previous.tenancy if previous else None,
                              collect_usage=cfg.control_plane is not None)
            tenancy.add_listener(self.signals.record_limit)
        upstreams: dict[str, UpstreamRuntime] = {}
        # Pools kept across a reload whose TLS files changed in place: their new contexts are
        # set once the whole runtime is built (a failed reload changes nothing).
        rotated: list[tuple[tuple[Any, ...], EndpointPool, Any, bytes]] = []
        for i, u in enumerate(cfg.upstreams):
            pools = []
            for ep in u.endpoints:
                key = _pool_key(u, ep.url)
                pool = self._pools.get(key)
                stamp = files_stamp(u.tls) if ep.scheme == "https" else b""
                if pool is None:
                    pool = EndpointPool(ep, connect_timeout_s=u.connect_timeout_s,
                                        timeout_s=u.timeout_s, max_connections=u.max_connections,
                                        ssl=_client_tls(u, i) if ep.scheme == "https" else None,
                                        server_name=u.tls.server_name if u.tls else None)
                    self._pools[key] = pool
                    self._tls_stamps[key] = stamp
                elif stamp != self._tls_stamps.get(key, stamp):
                    rotated.append((key, pool, _client_tls(u, i), stamp))
                pools.append(pool)
            upstreams[u.name] = UpstreamRuntime(u, pools, breakers.selector(u.name),
                                                breakers.breaker(u.name))
        for u in cfg.upstreams:
            if u.fallback is not None:
                upstreams[u.name].fallback = upstreams[u.fallback]
        limits: dict[str, tuple[Any, GradientLimit]] = {}
        self.signals.concurrency_sources.clear()
        for u in cfg.upstreams:
            c = u.concurrency
            if c is None or not c.adaptive:
                continue
            kept = self._limits.get(u.name)
            lim = kept[1] if kept is not None and kept[0] == c else \
                GradientLimit(c.min, c.max, self.clock)
            limits[u.name] = (c, lim)
            upstreams[u.name].limit = lim
            self.signals.concurrency_sources[u.name] = _limit_reader(lim)
        self._limits = limits
        for key, pool, ctx, stamp in rotated:
            # New connections verify (and authenticate) with the re-read files; pooled ones
            # keep the handshake they made and serve until they close.
            pool.ssl = ctx
            self._tls_stamps[key] = stamp
        self.signals.clear_pool_sources()
        for name, ur in upstreams.items():
            self.signals.add_pool_source(name, ur.pool_use)
            self.signals.set_breaker_state(name, ur.breaker.state)
        return Runtime(cfg, Router(cfg.routes), upstreams, limiter, breakers, tenancy)

    def _on_breaker_transition(self, upstream: str, old: str, new: str, reason: str) -> None:
        self.signals.record_breaker_transition(upstream, old, new, reason)
        self.signals.set_breaker_state(upstream, new)

    @staticmethod
    def _make_access_log(cfg: Config) -> Any:
        if not cfg.access_log.enabled:
            return None
        from gateway.accesslog import AccessLog
        return AccessLog(cfg.access_log.path)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        await self.runtime.limiter.start()
        await self.lag.start()
        if self.access_log is not None:
            await self.access_log.start()
        self._server = DownstreamServer(self.proxy.handle,
                                        on_reject=self.proxy.record_rejected,
                                        tls=self.tls is not None)
        sock = self._listen_sock or bind_socket(cfg.listen, reuse_port=cfg.workers > 1)
        if self.tls is not None:
            self._listener = await loop.create_server(
                self._server, sock=sock, backlog=2048, ssl=self.tls.context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        else:
            self._listener = await loop.create_server(self._server, sock=sock, backlog=2048)
        self.proxy_address = sock.getsockname()[:2]
        admin_app = admin_api.make_app(self)
        self._admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        if self.admin_unix:
            site: web.BaseSite = web.UnixSite(self._admin_runner, self.admin_unix)
        else:
            site = web.SockSite(self._admin_runner, bind_socket(cfg.admin.listen))
        await site.start()
        if not self.admin_unix:
            srv = site._server  # the bound socket tells the real port when 0 was asked
            assert srv is not None
            self.admin_address = srv.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
        if cfg.control_plane is not None:
            self._start_shipper(cfg)
        else:   # no shipper to close intervals: close them here, for the quantile gauges
            self._ticker = asyncio.get_running_loop().create_task(self._close_intervals())
        self.state = "ready"
        log.info("gateway started", extra={
            "listen": _fmt(self.proxy_address), "admin": self.admin_unix or _fmt(self.admin_address),
            "config": self.config_path, "version": cfg.version, "worker": self.worker_index,
            "pid": os.getpid(), "routes": len(cfg.routes), "upstreams": len(cfg.upstreams)})

    def _start_shipper(self, cfg: Config) -> None:
        from gateway.shipper import Shipper
        assert cfg.control_plane is not None
        gateway_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        if self.worker_index is not None:
            gateway_id += f"-w{self.worker_index}"
        self._shipper = Shipper(cfg.control_plane, self._snapshot,
                                gateway_id=gateway_id, clock=self.clock,
                                on_result=self.signals.record_shipper,
                                on_spooled=self.signals.set_spooled,
                                on_directives=self._on_directives)
        background(self._shipper.start(), name="shipper-start")

    def _on_directives(self, directives: dict[str, Any]) -> None:
        self.budget_guard.update(directives)
        self.shed_guard.update(directives)
        self.tenant_table.update(directives)

    async def _close_intervals(self) -> None:
        """Without a control plane: end an interval every QUANTILE_INTERVAL_S (the aggregates
        are dropped; /metrics' counters are cumulative and unaffected), so that the quantile
        gauges always describe a recent, completed interval."""
        while True:
            await asyncio.sleep(QUANTILE_INTERVAL_S)
            self.signals.swap()

    async def _snapshot(self) -> dict[str, Any] | None:
        """The interval's aggregates for the shipper; None when nothing happened. The swap is
        atomic on the loop; encoding the histograms (milliseconds with many series) happens in a
        thread, on aggregates nothing else references any more."""
        agg = self.signals.swap()
        if agg.is_empty:
            return None
        tenancy = self.runtime.tenancy
        usage = tenancy.usage() if tenancy is not None else None
        doc = await asyncio.to_thread(agg.to_wire)
        if usage:
            doc["tenants"] = usage
        return doc

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_s), flush, close."""
        self.state = "draining"
        drain_s = self.cfg.drain_s
        log.info("draining", extra={"inflight": self.signals.inflight, "drain_s": drain_s})
        if self._listener is not None:
            self._listener.close()
        if self._server is not None:
            # Idle keep-alive connections close now; busy ones after their current response.
            await self._server.shutdown(drain_s)
        if self._listener is not None:
            await self._listener.wait_closed()
        if self._shipper is not None:
            await self._shipper.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self.lag.stop()
        if self.access_log is not None:
            await self.access_log.close()
        await self._close_tracer(self.proxy.tracer)
        await self.runtime.limiter.close()
        for task in list(self._retiring):
            task.cancel()
        for pool in self._pools.values():
            await pool.close()
        log.info("stopped", extra={"inflight": self.signals.inflight})

    # -- reload ---------------------------------------------------------------------------

    async def reload(self) -> str:
        """Re-read the config file and swap atomically; ConfigError keeps the old one."""
        async with self._reload_lock:
            try:
                cfg = config_mod.load(self.config_path)
                self._check_reloadable(cfg)
                if self.tls is not None and cfg.tls is not None:
                    self.tls.update(cfg.tls)    # new handshakes get the re-read certificates
                old = self.runtime
                new = self._build_runtime(cfg, old)
            except ConfigError as exc:
                self.signals.record_reload("failure")
                log.error("reload rejected; the old config keeps serving",
                          extra={"errors": exc.errors, "version": self.cfg.version})
                raise
            await new.limiter.start()
            self.runtime = new
            self.proxy.runtime = new
            if cfg.tracing != old.cfg.tracing:
                old_tracer, self.proxy.tracer = self.proxy.tracer, make_tracer(cfg.tracing)
                await self._close_tracer(old_tracer)
            self.token = "" if self.admin_unix else cfg.admin.token
            old.retired = True
            if old.inflight == 0:
                old.drained.set()
            task = asyncio.get_running_loop().create_task(self._retire(old, new))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            self.signals.record_reload("success")
            log.info("config reloaded", extra={"version": cfg.version, "previous": old.cfg.version})
            return cfg.version

    @staticmethod
    async def _close_tracer(tracer: Tracer | None) -> None:
        """Export the spans still queued; in a thread, the exporter's shutdown blocks."""
        if tracer is not None:
            await asyncio.get_running_loop().run_in_executor(None, tracer.shutdown)

    def _check_reloadable(self, cfg: Config) -> None:
        """Keys that need a restart are refused on reload, naming the key."""
        errors = []
        cur = self.cfg
        for key in ("listen", "workers"):
            if getattr(cfg, key) != getattr(cur, key):
                errors.append(f"{key}: cannot change on reload (restart the gateway); "
                              f"running {getattr(cur, key)!r}, file has {getattr(cfg, key)!r}")
        if (cfg.tls is None) != (cur.tls is None):
            errors.append("tls: turning TLS on the listener on or off needs a restart")
        if cfg.admin.listen != cur.admin.listen:
            errors.append("admin.listen: cannot change on reload (restart the gateway)")
        if cfg.metrics != cur.metrics:     # Prometheus histograms keep their buckets for life
            errors.append("metrics.latency_buckets: cannot change on reload (restart the "
                          "gateway)")
        if errors:
            raise ConfigError(errors)

    async def _retire(self, old: Runtime, new: Runtime) -> None:
        """Close what only the old runtime used, once its last request finished."""
        longest = max((u.timeout_s for u in old.cfg.upstreams), default=30.0)
        try:
            await asyncio.wait_for(old.drained.wait(), timeout=longest + old.cfg.drain_s)
        except TimeoutError:
            log.warning("retired config still had requests in flight; closing it anyway",
                        extra={"version": old.cfg.version, "inflight": old.inflight})
        live = {id(p) for u in new.upstreams.values() for p in u.pools}
        for key, pool in list(self._pools.items()):
            if id(pool) not in live:
                del self._pools[key]
                self._tls_stamps.pop(key, None)
                await pool.close()
        await old.limiter.close()

    # -- AdminBackend ---------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        return self.state == "ready", self.state

    async def metrics(self) -> tuple[bytes, str]:
        return (metrics.render(self.signals, worker=self.worker_index,
                               utilization=self.runtime.limiter.utilization),
                metrics.CONTENT_TYPE)

    async def breakers(self) -> list[dict[str, Any]]:
        return self.runtime.breakers.snapshot()

    async def reset_breaker(self, upstream: str) -> dict[str, Any] | None:
        ur = self.runtime.upstreams.get(upstream)
        if ur is None:
            return None
        ur.breaker.reset("admin reset")
        return ur.breaker.snapshot()

    async def limits_test(self, limit: str, key: str, requests: int) -> dict[str, Any]:
        return await self.runtime.limiter.test(limit, key, requests)

    def effective_config(self) -> dict[str, Any]:
        return {"version": self.cfg.version, "config": self.cfg.redacted()}


def _client_tls(u: Any, index: int) -> Any:
    """The TLS context of an upstream's https endpoints; a file that went bad since it was
    validated is reported at its key."""
    try:
        return client_context(u.tls)
    except TlsFileError as exc:
        raise ConfigError([f"upstreams[{index}].tls.{exc.key}: {exc.message}"]) from None


def _fmt(addr: tuple[str, int] | None) -> str | None:
    if addr is None:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Processes: the demo upstream and the embedded control plane run as children of the top process


def spawn_children(cfg: Config, config_path: str) -> list[subprocess.Popen[bytes]]:
    children = []
    if cfg.demo_upstream:
        host, port = split_hostport(cfg.demo_upstream)
        children.append(subprocess.Popen(
            [sys.executable, "-m", "gateway", "--log-level", logs.level(), "demo-upstream",
             "--listen", cfg.demo_upstream],
            preexec_fn=_child_setup))  # noqa: PLW1509 - started before any thread
        _wait_listening(host, port, timeout=10.0)
        log.info("demo upstream started", extra={"listen": cfg.demo_upstream,
                                                  "pid": children[-1].pid})
    cp = cfg.control_plane
    if cp is not None and cp.embedded:
        path = _resolve_beside(cp.config, config_path)
        children.append(subprocess.Popen(
            [sys.executable, "-m", "gateway", "--log-level", logs.level(), "control",
             "--config", str(path)],
            preexec_fn=_child_setup))  # noqa: PLW1509 - started before any thread
        log.info("embedded control plane started", extra={"config": str(path),
                                                           "pid": children[-1].pid})
    return children


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Own session, so a terminal's Ctrl-C reaches only the gateway, which stops its children
    after its final flush; and SIGTERM to the child if the gateway itself dies."""
    os.setsid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_listening(host: str, port: int, timeout: float) -> None:
    """Block until something accepts on host:port (a child we just started), or time out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    log.warning("child not listening yet", extra={"listen": f"{host}:{port}"})


def _resolve_beside(name: str, config_path: str) -> Path:
    """A relative path from a config file: from the working directory if it is there, else
    beside the config file (as in a container with everything under /etc/gateway)."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    here = Path(config_path).resolve().parent
    for candidate in (here / path, here / path.name):
        if candidate.exists():
            return candidate
    return path


def stop_children(children: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def serve(server: GatewayServer) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def reload_from_signal() -> None:
        try:
            await server.reload()
        except ConfigError:
            pass  # logged by reload(); the old config keeps serving

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: background(reload_from_signal()))
    await server.start()
    await stop.wait()
    await server.stop()


def _load_or_report(config_path: str) -> Config | None:
    """The config, or None after printing every error as `path.to.key: message`."""
    try:
        return config_mod.load(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def run(config_path: str) -> int:
    """`gateway run`: one process, or a supervisor of `workers` processes."""
    cfg = _load_or_report(config_path)
    if cfg is None:
        return 2
    if cfg.workers > 1:
        from gateway.supervisor import Supervisor
        return Supervisor(config_path, cfg).run()
    children = spawn_children(cfg, config_path)
    loop = new_loop()
    try:
        loop.run_until_complete(serve(GatewayServer(config_path, cfg)))
    finally:
        stop_children(children)
        loop.close()
    return 0


def run_worker(config_path: str, index: int, port: int, admin_unix: str) -> int:
    """A worker of a supervisor: same as a single process, admin on a private unix socket."""
    cfg = _load_or_report(config_path)
    if cfg is None:
        return 2
    host, _ = split_hostport(cfg.listen)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = bind_socket(listen, reuse_port=True)
    loop = new_loop()
    try:
        loop.run_until_complete(serve(GatewayServer(config_path, cfg, worker_index=index,
                                                    admin_unix=admin_unix, listen_sock=sock)))
    finally:
        loop.close()
    return 0


