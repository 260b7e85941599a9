"""The validation kit both planes build on (gateway/validation.py): each parser returns the value
or None and adds `path: message`, so one pass reports every mistake."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import validation as valid


def run(parser: Any, value: Any, **kw: Any) -> tuple[Any, list[str]]:
    errs = valid.Errors()
    return parser(value, "a.b", errs, **kw), errs.lines


def test_string_blank_and_maximum():
    assert run(valid.string, "abc", maximum=3) == ("abc", [])
    assert run(valid.string, "abcd", maximum=3) == (None, ["a.b: must be at most 3 characters, "
                                                           "got 4"])
    assert run(valid.string, " ") == (None, ["a.b: must not be empty"])
    assert run(valid.string, "", nonempty=False) == ("", [])
    assert run(valid.string, 3) == (None, ["a.b: must be a string, got an integer"])
    assert run(valid.string, "a\x00b") == (None, ["a.b: must not contain a NUL character"])


def test_name_maximum():
    assert run(valid.name, "pro", maximum=3) == ("pro", [])
    assert run(valid.name, "prof", maximum=3)[1] == ["a.b: must be at most 3 characters, got 4"]


def test_string_map_names_each_bad_value():
    assert run(valid.string_map, {"x": "1"}) == ({"x": "1"}, [])
    assert run(valid.string_map, {"x": 1, "y": None}) == (None, [
        "a.b.x: must be a string, got an integer", "a.b.y: must be a string, got null"])
    assert run(valid.string_map, [1]) == (None, ["a.b: must be a mapping of strings to strings, "
                                              "got a list"])


def test_mapping_with_any_keys():
    assert run(valid.mapping, {"anything": 1}, allowed=None) == ({"anything": 1}, [])
    assert run(valid.mapping, {}, allowed=None, required={"k"}) == ({}, ["a.b.k: is required"])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_numbers_are_finite(value):
    assert run(valid.number, value)[0] is None
    assert run(valid.number, value)[1][0].startswith("a.b: must be a finite number")


def test_instant():
    assert run(valid.instant, 1_700_000_000) == (1_700_000_000.0, [])
    assert run(valid.instant, "1700000000.5") == (1_700_000_000.5, [])
    assert run(valid.instant, "2023-11-14T22:13:20Z") == (1_700_000_000.0, [])
    assert run(valid.instant, "2023-11-14T22:13:20") == (1_700_000_000.0, [])      # UTC
    assert run(valid.instant, "2023-11-15T00:13:20+02:00") == (1_700_000_000.0, [])
    assert run(valid.instant, "soon") == (None, ["a.b: must be unix seconds or ISO-8601, "
                                                 "got 'soon'"])
    assert run(valid.instant, "nan") == (None, ["a.b: must be a finite number, got 'nan'"])
    assert run(valid.instant, True) == (None, ["a.b: must be unix seconds or ISO-8601, got a "
                                               "boolean"])
    assert run(valid.instant, None)[0] is None


def test_string_list_names_each_bad_item():
    assert run(valid.string_list, ["a", ""]) == (["a", ""], [])
    assert run(valid.string_list, ["a", 2]) == (None, ["a.b[1]: must be a string, got an integer"])
    assert run(valid.string_list, "a") == (None, ["a.b: must be a list, got a string"])


def test_errors_check_raises_every_line():
    errs = valid.Errors()
    errs.check()                                   # nothing found: nothing raised
    errs.add("x", "is required")
    errs.add("y", "unknown key")
    with pytest.raises(valid.Invalid) as exc:
        errs.check()
    assert exc.value.lines == ["x: is required", "y: unknown key"]
    assert str(exc.value) == "x: is required"
