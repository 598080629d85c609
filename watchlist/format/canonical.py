"""Canonical JSON: the one byte form of a JSON value that HQ signs.

Rules (docs/watchlist.md repeats them): UTF-8 with every non-ASCII character escaped as \\uXXXX
(so the bytes are ASCII), object keys sorted by code point, no whitespace, integers in decimal,
floats in the shortest form that reads back to the same IEEE-754 double (Python's repr), no NaN
or infinity. The verifier checks the signature over the bytes it received and only then parses
them, so the canonical form is what makes builds reproducible, not a condition of verification.
"""

from __future__ import annotations

import json
from typing import Any


class CanonicalError(ValueError):
    """A value that has no canonical JSON form (NaN, infinity, a non-string key, bytes...)."""


def _check(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalError(f"{where}: object key {k!r} is not a string")
            _check(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, f"{where}[{i}]")
    elif value is None or isinstance(value, (str, bool, int, float)):
        return
    else:
        raise CanonicalError(f"{where}: {type(value).__name__} has no JSON form")


def dumps(value: Any) -> bytes:
    """The canonical bytes of `value`."""
    _check(value, "$")
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError as exc:
        raise CanonicalError(str(exc)) from None
    return text.encode("ascii")


def _no_constant(name: str) -> Any:
    raise CanonicalError(f"{name} is not allowed in watchlist JSON")


def loads(data: bytes) -> Any:
    """Parse JSON bytes (any valid JSON without NaN/Infinity; canonical form is not required to read).
    Raises CanonicalError on anything else."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CanonicalError(f"not valid JSON: {exc}") from None
