"""`gateway control-db backup|restore`: a consistent copy of the control plane's database.

SQLite: `sqlite3`'s online backup API copies the database page by page in one read transaction,
so the copy is the database as of one instant, while the control plane keeps ingesting (WAL mode:
the reader never blocks its writer). The copy is written beside the target as a temporary file
and renamed into place, so a half-written backup never carries the final name.

PostgreSQL (`database: postgresql://...`): `pg_dump -Fc` (custom format; pg_dump takes one
snapshot, so the dump is consistent while the replicas run) and `pg_restore --single-transaction
--exit-on-error --no-owner`. The client binaries come from PATH, else from Debian's
/usr/lib/postgresql/<version>/bin (the newest); pg_dump must be at least the server's version.

Restore goes into an EMPTY database only: a SQLite file that does not exist or has no tables, a
PostgreSQL database without tables in its `public` schema. Anything else is refused (exit 2) so a
restore can never merge into or overwrite live data: stop the control plane, move the old
database aside (or create a new PostgreSQL database), then restore and start.
A backup whose schema is newer than this program's is refused too; an older one is migrated when
the control plane next opens it.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from gateway.control.config import load
from gateway.control.store import SCHEMA_VERSION
from gateway.control.store.database import is_postgresql
from gateway.errors import ConfigError


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why (exit status 2)."""


def backup(database: str, path: str) -> str:
    """Write a consistent snapshot of `database` to `path` (must not exist); a summary line."""
    target = Path(path)
    if target.exists():
        raise BackupError(f"{path}: already exists; a backup never overwrites a file")
    if is_postgresql(database):
        _run([_pg_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={path}",
              f"--dbname={database}"])
        return f"ok: {_safe(database)} dumped to {path} ({target.stat().st_size} bytes, pg_dump)"
    if not Path(database).exists():
        raise BackupError(f"database: {database}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        dst = sqlite3.connect(tmp)
        try:
            # pages=-1: the whole database in one step, i.e. inside one read transaction: a
            # consistent instant even while the control plane writes (a stepped copy would
            # restart on every write and might never finish under steady ingest).
            src.backup(dst, pages=-1)
            version = _sqlite_version(dst)
        finally:
            dst.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except sqlite3.Error as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"database: {database}: {exc}") from exc
    finally:
        src.close()
    return (f"ok: {database} copied to {path} ({target.stat().st_size} bytes, "
            f"schema version {version})")


def restore(database: str, path: str) -> str:
    """Restore the backup at `path` into `database`, which must be empty; a summary line."""
    if not Path(path).is_file():
        raise BackupError(f"{path}: no such file")
    if is_postgresql(database):
        _pg_require_empty(database)
        _run([_pg_tool("pg_restore"), "--single-transaction", "--exit-on-error", "--no-owner",
              f"--dbname={database}", path])
        return f"ok: {path} restored into {_safe(database)} (pg_restore)"
    target = Path(database)
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version = _sqlite_version(src)
        finally:
            src.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path}: not a control-plane SQLite backup ({exc})") from exc
    if version == 0:
        raise BackupError(f"{path}: not a control-plane backup (no schema_version table)")
    if version > SCHEMA_VERSION:
        raise BackupError(f"{path}: schema version {version} is newer than this program's "
                          f"({SCHEMA_VERSION}); restore it with the newer version")
    if target.exists() and target.stat().st_size > 0:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'"
                                ).fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"database: {database}: not a SQLite database ({exc})") from exc
        finally:
            db.close()
        if tables:
            raise BackupError(f"database: {database} is not empty ({tables} tables); restore "
                              "only into a new database: stop the control plane and move the "
                              "file aside first")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore.tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode=WAL")
        finally:
            dst.close()
    finally:
        src.close()
    for suffix in ("-wal", "-shm"):     # leftovers of an empty database would not match the copy
        Path(database + suffix).unlink(missing_ok=True)
    os.replace(tmp, target)
    return f"ok: {path} restored into {database} (schema version {version})"


def _sqlite_version(db: sqlite3.Connection) -> int:
    has = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                     "name = 'schema_version'").fetchone()
    if not has:
        return 0
    return int(db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)


def _pg_require_empty(url: str) -> None:
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("SELECT COUNT(*) FROM information_schema.tables "
                               "WHERE table_schema = 'public'").fetchone()
    except psycopg.Error as exc:
        raise BackupError(f"database: {_safe(url)}: {exc}".strip()) from exc
    tables = int(row[0]) if row else 0
    if tables:
        raise BackupError(f"database: {_safe(url)} is not empty ({tables} tables); restore "
                          "only into a new database (CREATE DATABASE ...)")


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the client binaries out of PATH, one directory per major version.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit()
                        else 0)
    if not candidates:
        raise BackupError(f"{name} not found (install the PostgreSQL client: "
                          "apt-get install postgresql-client)")
    return candidates[-1]


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        tool = Path(argv[0]).name
        detail = proc.stderr.strip().splitlines()
        raise BackupError(f"{tool} failed (exit {proc.returncode}): "
                          f"{detail[-1] if detail else 'no output'}")


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def run(command: str, config_path: str, path: str) -> int:
    """`gateway control-db backup|restore --config control.yaml PATH`: 0 ok, 2 refused/failed."""
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    try:
        line = backup(cfg.database, path) if command == "backup" else \
            restore(cfg.database, path)
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0
