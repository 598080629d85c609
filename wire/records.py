"""The records that travel between units and operators (protocol v1): the Hit and its JSON payloads.

Topics are in wire.topics. Every
payload is a JSON object carrying ``schema`` (which message it is) and ``v`` (its version), so a
receiver can refuse what it does not understand instead of misreading it. The face crop travels
inside the hit as base64 JPEG: one message, one PUBACK, nothing to reassemble (docs/protocol.md
says why). JSON Schemas for the three payloads are in wire/schemas/; `decode_*` here check the
same rules.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wire.errors import ProtocolError, RecordError

SCHEMA_VERSION = 1
HIT_SCHEMA = "checkpoint/hit"
STATUS_SCHEMA = "checkpoint/status"
HEARTBEAT_SCHEMA = "checkpoint/heartbeat"
CROP_DROP_REASONS = ("oversized", "outbox_full", "not_kept")
STATES = ("online", "offline")
JPEG_MAGIC = b"\xff\xd8\xff"
# The payloads' JSON Schemas, installed with this package.
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def _check_box(box: tuple[float, float, float, float], what: str) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise RecordError(f"{what}: box must be (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise RecordError(f"{what}: box must have x2 > x1 and y2 > y1 and finite values, got {box!r}")
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class Hit:
    """A match worth an operator's attention; what the unit reports."""

    unit_id: str
    camera_id: str
    captured_at: float
    person_id: str
    score: float
    threshold: float
    margin: float
    box: tuple[float, float, float, float]
    model_id: str
    watchlist_version: int
    track_id: int = -1
    crop_jpeg: bytes | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        for name in ("unit_id", "camera_id", "person_id", "model_id", "id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RecordError(f"hit: {name} must be a non-empty string, got {getattr(self, name)!r}")
        object.__setattr__(self, "box", _check_box(self.box, f"hit {self.id}"))
        if self.crop_jpeg is not None and not bytes(self.crop_jpeg[:3]) == JPEG_MAGIC:
            raise RecordError(f"hit {self.id}: crop_jpeg must be JPEG bytes (starting FF D8 FF)")
        if not math.isfinite(self.captured_at) or self.captured_at <= 0:
            raise RecordError(f"hit {self.id}: captured_at must be seconds since the epoch, got {self.captured_at}")
        if int(self.watchlist_version) < 0:
            raise RecordError(f"hit {self.id}: watchlist_version must be >= 0")


def hit_record(hit: Hit, site: str, queued_at: float | None = None) -> dict[str, Any]:
    """The hit's fields as they go on the wire, without the crop (the outbox keeps the crop apart
    so it can drop it alone when full)."""
    return {
        "schema": HIT_SCHEMA,
        "v": SCHEMA_VERSION,
        "id": hit.id,
        "site": site,
        "unit_id": hit.unit_id,
        "camera_id": hit.camera_id,
        "captured_at": float(hit.captured_at),
        "queued_at": float(time.time() if queued_at is None else queued_at),
        "person_id": hit.person_id,
        "score": float(hit.score),
        "threshold": float(hit.threshold),
        "margin": float(hit.margin),
        "box": [float(v) for v in hit.box],
        "model_id": hit.model_id,
        "watchlist_version": int(hit.watchlist_version),
        "track_id": int(hit.track_id),
    }


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


def hit_payload(record: bytes | dict[str, Any], crop: bytes | None, crop_dropped: str | None) -> bytes:
    """The complete hit message: the stored record plus the crop (base64) or why it is missing."""
    body = json.loads(record) if isinstance(record, (bytes, str)) else dict(record)
    if crop_dropped is not None and crop_dropped not in CROP_DROP_REASONS:
        raise ProtocolError(f"crop_dropped must be one of {CROP_DROP_REASONS}, got {crop_dropped!r}")
    body["crop_jpeg_b64"] = base64.b64encode(crop).decode("ascii") if crop else None
    body["crop_dropped"] = crop_dropped
    return encode_record(body)


def status_payload(
    site: str,
    unit_id: str,
    state: str,
    reason: str,
    at: float | None = None,
    software_version: str | None = None,
) -> bytes:
    """The retained status message ('online' on connect, 'offline' as Last Will or on shutdown),
    with the unit's software version (default: this installation's)."""
    if state not in STATES:
        raise ProtocolError(f"status state must be one of {STATES}, got {state!r}")
    return encode_record(
        {
            "schema": STATUS_SCHEMA,
            "v": SCHEMA_VERSION,
            "site": site,
            "unit_id": unit_id,
            "state": state,
            "reason": reason,
            "at": float(time.time() if at is None else at),
            "software_version": software_version or _software_version(),
        }
    )


def heartbeat_payload(
    site: str,
    unit_id: str,
    *,
    interval_s: float,
    uptime_s: float,
    unit: dict[str, Any],
    outbox: dict[str, Any],
    link: dict[str, Any],
    at: float | None = None,
    software_version: str | None = None,
) -> bytes:
    """The periodic heartbeat: the unit's own figures (cameras, fps, watchlist version: whatever
    the status provider gives), the outbox depth and drop counters, the link's state, and the
    unit's software version (default: this installation's)."""
    return encode_record(
        {
            "schema": HEARTBEAT_SCHEMA,
            "v": SCHEMA_VERSION,
            "site": site,
            "unit_id": unit_id,
            "at": float(time.time() if at is None else at),
            "interval_s": float(interval_s),
            "uptime_s": float(uptime_s),
            "unit": unit,
            "outbox": outbox,
            "link": link,
            "software_version": software_version or _software_version(),
        }
    )


def _software_version() -> str:
    from common.version import software_version

    return software_version()


# --- decoding (receiver side) -------------------------------------------------------------------

_STR = (str,)
_NUM = (int, float)
_INT = (int,)


def _load(payload: bytes, schema: str) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{schema} payload is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{schema} payload must be a JSON object, got {type(body).__name__}")
    if body.get("schema") != schema:
        raise ProtocolError(f"payload schema is {body.get('schema')!r}, expected {schema!r}")
    v = body.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{schema} payload lacks an integer 'v' (schema version)")
    if v != SCHEMA_VERSION:
        raise ProtocolError(
            f"{schema} payload has schema version {v}; this receiver understands {SCHEMA_VERSION} (upgrade it)"
        )
    return body


def _require(body: dict[str, Any], schema: str, fields: dict[str, tuple[type, ...]]) -> None:
    for key, types in fields.items():
        if key not in body:
            raise ProtocolError(f"{schema} payload lacks required key {key!r}")
        value = body[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = "/".join(t.__name__ for t in types)
            raise ProtocolError(f"{schema} payload key {key!r} must be {names}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{schema} payload key {key!r} must be finite, got {value}")
        if types is _STR and not value:
            raise ProtocolError(f"{schema} payload key {key!r} must not be empty")


HIT_FIELDS: dict[str, tuple[type, ...]] = {
    "id": _STR,
    "site": _STR,
    "unit_id": _STR,
    "camera_id": _STR,
    "captured_at": _NUM,
    "queued_at": _NUM,
    "person_id": _STR,
    "score": _NUM,
    "threshold": _NUM,
    "margin": _NUM,
    "model_id": _STR,
    "watchlist_version": _INT,
    "track_id": _INT,
}
STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "site": _STR,
    "unit_id": _STR,
    "state": _STR,
    "reason": _STR,
    "at": _NUM,
}
HEARTBEAT_FIELDS: dict[str, tuple[type, ...]] = {
    "site": _STR,
    "unit_id": _STR,
    "at": _NUM,
    "interval_s": _NUM,
    "uptime_s": _NUM,
    "unit": (dict,),
    "outbox": (dict,),
    "link": (dict,),
}


def decode_hit(payload: bytes) -> tuple[dict[str, Any], bytes | None]:
    """Check a hit message and return (fields without the crop, crop JPEG bytes or None)."""
    body = _load(payload, HIT_SCHEMA)
    _require(body, HIT_SCHEMA, HIT_FIELDS)
    box = body.get("box")
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        or box[2] <= box[0]
        or box[3] <= box[1]
    ):
        raise ProtocolError(f"hit {body['id']}: 'box' must be [x1, y1, x2, y2] with x2 > x1, y2 > y1, got {box!r}")
    dropped = body.get("crop_dropped")
    if dropped is not None and dropped not in CROP_DROP_REASONS:
        raise ProtocolError(f"hit {body['id']}: 'crop_dropped' must be null or one of {CROP_DROP_REASONS}")
    b64 = body.pop("crop_jpeg_b64", None)
    crop = None
    if b64 is not None:
        if not isinstance(b64, str):
            raise ProtocolError(f"hit {body['id']}: 'crop_jpeg_b64' must be a base64 string or null")
        try:
            crop = base64.b64decode(b64, validate=True)
        except binascii.Error as e:
            raise ProtocolError(f"hit {body['id']}: 'crop_jpeg_b64' is not valid base64: {e}") from None
        if not crop.startswith(JPEG_MAGIC):
            raise ProtocolError(f"hit {body['id']}: crop is not a JPEG (does not start FF D8 FF)")
    body["crop_dropped"] = dropped
    return body, crop


def _optional_version(body: dict[str, Any], schema: str) -> None:
    # Optional: units from before it was added send none.
    v = body.get("software_version")
    if v is not None and (not isinstance(v, str) or not v):
        raise ProtocolError(f"{schema} payload key 'software_version' must be a non-empty string or absent")


def decode_status(payload: bytes) -> dict[str, Any]:
    """Check a status message and return its fields."""
    body = _load(payload, STATUS_SCHEMA)
    _require(body, STATUS_SCHEMA, STATUS_FIELDS)
    _optional_version(body, STATUS_SCHEMA)
    if body["state"] not in STATES:
        raise ProtocolError(f"status 'state' must be one of {STATES}, got {body['state']!r}")
    return body


def decode_heartbeat(payload: bytes) -> dict[str, Any]:
    """Check a heartbeat message and return its fields."""
    body = _load(payload, HEARTBEAT_SCHEMA)
    _require(body, HEARTBEAT_SCHEMA, HEARTBEAT_FIELDS)
    _optional_version(body, HEARTBEAT_SCHEMA)
    return body
