"""Schema checks for the JSON files ptqd reads back (run configs, summaries, model and statistics metadata).

A schema is a dict ``{field: type}``: a type is a string (``"int"``, ``"number"``, ``"str"``,
``"bool"``, ``"list"``, ``"dict"``, ``"list[int]"``, ``"list[str]"``, ``"any"``, alternatives
joined by ``|`` as in ``"number|null"``) or a nested schema for an object; a field name ending in
``?`` is optional. Every error names the file and the field (dotted), says what was found and
what to do (``fix``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ptqd.errors import PtqdError


def _typename(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is(v: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "null":
        return v is None
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "dict":
        return isinstance(v, dict)
    if kind == "list":
        return isinstance(v, list)
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(v, list) and all(_is(x, kind[5:-1]) for x in v)
    raise ValueError(f"unknown schema type {kind!r}")


_WORDS = {"int": "an integer", "number": "a finite number", "str": "a string", "bool": "true or false", "dict": "an object",
          "list": "a list", "null": "null", "list[int]": "a list of integers", "list[str]": "a list of strings"}


def _short(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, float) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_object(data: Any, schema: dict[str, Any], file: str | Path, fix: str, prefix: str = "") -> dict[str, Any]:
    """Check ``data`` against ``schema``; return it (a dict) or raise a PtqdError naming ``file`` and the field."""
    if not isinstance(data, dict):
        where = f"field {prefix.rstrip('.')!r}" if prefix else "its content"
        raise PtqdError(f"{file}: {where} must be a JSON object, got {_typename(data)}; {fix}")
    for key, want in schema.items():
        optional = key.endswith("?")
        key = key.rstrip("?")
        name = prefix + key
        if key not in data:
            if optional:
                continue
            raise PtqdError(f"{file}: field {name!r} is missing; {fix}")
        value = data[key]
        if isinstance(want, dict):
            check_object(value, want, file, fix, name + ".")
        elif not any(_is(value, k) for k in want.split("|")):
            words = " or ".join(_WORDS.get(k, k) for k in want.split("|"))
            raise PtqdError(f"{file}: field {name!r} must be {words}, got {_typename(value)} {_short(value)}; {fix}")
    return data


def fail(file: str | Path, field: str, problem: str, fix: str) -> PtqdError:
    """A PtqdError naming ``file`` and ``field`` (to raise)."""
    return PtqdError(f"{file}: field {field!r} {problem}; {fix}")


def read_json(path: str | Path, fix: str, schema: dict[str, Any] | None = None, what: str = "file") -> Any:
    """Parse the JSON file ``path`` (a clear error for unreadable bytes, bad JSON, a non-object with
    ``schema``) and check it against ``schema``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PtqdError(f"{what} {path} does not exist; {fix}") from None
    except UnicodeDecodeError as e:
        raise PtqdError(f"{path} is not a text (UTF-8) JSON file: byte {e.start} cannot be decoded; {fix}") from None
    except OSError as e:
        raise PtqdError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    data = parse_json(text, path, fix)
    if schema is not None:
        check_object(data, schema, path, fix)
    return data


def parse_json(text: str, where: str | Path, fix: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PtqdError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    except RecursionError:
        raise PtqdError(f"{where} is not valid JSON (nested too deeply); {fix}") from None
