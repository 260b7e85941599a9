"""The control plane's database seam: which engine a `database:` value names.

`database:` is a SQLite file path (the default, embedded) or a `postgresql://` URL.
"""

from __future__ import annotations


def is_postgresql(database: str) -> bool:
    """True for a `postgresql://` / `postgres://` URL, False for a SQLite path."""
    return database.startswith(("postgresql://", "postgres://"))
