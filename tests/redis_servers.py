"""Real Redis topologies for the limiter's tests: Sentinel (master, replica, three sentinels), a
3-master Cluster, and a TLS server. Every process is on 127.0.0.1, on free ports, in a temporary
directory, and killed by `stop()`; waits are bounded."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import free_port, wait_port


def _exe(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:  # CI installs it; a missing server is a failure, not a skip
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server redis-sentinel)")
    return exe


def wait_for(what: str, check: object, timeout: float) -> None:
    """Poll `check()` every 50 ms until it is true; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} after {timeout} s")


class Processes:
    """Processes started by one fixture, all killed by `stop()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}     # port -> process

    def start(self, port: int, *args: str, exe: str = "redis-server", sub: str = "") -> None:
        d = self.workdir / (sub or str(port))
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [_exe(exe), *args], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


def _server_args(port: int, *extra: str) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            *extra]


class SentinelSetup(Processes):
    """A master, one replica and three sentinels (quorum 2) monitoring `mymaster`; a master
    that stops answering is failed over after about a second."""

    MASTER = "mymaster"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.master_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.MASTER}/0"

    def start_all(self) -> None:
        self.start(self.master_port, *_server_args(self.master_port))
        self.start(self.replica_port, *_server_args(
            self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port)))
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"   # sentinels rewrite their file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 5000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n")
            self.start(port, str(conf), exe="redis-sentinel")
        for port in (self.master_port, self.replica_port, *self.sentinel_ports):
            wait_port(port)
        replica = redis.Redis(port=self.replica_port)
        try:
            wait_for("the replica never synced", lambda: replica.info("replication")
                     ["master_link_status"] == "up", 15)
        finally:
            replica.close()
        for port in self.sentinel_ports:      # every sentinel knows the others and the replica
            s = redis.Redis(port=port)
            try:
                def ready(s: redis.Redis = s) -> bool:
                    flat = s.execute_command("SENTINEL", "MASTER", self.MASTER)
                    m = dict(zip(flat[::2], flat[1::2]))
                    return bool(m[b"num-other-sentinels"] == b"2" and m[b"num-slaves"] == b"1")
                wait_for(f"sentinel {port} never saw its peers", ready, 20)
            finally:
                s.close()

    def master_address(self) -> tuple[str, int]:
        s = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        try:
            host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
            return host, int(port)
        finally:
            s.close()


class ClusterSetup(Processes):
    """Three masters, no replicas, every slot assigned (`redis-cli --cluster create`)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.ports = [free_port() for _ in range(3)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_all(self) -> None:
        for port in self.ports:
            self.start(port, *_server_args(
                port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000"))
        for port in self.ports:
            wait_port(port)
        subprocess.run([_exe("redis-cli"), "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for port in self.ports:
            r = redis.Redis(port=port)
            try:
                wait_for("the cluster never became ok", lambda r=r: r.cluster("info")
                         .get("cluster_state") == "ok", 15)
            finally:
                r.close()

    def node_of_slot(self, slot: int) -> int:
        """The port of the master serving `slot`."""
        r = redis.Redis(port=self.ports[0])
        try:
            for start, end, master, *_ in r.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            r.close()
        raise LookupError(slot)

    def move_slot(self, slot: int, to_port: int) -> None:
        """Migrate one slot (and its keys) to another master, the way resharding does it:
        IMPORTING/MIGRATING, MIGRATE keys (ASK redirections meanwhile), then NODE everywhere."""
        from_port = self.node_of_slot(slot)
        src, dst = redis.Redis(port=from_port), redis.Redis(port=to_port)
        try:
            src_id = src.execute_command("CLUSTER MYID").decode()
            dst_id = dst.execute_command("CLUSTER MYID").decode()
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            for port in self.ports:
                r = redis.Redis(port=port)
                try:
                    r.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                finally:
                    r.close()
        finally:
            src.close()
            dst.close()


class TLSRedis(Processes):
    """A redis-server speaking only TLS with a certificate from `cert_dir` (CA `ca.pem`, server
    `server.pem`/`server.key`); clients must present a certificate signed by the same CA."""

    def __init__(self, workdir: Path, cert_dir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.cert_dir = cert_dir

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start_all(self) -> None:
        c = self.cert_dir
        self.start(self.port, *_server_args(
            0, "--tls-port", str(self.port), "--tls-cert-file", str(c / "server.pem"),
            "--tls-key-file", str(c / "server.key"), "--tls-ca-cert-file", str(c / "ca.pem"),
            "--tls-auth-clients", "yes"))
        wait_port(self.port)
