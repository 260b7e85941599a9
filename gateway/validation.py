"""The one way both planes check what users give them: YAML config files and JSON request bodies.

Each parser takes (value, path, errors), returns the parsed value or None, and adds
`path.to.key: message` to `errors` when the value is wrong, so one pass reports every mistake
with its place. The data plane's config loader, the control plane's config loader and the control
plane's API bodies all build on these.
"""

from __future__ import annotations

import difflib
import math
import re
from datetime import UTC, datetime
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


class Invalid(ValueError):
    """A document with problems, raised once they are all found: `lines`, each
    `path: message` (the control plane's API answers it as one 400 problem listing them)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines[0] if lines else "invalid")
        self.lines = list(lines)


class Errors:
    """Every problem found in one document, each as `path: message`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")

    def check(self) -> None:
        """Raise Invalid with every problem found, if there is one."""
        if self.lines:
            raise Invalid(self.lines)


def mapping(value: Any, path: str, errs: Errors, allowed: set[str] | None,
            required: set[str] = frozenset()) -> dict[str, Any] | None:  # type: ignore[assignment]
    """A mapping whose keys are all in `allowed` (any keys when None; an unknown one is named,
    with the closest allowed key as a hint) and hold every key of `required`."""
    if not isinstance(value, dict):
        errs.add(path, f"must be a mapping, got {kind(value)}")
        return None
    for key in value:
        if allowed is not None and key not in allowed:
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


def string(value: Any, path: str, errs: Errors, *, nonempty: bool = True,
           maximum: int | None = None) -> str | None:
    """A string; not blank unless `nonempty` is false; at most `maximum` characters if given;
    never with a NUL character (no database stores one in text, and no name or header holds
    one)."""
    if not isinstance(value, str):
        errs.add(path, f"must be a string, got {kind(value)}")
        return None
    if "\x00" in value:
        errs.add(path, "must not contain a NUL character")
        return None
    if nonempty and not value.strip():
        errs.add(path, "must not be empty")
        return None
    if maximum is not None and len(value) > maximum:
        errs.add(path, f"must be at most {maximum} characters, got {len(value)}")
        return None
    return value


def string_map(value: Any, path: str, errs: Errors) -> dict[str, str] | None:
    """A mapping of strings to strings (labels, tags)."""
    if not isinstance(value, dict):
        errs.add(path, f"must be a mapping of strings to strings, got {kind(value)}")
        return None
    ok = True
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            errs.add(f"{path}.{k}", f"must be a string, got {kind(v)}")
            ok = False
    return value if ok else None


def string_list(value: Any, path: str, errs: Errors) -> list[str] | None:
    """A list of strings (each may be empty)."""
    items = listing(value, path, errs)
    if items is None:
        return None
    ok = True
    for i, v in enumerate(items):
        if not isinstance(v, str):
            errs.add(f"{path}[{i}]", f"must be a string, got {kind(v)}")
            ok = False
    return items if ok else None


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
    if not math.isfinite(v):
        errs.add(path, f"must be a finite number, got {value}")
        return None
    if minimum is not None and (v <= minimum if exclusive_min else v < minimum):
        errs.add(path, f"must be {'>' if exclusive_min else '>='} {minimum:g}, got {value}")
        return None
    if maximum is not None and v > maximum:
        errs.add(path, f"must be <= {maximum:g}, got {value}")
        return None
    return v


def instant(value: Any, path: str, errs: Errors) -> float | None:
    """A point in time as unix seconds: a finite number, or an ISO-8601 / RFC 3339 string (one
    without a zone means UTC; a string of digits is unix seconds too)."""
    if isinstance(value, str):
        try:
            t = float(value)
        except ValueError:
            try:
                dt = datetime.fromisoformat(value.strip().replace("z", "Z"))
            except ValueError:
                errs.add(path, f"must be unix seconds or ISO-8601, got {value!r}")
                return None
            return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
        if not math.isfinite(t):
            errs.add(path, f"must be a finite number, got {value!r}")
            return None
        return t
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errs.add(path, f"must be unix seconds or ISO-8601, got {kind(value)}")
        return None
    return number(value, path, errs)


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


def name(value: Any, path: str, errs: Errors, *, maximum: int | None = None) -> str | None:
    """A name (services, plans, targets): letters, digits, '_', '.', ':' and '-' only."""
    s = string(value, path, errs, maximum=maximum)
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
