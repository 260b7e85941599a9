"""The control plane's database seam: SQLite (embedded default) or PostgreSQL (several replicas).

`database:` is a SQLite file path or a `postgresql://user:pass@host:port/db` URL. `connect()`
returns a `Connection`: the small, sqlite3-shaped surface the Store uses (execute, executemany,
close; BEGIN / COMMIT / ROLLBACK as statements), so that store.py holds all the SQL, written
once, and this module holds what differs between the engines:

* placeholders: the Store writes qmark (`?`); PostgreSQL gets `%s` (a literal `%` is doubled);
* two-argument `max(a, b)` / `min(a, b)` (scalar in SQLite) become GREATEST / LEAST;
* `BEGIN IMMEDIATE` (SQLite's writer lock up front) is a plain BEGIN: PostgreSQL locks rows;
* `lastrowid`: an INSERT into a table with an identity `id` gets `RETURNING id`;
* DDL (`ddl()`): `id INTEGER PRIMARY KEY [AUTOINCREMENT]` -> an identity column, INTEGER ->
  BIGINT, REAL -> DOUBLE PRECISION, BLOB -> BYTEA, no `WITHOUT ROWID`;
* unique violations raise `IntegrityError`, a subclass of sqlite3's, so callers catch one type;
  text with a NUL character (which PostgreSQL cannot store) raises `UnstorableText` (a 400).

Upserts are written `INSERT ... ON CONFLICT (...) DO UPDATE/NOTHING` with the existing row's
columns qualified by the table name: the same text is valid in both engines.

PostgreSQL: psycopg 3 with a psycopg_pool ConnectionPool, used from the Store's one writer
thread (the Store's lock serialises its calls, as with SQLite): a connection is taken for one
statement, or held from BEGIN to COMMIT, so a connection the server dropped fails one call and
is then replaced by the pool (it discards a broken connection given back) instead of failing
every later call. No check on each checkout: that is one more round trip per statement. psycopg rather than asyncpg: the Store is synchronous
and runs on a thread, which psycopg serves directly; asyncpg would need the whole Store and its
~90 call sites made async.

`JobLock`: background jobs (evaluation, compaction, retention, finops) run on one replica at a
time. PostgreSQL: a session-level `pg_try_advisory_lock` per job on a connection of its own; the
server releases it the moment that connection closes, so a replica that dies hands its jobs over
at once, without a lease to expire. SQLite: one process, always the holder.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import psycopg
from psycopg_pool import ConnectionPool

log = logging.getLogger("gateway.control.database")


def is_postgresql(database: str) -> bool:
    """True for a `postgresql://` / `postgres://` URL, False for a SQLite path."""
    return database.startswith(("postgresql://", "postgres://"))


class IntegrityError(sqlite3.IntegrityError):
    """A constraint violation from PostgreSQL, catchable as sqlite3.IntegrityError."""


class UnstorableText(ValueError):
    """Text PostgreSQL cannot hold (a NUL character): bad input, answered with a 400."""


class Cursor(Protocol):
    rowcount: int
    lastrowid: int | None

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the Store needs of a database connection (sqlite3.Connection has it as is)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Any: ...
    def close(self) -> None: ...


def connect_sqlite(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA foreign_keys=ON")
    return db


# ---------------------------------------------------------------------------------------------
# SQL dialect


_PAIR = re.compile(r"\b(max|min)\(([^(),]+),([^(),]+)\)")
_INSERT_INTO = re.compile(r"^\s*INSERT\s+INTO\s+(\w+)", re.IGNORECASE)
_ID_COLUMN = re.compile(r"CREATE TABLE (\w+) \(\s*id INTEGER PRIMARY KEY", re.IGNORECASE)


def to_postgresql(sql: str) -> str:
    """A Store statement (SQLite dialect, qmark) in PostgreSQL's dialect (format placeholders)."""
    if sql.strip().upper() == "BEGIN IMMEDIATE":
        return "BEGIN"
    sql = _PAIR.sub(lambda m: f"{'GREATEST' if m[1] == 'max' else 'LEAST'}({m[2]},{m[3]})", sql)
    out: list[str] = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


POSTGRESQL_ONLY = "-- PostgreSQL only\n"


def ddl(sql: str, postgresql: bool) -> str:
    """A migration statement for the engine (migrations are written in SQLite's dialect); ""
    for a statement marked POSTGRESQL_ONLY on SQLite (a column type SQLite does not enforce)."""
    if sql.startswith(POSTGRESQL_ONLY):
        return sql[len(POSTGRESQL_ONLY):] if postgresql else ""
    if not postgresql:
        return sql
    sql = re.sub(r"\bid INTEGER PRIMARY KEY( AUTOINCREMENT)?",
                 "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    sql = re.sub(r"\bBLOB\b", "BYTEA", sql)
    return sql.replace(" WITHOUT ROWID", "")


def identity_tables(statements: Iterable[str]) -> frozenset[str]:
    """Tables whose `id` the database assigns (INSERTs into them report lastrowid)."""
    return frozenset(m[1] for s in statements for m in [_ID_COLUMN.search(s)] if m)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


class _Result:
    """A finished statement's rows (fetched at once: the connection goes back to the pool)."""

    __slots__ = ("_i", "_rows", "lastrowid", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int, lastrowid: int | None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid
        self._i = 0

    def fetchone(self) -> Any:
        if self._i >= len(self._rows):
            return None
        self._i += 1
        return self._rows[self._i - 1]

    def fetchall(self) -> list[Any]:
        rows, self._i = self._rows[self._i:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


_VALUES = re.compile(r"^(\s*INSERT\s+INTO\s+\w+\s*\(([^)]*)\)\s*VALUES\s*)(\([^)]*\))(.*)$",
                     re.IGNORECASE | re.DOTALL)
_QMARK = re.compile(r"%s")
_PERCENT = re.compile(r"%%")
_CONFLICT = re.compile(r"ON\s+CONFLICT\s*\(([^)]*)\)\s*DO\s+UPDATE", re.IGNORECASE)


def numbered(text: str) -> str:
    """A translated statement (`%s` placeholders, `%%` for a literal `%`) with server-side
    placeholders `$1, $2, ...` instead, for a RawCursor."""
    count = itertools.count(1)
    return _PERCENT.sub("%", _QMARK.sub(lambda _m: f"${next(count)}", text))


class _MultiRow:
    """An `INSERT ... VALUES (row) [ON CONFLICT ...]` sent as one multi-row statement per up to
    `per_statement` rows instead of one execution per row: the ingest of a batch upserts ~300
    bucket rows, and one statement costs the server and psycopg a fraction of 300 (measured in
    benchmarks/bench_control.py). A DO UPDATE statement may not touch one row twice, so rows
    that repeat a conflict key go the row-by-row way (SQLite's semantics: they add up)."""

    __slots__ = ("_head", "_key", "_row", "_sql", "_tail", "per_statement")

    def __init__(self, head: str, row: str, tail: str, key: tuple[int, ...] | None,
                 width: int) -> None:
        self._head, self._row, self._tail, self._key = head, row, tail, key
        self._sql: dict[int, str] = {}
        self.per_statement = max(1, min(1000, 60_000 // max(1, width)))

    @classmethod
    def of(cls, text: str) -> _MultiRow | None:
        """None when the statement is not a one-row INSERT ... VALUES."""
        m = _VALUES.match(text)
        if m is None:
            return None
        cols = [c.strip() for c in m[2].split(",")]
        key: tuple[int, ...] | None = None
        conflict = _CONFLICT.search(m[4])
        if conflict is not None:
            names = [c.strip() for c in conflict[1].split(",")]
            if not set(names) <= set(cols):
                return None
            key = tuple(cols.index(c) for c in names)
        return cls(m[1], m[3], m[4], key, len(cols))

    def fits(self, rows: list[tuple[Any, ...]]) -> bool:
        if self._key is None or len(rows) < 2:
            return True
        keys = {tuple(r[i] for i in self._key) for r in rows}
        return len(keys) == len(rows)

    def sql(self, n: int) -> str:
        """The statement for n rows, numbered placeholders ($1, $2, ...)."""
        text = self._sql.get(n)
        if text is None:
            text = self._sql[n] = numbered(self._head + ", ".join([self._row] * n) + self._tail)
        return text


class PostgresConnection:
    """sqlite3-shaped access to PostgreSQL through a psycopg pool (see the module docstring)."""

    def __init__(self, url: str, identity: frozenset[str], *, max_size: int = 4,
                 timeout_s: float = 10.0) -> None:
        self._psycopg = psycopg
        self._identity = identity
        self._sql: dict[str, tuple[str, bool]] = {}
        self._multi: dict[str, _MultiRow | None] = {}
        self._numbered: dict[str, str] = {}
        self._pool = ConnectionPool(url, min_size=1, max_size=max_size, timeout=timeout_s,
                                    kwargs={"autocommit": True}, open=False,
                                    name="gateway-control")
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except Exception as exc:
            self._pool.close()
            raise ConnectionError(f"database: cannot connect to PostgreSQL: {exc}") from exc
        self._tx: Any = None          # the connection held from BEGIN to COMMIT/ROLLBACK
        # a pipelined transaction's open pipeline (begin(pipelined=True)), else None
        self._pipe: contextlib.ExitStack | None = None
        self._pipeline: Any = None    # its psycopg Pipeline

    def _translate(self, sql: str) -> tuple[str, bool]:
        hit = self._sql.get(sql)
        if hit is None:
            text = to_postgresql(sql)
            m = _INSERT_INTO.match(text)
            returning = bool(m and m[1] in self._identity and "RETURNING" not in text.upper())
            if returning:
                text += " RETURNING id"
            hit = self._sql[sql] = (text, returning)
        return hit

    def begin(self, *, pipelined: bool = False) -> None:
        """BEGIN: a connection is held until COMMIT/ROLLBACK.

        pipelined: the transaction is one psycopg pipeline from BEGIN to COMMIT. Statements go
        out without waiting for their replies; `execute` (whose rows or row count a caller may
        read) waits for everything sent before it, `executemany` (bulk writes, row count not
        known: -1) does not wait, and the last writes leave with the COMMIT. A transaction of
        ingest costs two round trips instead of four or more, and the rows it upserts (the
        buckets every replica writes) stay locked only while the server runs the last flush,
        not across round trips. An error in a write surfaces at the next wait or at COMMIT,
        and the whole transaction is rolled back as before."""
        self._tx = self._pool.getconn()
        try:
            if pipelined:
                stack = contextlib.ExitStack()
                self._pipeline = stack.enter_context(self._tx.pipeline())
                self._pipe = stack
            self._tx.execute("BEGIN")
        except BaseException:
            self._end_pipeline()
            self._release()
            raise

    def _end_pipeline(self) -> None:
        """Leave a pipelined transaction's pipeline, sending what it queued (errors raised)."""
        stack, self._pipe, self._pipeline = self._pipe, None, None
        if stack is not None:
            stack.close()

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _Result:
        word = sql.strip().upper()
        if word in ("BEGIN", "BEGIN IMMEDIATE"):
            self.begin()
            return _Result([], -1, None)
        if word in ("COMMIT", "ROLLBACK"):
            conn, self._tx = self._tx, None
            try:
                if conn is not None:
                    if word == "COMMIT" and self._pipe is not None:
                        conn.execute(word)          # with the writes still queued
                        self._end_pipeline()
                    else:
                        if self._pipe is not None:  # rolling back: what was queued is moot
                            try:
                                self._end_pipeline()
                            except self._psycopg.Error as exc:
                                log.debug("pipeline of a failed transaction",
                                          extra={"error": str(exc)})
                        conn.execute(word)
            except self._psycopg.Error as exc:
                if word == "COMMIT":
                    raise self._wrap(exc) from exc
                log.warning("rollback failed", extra={"error": str(exc)})
            finally:
                self._pipe = self._pipeline = None
                if conn is not None:
                    self._pool.putconn(conn)
            return _Result([], -1, None)
        text, returning = self._translate(sql)
        try:
            if self._tx is not None:
                return self._run(self._tx, text, parameters, returning)
            with self._pool.connection() as conn:
                return self._run(conn, text, parameters, returning)
        except self._psycopg.Error as exc:
            raise self._wrap(exc) from exc

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """Inside a transaction, send the statements without waiting for each reply (psycopg's
        pipeline mode): one round trip at the end instead of one per statement, so row locks are
        held for less time. For writes whose results the caller does not read (row counts are
        not known until the end); errors surface when the block ends. Inside a pipelined
        transaction the statements are pipelined already, and wait for its COMMIT."""
        if self._tx is None or self._pipe is not None:
            yield
            return
        try:
            with self._tx.pipeline():
                yield
        except self._psycopg.Error as exc:
            raise self._wrap(exc) from exc

    def write(self, sql: str, parameters: Sequence[Any]) -> None:
        """A statement whose result nobody reads: in a pipelined transaction it leaves with the
        next flush instead of waiting for its reply. Sent with numbered placeholders (psycopg
        does not parse a long text for `%s`)."""
        text = self._numbered.get(sql)
        if text is None:
            text = numbered(to_postgresql(sql))
            if len(self._numbered) < 4096:
                self._numbered[sql] = text
        self._execute_raw(text, list(parameters))

    def _execute_raw(self, text: str, parameters: list[Any]) -> int:
        """One statement with server-side `$n` placeholders (a RawCursor: psycopg does not parse
        the long text for `%s`, which costs more than the statement); its rowcount."""
        try:
            if self._tx is not None:
                with self._psycopg.RawCursor(self._tx) as cur:
                    return int(cur.execute(text, parameters).rowcount)
            with self._pool.connection() as conn, self._psycopg.RawCursor(conn) as cur:
                return int(cur.execute(text, parameters).rowcount)
        except self._psycopg.Error as exc:
            raise self._wrap(exc) from exc

    def _run(self, conn: Any, text: str, parameters: Sequence[Any], returning: bool) -> _Result:
        cur = conn.execute(text, tuple(parameters))
        if self._pipeline is not None and conn is self._tx:
            self._pipeline.sync()      # this statement's rows and row count, and all before it
        rows = cur.fetchall() if cur.description is not None else []
        lastrowid = int(rows[0][0]) if returning and rows else None
        return _Result(rows, cur.rowcount, lastrowid)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]]) -> _Result:
        text, _ = self._translate(sql)
        rows = [tuple(p) for p in seq_of_parameters]
        if not rows:
            return _Result([], 0, None)
        if sql not in self._multi:
            self._multi[sql] = _MultiRow.of(text)
        multi = self._multi[sql]
        if multi is not None and multi.fits(rows):
            n = 0
            for i in range(0, len(rows), multi.per_statement):
                part = rows[i:i + multi.per_statement]
                n += self._execute_raw(multi.sql(len(part)), [v for row in part for v in row])
            return _Result([], n, None)
        try:
            if self._tx is not None:
                with self._tx.cursor() as cur:
                    cur.executemany(text, rows)
                    return _Result([], cur.rowcount, None)
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.executemany(text, rows)
                return _Result([], cur.rowcount, None)
        except self._psycopg.Error as exc:
            raise self._wrap(exc) from exc

    def _wrap(self, exc: BaseException) -> BaseException:
        if isinstance(exc, self._psycopg.IntegrityError):
            return IntegrityError(str(exc))
        if isinstance(exc, self._psycopg.DataError) and "NUL" in str(exc):
            # SQLite stores and compares such text; PostgreSQL refuses it before sending
            return UnstorableText("text with a NUL character (\\u0000) is not accepted")
        return exc

    def _release(self) -> None:
        conn, self._tx = self._tx, None
        if conn is not None:
            self._pool.putconn(conn)

    def close(self) -> None:
        self._release()
        self._pool.close()


# ---------------------------------------------------------------------------------------------
# One replica per job


class JobLock:
    """Whether this process runs a background job now (see the module docstring)."""

    def __init__(self, database: str) -> None:
        self._url = database if is_postgresql(database) else None
        self._conn: Any = None
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    def holds(self, job: str) -> bool:
        """True when this replica runs `job` (acquiring it if free). Blocking: call it on the
        database thread."""
        if self._url is None:
            return True
        with self._mutex:
            try:
                if self._conn is None or self._conn.closed:
                    self._held.clear()
                    self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
                if job in self._held:
                    self._conn.execute("SELECT 1")     # still connected: still ours
                    return True
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)",
                                         (_lock_key(job),)).fetchone()
            except psycopg.Error as exc:
                log.warning("job lock unavailable", extra={"job": job, "error": str(exc)})
                self._drop()
                return False
            if row and row[0]:
                self._held.add(job)
                log.info("running background job here", extra={"event": "job_lock_acquired",
                                                               "job": job})
                return True
            return False

    def _drop(self) -> None:
        self._held.clear()
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError as exc:      # closing a connection that is gone already
                log.debug("job lock connection close failed", extra={"error": str(exc)})
            self._conn = None

    def close(self) -> None:
        with self._mutex:
            self._drop()


def _lock_key(job: str) -> int:
    """A stable 63-bit advisory-lock key per job name."""
    return zlib.crc32(b"gateway.control.job:" + job.encode()) | (0x6761 << 32)
