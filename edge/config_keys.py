"""Keys of the unit config: where a value sits in the raw TOML and in the models, and how a key and
pydantic's error about it are put into words ("cameras[1].url: ...").

A location (`loc`) is a tuple of table keys and list indexes, as pydantic gives them: ("cameras", 1, "url").
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel


def dotted(loc: tuple[Any, ...]) -> str:
    """A location as the user writes the key: cameras[1].url."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Pydantic's error location with only the keys the user wrote."""
    # Pydantic adds the name of the union member or function validator it tried (e.g. 'MqttConfig',
    # 'function-after[...]'); they are not keys the user wrote.
    last = len(loc) - 1
    return tuple(
        p
        for i, p in enumerate(loc)
        if isinstance(p, int) or not ("[" in p or p.startswith("function-") or (p[:1].isupper() and i < last))
    )


def describe(err: Any, raw: dict[str, Any], root: type[BaseModel]) -> str:
    """One of pydantic's errors about `raw` (validated as `root`) in words: the key, what is wrong,
    the value given, the keys allowed where an unknown one was found."""
    loc = clean_loc(tuple(err.get("loc", ())))
    key = dotted(loc) or "(top level)"
    kind = err.get("type", "")
    msg = err.get("msg", "")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{key}: unknown key{hint}; check its spelling or remove it"
    if kind == "missing":
        return f"{key}: required key is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not loc:
        return msg
    value = raw_value(raw, loc)  # TOML has no null: None means the key is absent
    if value is not None and kind not in ("model_type", "dict_type", "list_type"):
        if isinstance(value, (dict, list)):
            return f"{key}: {msg}"
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if f"got {shown}" in msg or f"got {value}" in msg:  # the model's own message already shows it
            return f"{key}: {msg}"
        return f"{key}: {msg} (got {shown})"
    return f"{key}: {msg}"


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = model_of(field.annotation)
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field's annotation names (also inside Optional, lists and unions), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = model_of(arg)
        if found is not None:
            return found
    return None


def default_of(model: type[BaseModel], loc: tuple[str, ...]) -> Any:
    """The default of the field at `loc` under `model` (None for a required field)."""
    for part in loc[:-1]:
        sub = model_of(model.model_fields[part].annotation)
        if sub is None:
            return None
        model = sub
    field = model.model_fields[loc[-1]]
    return None if field.is_required() else field.get_default(call_default_factory=True)


def raw_value(raw: dict[str, Any], loc: tuple[Any, ...]) -> Any:
    """The value at `loc` in the raw TOML, None where there is none."""
    for part in loc:
        if isinstance(part, int) and isinstance(raw, list) and 0 <= part < len(raw):
            raw = raw[part]
        elif isinstance(part, str) and isinstance(raw, dict) and part in raw:
            raw = raw[part]
        else:
            return None
    return raw


def finite_number(raw: dict[str, Any], loc: tuple[Any, ...]) -> float | None:
    """The value at `loc` when it is a finite number (not a bool), else None."""
    v = raw_value(raw, loc)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def expand(raw: dict[str, Any], pattern: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The locations in `raw` a pattern with "*" (every list item) names."""
    locs: list[tuple[Any, ...]] = [()]
    for part in pattern:
        if part != "*":
            locs = [loc + (part,) for loc in locs]
            continue
        grown: list[tuple[Any, ...]] = []
        for loc in locs:
            items = raw_value(raw, loc)
            if isinstance(items, list):
                grown.extend(loc + (i,) for i in range(len(items)))
        locs = grown
    return locs
