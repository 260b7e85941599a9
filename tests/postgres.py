"""A private PostgreSQL cluster for the tests: initdb into a temporary directory, its own port on
127.0.0.1 and a unix socket directory inside it, fsync off (a test database need not survive a
power cut), stopped at the end of the session. No Docker: Debian's `postgresql` package, whose
binaries live in /usr/lib/postgresql/<version>/bin (not on PATH). The server refuses to run as
root, so as root it runs as the `postgres` system user (created by the package), via setpriv."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    # CI installs it (.ci/run); a missing server is a failure, not a skip
    raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")


class PostgresCluster:
    """`start()`, `create_database()` per test (a copy of a migrated template), `stop()`."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._n = 0
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            # setpriv execs in place: the Popen pid is the server itself (signals reach it)
            self._as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        subprocess.run([*self._as, str(self.bin / "initdb"), "-D", str(self.data), "-U",
                        "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            [*self._as, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=300", "-c", "shared_buffers=32MB"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "server.log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p",
                                    str(self.port), "-q"], check=False, timeout=10)
            if ready.returncode == 0:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start: " +
                                   (self.dir / "server.log").read_text()[-2000:])
            time.sleep(0.1)
        from gateway.control.store import Store
        self.sql("CREATE DATABASE gateway_template")
        Store(self.url("gateway_template")).close()     # migrated once, copied per test

    def sql(self, statement: str, db: str = "postgres") -> None:
        import psycopg
        with psycopg.connect(self.url(db), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, template: str = "gateway_template") -> str:
        """A new database (a copy of the migrated template, or empty with template0)."""
        self._n += 1
        name = f"t{os.getpid()}_{self._n}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()       # smart shutdown would wait for clients: SIGTERM is fast
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
