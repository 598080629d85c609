"""Hits to report in tests: real JPEG crops (a face from skimage's astronaut photo, or noise JPEGs
of a chosen size), hit records, and a small JSON Schema checker for the payload schemas in
wire/schemas/ (jsonschema is not a dependency; this covers the keywords those files use: type, const,
enum, minimum/maximum and their exclusive forms, minLength/maxLength/pattern, minItems/maxItems/items,
required/properties/additionalProperties/maxProperties)."""

from __future__ import annotations

import io
import re
import time
from typing import Any

import numpy as np

from wire.records import Hit


def face_jpeg() -> bytes:
    """The astronaut's face (public domain photo shipped with scikit-image) as a JPEG."""
    from PIL import Image
    from skimage import data

    img = data.astronaut()[30:200, 150:300]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noise_jpeg(approx_bytes: int, seed: int = 0) -> bytes:
    """A real JPEG of random noise, roughly `approx_bytes` long (noise barely compresses)."""
    from PIL import Image

    side = max(8, int((approx_bytes / 0.95) ** 0.5))
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_hit(unit_id: str = "unit-1", crop: bytes | None = None, **overrides: Any) -> Hit:
    """A plausible hit; keyword arguments override fields."""
    fields: dict[str, Any] = dict(
        unit_id=unit_id,
        camera_id="cam-1",
        captured_at=time.time(),
        person_id="person-7",
        score=0.81,
        threshold=0.6,
        margin=0.23,
        box=(10.0, 12.0, 90.0, 110.0),
        model_id="dlib-resnet-v1",
        watchlist_version=4,
        track_id=3,
        crop_jpeg=crop,
    )
    fields.update(overrides)
    return Hit(**fields)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "number": (int, float),
    "integer": int,
    "boolean": bool,
    "object": dict,
    "array": list,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[name])


def schema_errors(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Violations of `schema` by `instance` (subset of JSON Schema 2020-12 used in wire/schemas)."""
    errs: list[str] = []
    if "const" in schema and instance != schema["const"]:
        errs.append(f"{path}: expected {schema['const']!r}, got {instance!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errs.append(f"{path}: {instance!r} not in {schema['enum']!r}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, n) for n in names):
            return errs + [f"{path}: expected {'/'.join(names)}, got {type(instance).__name__}"]
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errs.append(f"{path}: {instance} < minimum {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errs.append(f"{path}: {instance} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errs.append(f"{path}: {instance} <= exclusiveMinimum {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and instance >= schema["exclusiveMaximum"]:
            errs.append(f"{path}: {instance} >= exclusiveMaximum {schema['exclusiveMaximum']}")
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            errs.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            errs.append(f"{path}: {len(instance)} characters, longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errs.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems", len(instance)):
            errs.append(f"{path}: {len(instance)} items, outside [{schema.get('minItems')}, {schema.get('maxItems')}]")
        if "items" in schema:
            for i, item in enumerate(instance):
                errs += schema_errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(instance, dict):
        if "maxProperties" in schema and len(instance) > schema["maxProperties"]:
            errs.append(f"{path}: {len(instance)} keys, more than {schema['maxProperties']}")
        for key in schema.get("required", []):
            if key not in instance:
                errs.append(f"{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errs += schema_errors(value, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}: unexpected key {key!r}")
    return errs
