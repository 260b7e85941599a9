"""The one way both planes check what users give them: YAML config files and JSON request bodies.

Each parser takes (value, path, errors), returns the parsed value or None, and adds
`path.to.key: message` to `errors` when the value is wrong, so one pass reports every mistake
with its place. The data plane's config loader, the control plane's config loader and the control
plane's API bodies all build on these.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


class Errors:
    """Every problem found in one document, each as `path: message`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")


def mapping(value: Any, path: str, errs: Errors, allowed: set[str],
            required: set[str] = frozenset()) -> dict[str, Any] | None:  # type: ignore[assignment]
    if not isinstance(value, dict):
        errs.add(path, f"must be a mapping, got {kind(value)}")
        return None
    for key in value:
        if key not in allowed:
            hint = closest(str(key), allowed)
            errs.add(f"{path}.{key}" if path else str(key),
                     "unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
    for key in sorted(required):
        if key not in value:
            errs.add(f"{path}.{key}" if path else key, "is required")
    return value


def closest(key: str, allowed: set[str]) -> str | None:
    found = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
    return found[0] if found else None


def kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def string(value: Any, path: str, errs: Errors, *, nonempty: bool = True) -> str | None:
    if not isinstance(value, str):
        errs.add(path, f"must be a string, got {kind(value)}")
        return None
    if nonempty and not value.strip():
        errs.add(path, "must not be empty")
        return None
    return value


def boolean(value: Any, path: str, errs: Errors) -> bool | None:
    if not isinstance(value, bool):
        errs.add(path, f"must be true or false, got {value!r}")
        return None
    return value


def integer(value: Any, path: str, errs: Errors, *, minimum: int | None = None,
            maximum: int | None = None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        errs.add(path, f"must be an integer, got {value!r}")
        return None
    if minimum is not None and value < minimum:
        errs.add(path, f"must be >= {minimum}, got {value}")
        return None
    if maximum is not None and value > maximum:
        errs.add(path, f"must be <= {maximum}, got {value}")
        return None
    return value


def number(value: Any, path: str, errs: Errors, *, minimum: float | None = None,
           exclusive_min: bool = False, maximum: float | None = None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errs.add(path, f"must be a number, got {value!r}")
        return None
    v = float(value)
    if minimum is not None and (v <= minimum if exclusive_min else v < minimum):
        errs.add(path, f"must be {'>' if exclusive_min else '>='} {minimum:g}, got {value}")
        return None
    if maximum is not None and v > maximum:
        errs.add(path, f"must be <= {maximum:g}, got {value}")
        return None
    return v


def choice(value: Any, path: str, errs: Errors, choices: tuple[str, ...]) -> str | None:
    if value not in choices:
        errs.add(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return None
    return value  # type: ignore[no-any-return]


def listing(value: Any, path: str, errs: Errors) -> list[Any] | None:
    if not isinstance(value, list):
        errs.add(path, f"must be a list, got {kind(value)}")
        return None
    return value


def name(value: Any, path: str, errs: Errors) -> str | None:
    s = string(value, path, errs)
    if s is not None and not _NAME.match(s):
        errs.add(path, f"may contain only letters, digits, '_', '.', ':' and '-', got {s!r}")
        return None
    return s


def readable(value: Any, path: str, errs: Errors) -> str | None:
    """A file path that exists and can be read (certificates, keys, CA bundles)."""
    s = string(value, path, errs)
    if s is None:
        return None
    try:
        with open(s, "rb"):
            pass
    except OSError as exc:
        errs.add(path, f"cannot read {s!r}: {exc.strerror}")
        return None
    return s
