"""The base of the store's repositories: each one works on its Store's connection, under its lock
and transactions; and the SQL helpers they share."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import orjson

from gateway.clock import Clock
from gateway.control.store import database

if TYPE_CHECKING:
    from gateway.control.store.core import Store


class Repository:
    """One aggregate's SQL on the Store's connection (called on the database thread)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def _db(self) -> database.Connection:
        return self._store._db

    @property
    def _lock(self) -> threading.RLock:
        return self._store._lock

    @property
    def postgresql(self) -> bool:
        return self._store.postgresql

    @property
    def clock(self) -> Clock:
        return self._store.clock

    def transaction(self) -> AbstractContextManager[None]:
        return self._store.transaction()

    def _write(self, sql: str, parameters: Sequence[Any]) -> None:
        """A write whose result is not read (on PostgreSQL it does not wait for its reply in a
        pipelined transaction)."""
        db = self._db
        if isinstance(db, database.PostgresConnection):
            db.write(sql, parameters)
        else:
            db.execute(sql, parameters)

    def _update_row(self, table: str, allowed: tuple[str, ...], json_cols: Any, row_id: Any,
                    fields: dict[str, Any]) -> bool:
        """UPDATE one row by id. Column names come from the constant `allowed` tuple, never from
        input; JSON columns are encoded (None stays NULL)."""
        cols = [c for c in fields if c in allowed and c != "id"]
        if len(cols) != len(fields):
            raise ValueError(f"unknown {table} columns: {sorted(set(fields) - set(cols))}")
        vals = [orjson.dumps(fields[c]).decode() if c in json_cols and fields[c] is not None
                else fields[c] for c in cols]
        with self.transaction():
            return self._db.execute(
                f"UPDATE {table} SET " + ", ".join(f"{c} = ?" for c in cols) + " WHERE id = ?",
                (*vals, row_id)).rowcount == 1


def key_sorted(rows: Iterable[tuple[Any, ...]], *key: int) -> list[tuple[Any, ...]]:
    """Upsert rows in primary-key order: two replicas writing the same rows in one transaction
    each then lock them in the same order and wait for each other instead of deadlocking."""
    return sorted(rows, key=lambda r: tuple(r[i] for i in key))


def and_where(sql: str, args: list[Any], *conditions: tuple[str, Any]) -> str:
    """`sql` with ` AND <condition>` for each (condition, value) whose value is not None; the
    value joins `args`."""
    for condition, value in conditions:
        if value is not None:
            sql += f" AND {condition}"
            args.append(value)
    return sql
