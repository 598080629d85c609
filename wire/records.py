"""The records that travel between units and operators (protocol v1): the Hit and its JSON payloads,
and the receivers' verdicts on them.

Topics are in wire.topics. Every
payload is a JSON object carrying ``schema`` (which message it is) and ``v`` (its version), so a
receiver can refuse what it does not understand instead of misreading it. The face crop travels
inside the hit as base64 JPEG: one message, one PUBACK, nothing to reassemble (docs/protocol.md
says why). JSON Schemas for the four payloads are in wire/schemas/; `decode_*` here check the
same rules.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from wire.errors import ProtocolError, RecordError

SCHEMA_VERSION = 1
HIT_SCHEMA = "checkpoint/hit"
STATUS_SCHEMA = "checkpoint/status"
HEARTBEAT_SCHEMA = "checkpoint/heartbeat"
VERDICT_SCHEMA = "checkpoint/verdict"
OUTCOMES = ("stored", "duplicate", "refused")
"""What a receiver did with a hit: stored it, already held it (by id), or quarantined it (with why)."""
CROP_DROP_REASONS = ("oversized", "outbox_full", "not_kept")
"""Why a hit's crop (`crop_dropped`) or context frame (`context_dropped`) is missing."""
STATES = ("online", "offline")
JPEG_MAGIC = b"\xff\xd8\xff"
CANARY_PERSON_ID = "checkpoint-canary"
"""The reserved id of the canary person HQ puts into every list (docs/edge.md, "The canary"): a
public-domain photo, not a missing person. A hit on it is the unit's end-to-end check, flagged
``canary`` on the wire; receivers record it per unit and never show it to operators, whichever
camera it came from. No real person may be enrolled under this id (watchlist/hq/enrol.py)."""
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
    canary: bool = False  # the unit's own end-to-end check (CANARY_PERSON_ID), never an operator's hit
    # The share of faces of people not on the list that score at least `score` against someone on the
    # list, by the model's calibration at the list's size (edge.hits.stranger_rate); None: no calibration.
    stranger_rate: float | None = None
    # The whole frame, downscaled, with the face's box drawn (edge.hits.encode_context): only where the
    # unit's [matching.crop] context_frame is on; it shows bystanders (docs/privacy.md).
    context_jpeg: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("unit_id", "camera_id", "person_id", "model_id", "id"):
            value = getattr(self, name)
            if id_problem(value) is not None:
                raise RecordError(
                    f"hit: {name} must be a string of 1 to {MAX_ID_CHARS} characters without control characters, "
                    f"got {safe_text(value, 80)!r}"
                )
        object.__setattr__(self, "box", _check_box(self.box, f"hit {self.id}"))
        if self.crop_jpeg is not None and not bytes(self.crop_jpeg[:3]) == JPEG_MAGIC:
            raise RecordError(f"hit {self.id}: crop_jpeg must be JPEG bytes (starting FF D8 FF)")
        if self.context_jpeg is not None and not bytes(self.context_jpeg[:3]) == JPEG_MAGIC:
            raise RecordError(f"hit {self.id}: context_jpeg must be JPEG bytes (starting FF D8 FF)")
        if not math.isfinite(self.captured_at) or self.captured_at <= 0:
            raise RecordError(f"hit {self.id}: captured_at must be seconds since the epoch, got {self.captured_at}")
        if int(self.watchlist_version) < 0:
            raise RecordError(f"hit {self.id}: watchlist_version must be >= 0")
        if self.canary != (self.person_id == CANARY_PERSON_ID):
            # A canary flag on a listed person would hide a real hit from operators; a canary hit
            # without it would show them the canary.
            raise RecordError(f"hit {self.id}: canary must be set exactly for person {CANARY_PERSON_ID!r}")
        if self.stranger_rate is not None and not 0.0 <= self.stranger_rate <= 1.0:
            # NaN fails this comparison too: the receiver would refuse either.
            raise RecordError(f"hit {self.id}: stranger_rate must be a share in [0, 1], got {self.stranger_rate}")


def _clamp(value: float, bound: float) -> float:
    return min(bound, max(-bound, float(value)))


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
        # Quantised scores can stray a hair past +-1; the receiver refuses values outside the schema.
        "score": _clamp(hit.score, 1.0),
        "threshold": _clamp(hit.threshold, 1.0),
        "margin": _clamp(hit.margin, 2.0),
        "box": [float(v) for v in hit.box],
        "model_id": hit.model_id,
        "watchlist_version": int(hit.watchlist_version),
        "track_id": int(hit.track_id),
        # Only on canary hits: the records of every other hit stay byte for byte as before.
        **({"canary": True} if hit.canary else {}),
        # Only where the unit has a calibration: without one the record is as an older unit's.
        **({"stranger_rate": float(hit.stranger_rate)} if hit.stranger_rate is not None else {}),
    }


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


class RecordSigner(Protocol):
    """What signs a record (wire.signing.UnitSigner): returns it with ``key_id`` and ``sig`` added."""

    def sign(self, record: dict[str, Any], crop: bytes | None = ...) -> dict[str, Any]: ...


def hit_payload(
    record: bytes | dict[str, Any],
    crop: bytes | None,
    crop_dropped: str | None,
    signer: RecordSigner | None = None,
    *,
    context: bytes | None = None,
    context_dropped: str | None = None,
) -> bytes:
    """The complete hit message: the stored record plus the crop (base64) or why it is missing, and
    the context frame (base64) or why it is missing when the unit sends one, signed by `signer` when
    one is given (after the crop and frame are in: the signature covers them).

    A hit without a context frame (`context` and `context_dropped` both None) carries neither key,
    byte for byte the message of a unit older than context frames."""
    body = json.loads(record) if isinstance(record, (bytes, str)) else dict(record)
    for what, reason in (("crop_dropped", crop_dropped), ("context_dropped", context_dropped)):
        if reason is not None and reason not in CROP_DROP_REASONS:
            raise ProtocolError(f"{what} must be one of {CROP_DROP_REASONS}, got {reason!r}")
    body.pop("crop_jpeg_b64", None)
    body["crop_dropped"] = crop_dropped
    if context is not None or context_dropped is not None:
        # Inline in the signed text, not by a digest as the crop is: a receiver older than context frames
        # signs over every key it gets, so it still verifies a hit that carries one.
        body["context_dropped"] = context_dropped
        body["context_jpeg_b64"] = base64.b64encode(context).decode("ascii") if context else None
    if signer is not None:
        body = signer.sign({**body, "crop_jpeg_b64": None}, crop or None)
        del body["crop_jpeg_b64"]
    # The base64 text is spliced in after the rest is encoded: it needs no JSON escaping, and
    # json.dumps scanning a 300 kB string costs more than the rest of the message.
    head = encode_record(body)[:-1]
    if not crop:
        return head + b',"crop_jpeg_b64":null}'
    return head + b',"crop_jpeg_b64":"' + base64.b64encode(crop) + b'"}'


def status_payload(
    site: str,
    unit_id: str,
    state: str,
    reason: str,
    at: float | None = None,
    software_version: str | None = None,
    signer: RecordSigner | None = None,
) -> bytes:
    """The retained status message ('online' on connect, 'offline' as Last Will, on shutdown or
    when the unit refuses to start), with the unit's software version (default: this
    installation's), signed by `signer` when one is given. `reason` is made one line of at most
    MAX_TEXT_CHARS (`status_reason`)."""
    if state not in STATES:
        raise ProtocolError(f"status state must be one of {STATES}, got {state!r}")
    reason = status_reason(reason)
    body = {
        "schema": STATUS_SCHEMA,
        "v": SCHEMA_VERSION,
        "site": site,
        "unit_id": unit_id,
        "state": state,
        "reason": reason,
        "at": float(time.time() if at is None else at),
        "software_version": software_version or _software_version(),
    }
    return encode_record(signer.sign(body) if signer is not None else body)


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
    """The periodic heartbeat: the unit's own figures (cameras, fps, watchlist version, the
    known-answer self-test it passed at start under `selftest`: whatever the status provider
    gives), the outbox depth and drop counters, the link's state, and the unit's software version
    (default: this installation's).

    Free text is cut to what a receiver takes (a camera's error message can be long), so that
    one long message never costs the whole heartbeat."""
    unit = _clip_tree(unit, 0)
    link = {k: _clip_tree(v, MAX_TREE_DEPTH) for k, v in link.items()}
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


@dataclass(frozen=True)
class Verdict:
    """A receiver's answer on one hit: its id, the outcome (one of OUTCOMES) and, for 'refused', the
    short reason word the centre's rejects table keeps ('unsigned', 'protocol', ...) and its sentence."""

    hit_id: str
    outcome: str
    reason: str | None = None
    error: str | None = None


def verdict_payload(site: str, unit_id: str, verdicts: list[Verdict], at: float | None = None) -> bytes:
    """The message that answers up to MAX_VERDICTS of one unit's hits on its verdicts topic. The
    error sentence is made one line of at most MAX_TEXT_CHARS; a refusal always carries a reason."""
    if not 1 <= len(verdicts) <= MAX_VERDICTS:
        raise ProtocolError(f"a verdict message holds 1 to {MAX_VERDICTS} verdicts, got {len(verdicts)}")
    items = []
    for v in verdicts:
        if v.outcome not in OUTCOMES:
            raise ProtocolError(f"verdict outcome must be one of {OUTCOMES}, got {v.outcome!r}")
        refused = v.outcome == "refused"
        items.append(
            {
                "id": v.hit_id,
                "outcome": v.outcome,
                "reason": status_reason(v.reason or "unknown")[:MAX_ID_CHARS] if refused else None,
                "error": status_reason(v.error or v.reason or "unknown") if refused else None,
            }
        )
    body = {
        "schema": VERDICT_SCHEMA,
        "v": SCHEMA_VERSION,
        "site": site,
        "unit_id": unit_id,
        "at": float(time.time() if at is None else at),
        "verdicts": items,
    }
    return encode_record(body)


def id_problem(value: object) -> str | None:
    """Why `value` cannot be an id on the wire (person, unit, site, camera, model, hit), or None when
    it can: the one id rule, 1 to MAX_ID_CHARS characters, none of them a control character, DEL, a
    Unicode line separator or a lone surrogate. What makes ids (HQ's enrolment and bundles, the
    unit's config) checks it too, so an id accepted anywhere can always travel in a hit."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or not _TEXT_RE.fullmatch(value):
        return (
            f"must be 1 to {MAX_ID_CHARS} characters without control characters (C0, DEL, C1), "
            "line separators (U+2028, U+2029) or lone surrogates"
        )
    return None


def status_reason(text: str) -> str:
    """`text` as a status reason the receiver accepts: control and line-separator characters
    become spaces, runs of spaces one, at most MAX_TEXT_CHARS characters ("..." where cut)."""
    line = " ".join(re.sub("[" + _BAD_TEXT_CHARS + "]", " ", text).split()) or "unknown"
    return line if len(line) <= MAX_TEXT_CHARS else line[: MAX_TEXT_CHARS - 3] + "..."


def _software_version() -> str:
    from common.version import software_version

    return software_version()


def _clip_tree(value: Any, depth: int) -> Any:
    """`value` within the heartbeat's limits: strings cut to MAX_TEXT_CHARS without lone
    surrogates, nesting past MAX_TREE_DEPTH replaced by a note."""
    if isinstance(value, str):
        text = value if len(value) <= MAX_TEXT_CHARS else value[: MAX_TEXT_CHARS - 3] + "..."
        return _SURROGATES_RE.sub("\ufffd", text)
    if isinstance(value, (dict, list)) and depth >= MAX_TREE_DEPTH:
        return "(nested too deeply)"
    if isinstance(value, dict):
        return {str(k)[:MAX_ID_CHARS]: _clip_tree(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clip_tree(v, depth + 1) for v in value]
    return value


# --- limits (the JSON Schemas in wire/schemas/ state the same; tests/test_wire_decode.py checks they agree) ---

MAX_ID_CHARS = 128
"""ids (hit, site, unit, camera, person, model): at most this many characters, none of them a control character."""
MAX_TEXT_CHARS = 1024
"""free text (a status reason, strings in a heartbeat)."""
MAX_CROP_BYTES = 256 * 1024
"""the crop a receiver takes by default: the outbox's default max_crop_bytes."""
MAX_CONTEXT_BYTES = MAX_CROP_BYTES
"""the context frame a receiver keeps by default: the same bound as a crop (the outbox's max_crop_bytes
bounds both); a larger one is stripped from its hit, which is stored without it."""
MAX_TIME = 4102444800.0
"""2100-01-01 UTC: later times are a broken clock or an attack (1e300 crashes date formatting)."""
MAX_COUNT = 2**53 - 1
"""largest integer counter (track id, watchlist version, heartbeat counters): exact in JSON everywhere."""
MAX_BOX = 1e6
"""a face box coordinate, in pixels."""
MAX_INTEGER_DIGITS = 20
"""a JSON integer literal longer than this is refused before Python turns it into an int."""
MAX_HEARTBEAT_BYTES = 256 * 1024
MAX_STATUS_BYTES = 16 * 1024
MAX_TREE_DEPTH = 8
"""nesting allowed inside a heartbeat's free-form `unit` object (cameras -> camera -> figures)."""
MAX_TREE_ITEMS = 4096
"""values allowed inside a heartbeat's free-form `unit` object, all levels together."""
_HIT_OVERHEAD_BYTES = 32 * 1024
"""room in a hit payload for everything but the crop: 6 ids of 128 characters as \\uXXXX escapes and the rest."""
MAX_HIT_BYTES = 4 * ((MAX_CROP_BYTES + 2) // 3) + 4 * ((MAX_CONTEXT_BYTES + 2) // 3) + _HIT_OVERHEAD_BYTES
"""a hit payload with the largest crop and context frame a receiver takes by default (their base64) and the rest."""
MAX_VERDICTS = 100
"""verdicts in one verdict message (a receiver splits a larger batch)."""
MAX_VERDICT_BYTES = 1024 * 1024
"""a verdict message: MAX_VERDICTS ids and error sentences, even written with \\uXXXX escapes."""
MAX_PAYLOAD_BYTES = {"hits": MAX_HIT_BYTES, "status": MAX_STATUS_BYTES, "heartbeat": MAX_HEARTBEAT_BYTES}
"""the decode limit of each topic kind (wire.topics.KINDS): a receiver refuses a larger payload
before it parses or even queues it."""

# Characters an id or a reason may not contain: C0 and C1 controls, DEL, the Unicode line
# separators (they forge log and terminal lines) and lone surrogates (not encodable as UTF-8:
# they break every store). The same class is the schemas' "pattern".
_BAD_TEXT_CHARS = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\ud800-\\udfff"
TEXT_PATTERN = "^[^" + _BAD_TEXT_CHARS + "]*$"
_TEXT_RE = re.compile("[^" + _BAD_TEXT_CHARS + "]*")
_SURROGATES_RE = re.compile("[\\ud800-\\udfff]")
# Direction marks and overrides are allowed in text (names in right-to-left scripts need them) but,
# printed raw, make a terminal or log show it in another order than it is (U+202E turns
# "case-1\u202e1-esac" around), so safe_text shows them as escapes too.
_BIDI_CHARS = "\\u061c\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069"
_CONTROL_RE = re.compile("[" + _BAD_TEXT_CHARS + _BIDI_CHARS + "\\\\]")


def b64_length(n_bytes: int) -> int:
    """Characters of the base64 text of `n_bytes` bytes (padded)."""
    return 4 * ((n_bytes + 2) // 3)


def safe_text(value: Any, limit: int = 200) -> str:
    """`value` for a log line or a terminal: control characters, line separators, direction marks
    and overrides, surrogates and backslashes escaped (``\\n``, ``\\x1b``, ``\\u2028``, ``\\u202e``),
    cut to `limit` characters with '...'.

    A received id printed as it came could forge a whole line of output (a newline) or drive the
    terminal (escape sequences); this is what the receiver prints instead."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    text = text[:limit]

    def esc(m: re.Match[str]) -> str:
        c = m.group(0)
        if c == "\\":
            return "\\\\"
        code = ord(c)
        if c in "\n\r\t":
            return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL_RE.sub(esc, text) + ("..." if cut else "")


# --- decoding (receiver side) -------------------------------------------------------------------


class _BadNumber:
    """A JSON number the parser refused to convert (NaN, Infinity, 1e400, a 5,000-digit integer):
    kept as a marker so the check of the field it sits in can name that field."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"


def _parse_int(text: str) -> int | _BadNumber:
    if len(text) > MAX_INTEGER_DIGITS:
        return _BadNumber(text)
    return int(text)


def _parse_float(text: str) -> float | _BadNumber:
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(text)


def load_json_object(payload: bytes, what: str, max_bytes: int | None = None, bound: str = "") -> dict[str, Any]:
    """Parse untrusted JSON into an object without ever raising anything but ProtocolError: no
    RecursionError on deep nesting, no ValueError on a 5,000-digit integer; numbers JSON cannot
    hold exactly (NaN, Infinity, 1e400, over 20 digits) are left as markers the field checks refuse."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} payload must be bytes, got {type(payload).__name__}")
    if max_bytes is not None and len(payload) > max_bytes:
        raise ProtocolError(f"{what} payload of {len(payload)} bytes is over the limit of {max_bytes} bytes{bound}")
    try:
        body = json.loads(bytes(payload), parse_int=_parse_int, parse_float=_parse_float, parse_constant=_BadNumber)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what} payload is not JSON: {e}") from None
    except RecursionError:
        # json's C parser stops at the interpreter's recursion limit; nothing in protocol v1 nests deeply.
        raise ProtocolError(f"{what} payload is nested too deeply to be a protocol v1 message") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} payload must be a JSON object, got {type(body).__name__}")
    return body


def _load(payload: bytes, schema: str, max_bytes: int, bound: str = "") -> dict[str, Any]:
    body = load_json_object(payload, schema, max_bytes, bound)
    if body.get("schema") != schema:
        raise ProtocolError(f"payload schema is {safe_text(body.get('schema'), 80)!r}, expected {schema!r}")
    v = body.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{schema} payload lacks an integer 'v' (schema version)")
    if v != SCHEMA_VERSION:
        raise ProtocolError(
            f"{schema} payload has schema version {v}; this receiver understands {SCHEMA_VERSION} (upgrade it)"
        )
    return body


@dataclass(frozen=True)
class FieldRule:
    """What one top-level payload key must hold; the schemas say the same with type/minimum/maximum/
    maxLength/pattern."""

    kind: str  # "id" (<= MAX_ID_CHARS, no control characters), "text" (<= MAX_TEXT_CHARS, same), "number", "integer"
    lo: float | None = None
    hi: float | None = None
    lo_exclusive: bool = False
    choices: tuple[str, ...] = ()

    def check(self, schema: str, key: str, value: Any) -> None:
        """Raise ProtocolError naming `key` if `value` breaks this rule."""
        where = f"{schema} payload key {key!r}"
        if isinstance(value, _BadNumber):
            raise ProtocolError(f"{where} is not a finite number of at most {MAX_INTEGER_DIGITS} digits: {value.text}")
        if self.kind in ("id", "text"):
            if not isinstance(value, str):
                raise ProtocolError(f"{where} must be a string, got {type(value).__name__}")
            limit = MAX_ID_CHARS if self.kind == "id" else MAX_TEXT_CHARS
            if not value:
                raise ProtocolError(f"{where} must not be empty")
            if len(value) > limit:
                raise ProtocolError(f"{where} has {len(value)} characters, over the limit of {limit}")
            if not _TEXT_RE.fullmatch(value):
                raise ProtocolError(
                    f"{where} contains a control character, line separator or lone surrogate: {safe_text(value, 80)}"
                )
            if self.choices and value not in self.choices:
                raise ProtocolError(f"{where} must be one of {self.choices}, got {safe_text(value, 80)!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where} must be a {self.kind}, got {type(value).__name__}")
        if self.kind == "integer" and not isinstance(value, int):
            raise ProtocolError(f"{where} must be an integer, got {value!r}")
        low_ok = self.lo is None or (value > self.lo if self.lo_exclusive else value >= self.lo)
        if not low_ok or (self.hi is not None and value > self.hi):
            lo = "(" if self.lo_exclusive else "["
            raise ProtocolError(f"{where} = {value!r} is outside {lo}{self.lo:g}, {self.hi:g}]")


_ID = FieldRule("id")
_TIME = FieldRule("number", 0, MAX_TIME, lo_exclusive=True)
_COUNT = FieldRule("integer", 0, MAX_COUNT)
_COSINE = FieldRule("number", -1, 1)

HIT_FIELDS: dict[str, FieldRule] = {
    "id": _ID,
    "site": _ID,
    "unit_id": _ID,
    "camera_id": _ID,
    "captured_at": _TIME,
    "queued_at": _TIME,
    "person_id": _ID,
    "score": _COSINE,
    "threshold": _COSINE,
    "margin": FieldRule("number", -2, 2),
    "model_id": _ID,
    "watchlist_version": _COUNT,
    "track_id": FieldRule("integer", -1, MAX_COUNT),
}
STRANGER_RATE = FieldRule("number", 0, 1)
"""A hit's optional `stranger_rate` (units from before it, and units without a calibration, send none)."""
STATUS_FIELDS: dict[str, FieldRule] = {
    "site": _ID,
    "unit_id": _ID,
    "state": FieldRule("id", choices=STATES),
    "reason": FieldRule("text"),
    "at": _TIME,
}
HEARTBEAT_FIELDS: dict[str, FieldRule] = {
    "site": _ID,
    "unit_id": _ID,
    "at": _TIME,
    "interval_s": FieldRule("number", 0, 86400, lo_exclusive=True),
    "uptime_s": FieldRule("number", 0, 1e10),
}
OUTBOX_COUNTERS = (
    "accepted",
    "sent",
    "crops_dropped_oversized",
    "crops_dropped_full",
    "hits_dropped_full",
)
"""The outbox's running counters that every unit reports (edge/outbox/ keeps them by these names)."""
OUTBOX_VERDICT_COUNTERS = (
    "verdicts_stored",
    "verdicts_duplicate",
    "quarantined",
    "quarantined_dropped",
    "resent",
    "unconfirmed",
    "awaiting_dropped",
    "verdicts_ignored",
)
"""The outbox's running counters of the verdict exchange (edge/outbox/ keeps them by these names)."""
OUTBOX_CONTEXT_COUNTERS = ("contexts_dropped_oversized", "contexts_dropped_full")
"""The outbox's running counters of context frames dropped (edge/outbox/ keeps them by these names);
optional in the heartbeat: units older than context frames send none."""
HEARTBEAT_OUTBOX_KEYS = ("pending", "pending_bytes", "max_bytes", *OUTBOX_COUNTERS, "inflight", "refused")
HEARTBEAT_VERDICT_KEYS = ("awaiting_verdict", "quarantined_kept", *OUTBOX_VERDICT_COUNTERS, *OUTBOX_CONTEXT_COUNTERS)
"""Optional outbox figures of units that wait for the centre's verdicts (docs/protocol.md, "Verdicts")
and of units that count context frames dropped; older units send none, so a receiver takes them
when present."""
LINK_STATES = ("idle", "connecting", "connected", "disconnected", "closed")
SIGNATURE_FIELDS = ("key_id", "sig")
"""Optional on hits and status (wire/signing.py): checked for shape here, for truth by verify_record."""
KEY_ID_PATTERN = "^[0-9a-f]{16}$"
SIG_PATTERN = "^[A-Za-z0-9+/]{86}==$"


def _check_fields(body: dict[str, Any], schema: str, rules: dict[str, FieldRule]) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": body["schema"], "v": body["v"]}
    for key, rule in rules.items():
        if key not in body:
            raise ProtocolError(f"{schema} payload lacks required key {key!r}")
        rule.check(schema, key, body[key])
        out[key] = body[key]
    return out


def _check_signature_fields(body: dict[str, Any], schema: str) -> None:
    for key, pattern in (("key_id", KEY_ID_PATTERN), ("sig", SIG_PATTERN)):
        value = body.get(key)
        if value is not None and not (isinstance(value, str) and re.fullmatch(pattern, value)):
            raise ProtocolError(f"{schema} payload key {key!r} must match {pattern}, got {safe_text(value, 100)!r}")


def _check_tree(value: Any, where: str) -> None:
    """A free-form JSON value (a heartbeat's `unit`): bounded depth, size and strings, finite numbers."""
    stack = [(value, where, 0)]
    seen = 0
    while stack:
        item, path, depth = stack.pop()
        seen += 1
        if seen > MAX_TREE_ITEMS:
            raise ProtocolError(f"{where} holds more than {MAX_TREE_ITEMS} values")
        if depth > MAX_TREE_DEPTH:
            raise ProtocolError(f"{path} is nested deeper than {MAX_TREE_DEPTH} levels")
        if isinstance(item, _BadNumber):
            raise ProtocolError(f"{path} is not a finite number of at most {MAX_INTEGER_DIGITS} digits: {item.text}")
        if isinstance(item, str):
            if len(item) > MAX_TEXT_CHARS or _SURROGATES_RE.search(item):
                raise ProtocolError(
                    f"{path} must be text of at most {MAX_TEXT_CHARS} characters without lone surrogates"
                )
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_COUNT:
            raise ProtocolError(f"{path} = {item} is outside [-{MAX_COUNT}, {MAX_COUNT}]")
        elif isinstance(item, dict):
            for k, v in item.items():
                if len(k) > MAX_ID_CHARS or not _TEXT_RE.fullmatch(k):
                    raise ProtocolError(f"{path} has a key that is not a printable name of at most {MAX_ID_CHARS}")
                stack.append((v, f"{path}.{k}", depth + 1))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))


def _check_payload_box(body: dict[str, Any], schema: str) -> list[float]:
    box = body.get("box")
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and -MAX_BOX <= v <= MAX_BOX for v in box)
        or box[2] <= box[0]
        or box[3] <= box[1]
    ):
        shown = [v.text if isinstance(v, _BadNumber) else v for v in box] if isinstance(box, list) else box
        raise ProtocolError(
            f"{schema} payload key 'box' must be [x1, y1, x2, y2] with x2 > x1, y2 > y1, each within "
            f"+-{MAX_BOX:g}, got {safe_text(shown, 120)}"
        )
    return box


def decode_hit(
    payload: bytes, *, max_crop_bytes: int = MAX_CROP_BYTES, max_context_bytes: int = MAX_CONTEXT_BYTES
) -> tuple[dict[str, Any], bytes | None]:
    """Check a hit message and return (its fields without the crop, the crop JPEG bytes or None).

    The context frame, when the hit carries one, is in the fields as `context_jpeg` (JPEG bytes or
    None) with `context_dropped`; a frame over `max_context_bytes` is stripped (`context_dropped`
    "oversized") and `context_refused` says so, for the receiver to count: the hit itself is kept.

    Raises ProtocolError naming the field for anything the hit schema forbids (ranges, sizes,
    control characters) and for what JSON allows but no store can keep (huge integers, NaN,
    nesting); keys it does not know are dropped."""
    body = _load(
        payload,
        HIT_SCHEMA,
        b64_length(max_crop_bytes) + b64_length(max_context_bytes) + _HIT_OVERHEAD_BYTES,
        f" (crop_jpeg_b64 and context_jpeg_b64 of at most {max_crop_bytes} and {max_context_bytes} bytes, "
        f"ids of at most {MAX_ID_CHARS} characters)",
    )
    out = _check_fields(body, HIT_SCHEMA, HIT_FIELDS)
    out["box"] = _check_payload_box(body, HIT_SCHEMA)
    _check_signature_fields(body, HIT_SCHEMA)
    out["crop_dropped"] = _drop_reason(body, "crop_dropped")
    crop = _jpeg_b64(body, "crop_jpeg_b64", max_crop_bytes)
    canary = body.get("canary", False)
    if not isinstance(canary, bool):
        raise ProtocolError(f"{HIT_SCHEMA} payload key 'canary' must be true or false, got {safe_text(canary, 80)!r}")
    # The reserved person id alone also makes a canary: a unit older than the flag that matched the
    # canary person (its picture held up to a camera) must not show it to operators either.
    out["canary"] = canary or out["person_id"] == CANARY_PERSON_ID
    rate = body.get("stranger_rate")
    if "stranger_rate" in body:
        STRANGER_RATE.check(HIT_SCHEMA, "stranger_rate", rate)
    out["stranger_rate"] = rate
    out["context_dropped"] = _drop_reason(body, "context_dropped")
    out["context_jpeg"] = None
    b64 = body.get("context_jpeg_b64")
    if isinstance(b64, str) and len(b64) > b64_length(max_context_bytes):
        out["context_dropped"] = "oversized"
        out["context_refused"] = (
            f"context frame of about {len(b64) * 3 // 4} bytes is over the limit of {max_context_bytes} bytes: "
            "the hit is stored without it"
        )
    else:
        out["context_jpeg"] = _jpeg_b64(body, "context_jpeg_b64", max_context_bytes)
    return out, crop


def _drop_reason(body: dict[str, Any], key: str) -> str | None:
    """A hit's `crop_dropped` or `context_dropped`: null or one of CROP_DROP_REASONS."""
    reason = body.get(key)
    if reason is not None and reason not in CROP_DROP_REASONS:
        raise ProtocolError(
            f"{HIT_SCHEMA} payload key {key!r} must be null or one of {CROP_DROP_REASONS}, got {safe_text(reason, 80)!r}"
        )
    return reason


def _jpeg_b64(body: dict[str, Any], key: str, max_bytes: int) -> bytes | None:
    """The JPEG bytes of a hit's `crop_jpeg_b64` or `context_jpeg_b64` (None when null or absent)."""
    b64 = body.get(key)
    if b64 is None:
        return None
    if not isinstance(b64, str):
        raise ProtocolError(f"{HIT_SCHEMA} payload key {key!r} must be a base64 string or null")
    if len(b64) > b64_length(max_bytes):
        raise ProtocolError(
            f"{HIT_SCHEMA} payload key {key!r} holds about {len(b64) * 3 // 4} bytes, over the limit of {max_bytes} bytes"
        )
    try:
        jpeg = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"{HIT_SCHEMA} payload key {key!r} is not valid base64: {e}") from None
    if not jpeg.startswith(JPEG_MAGIC):
        raise ProtocolError(f"{HIT_SCHEMA} payload key {key!r} is not a JPEG (does not start FF D8 FF)")
    return jpeg


def _optional_version(body: dict[str, Any], schema: str, out: dict[str, Any]) -> None:
    # Optional: units from before it was added send none.
    if "software_version" in body:
        _ID.check(schema, "software_version", body["software_version"])
        out["software_version"] = body["software_version"]


def decode_status(payload: bytes) -> dict[str, Any]:
    """Check a status message and return its fields (ProtocolError naming the field otherwise)."""
    body = _load(payload, STATUS_SCHEMA, MAX_STATUS_BYTES)
    out = _check_fields(body, STATUS_SCHEMA, STATUS_FIELDS)
    _check_signature_fields(body, STATUS_SCHEMA)
    _optional_version(body, STATUS_SCHEMA, out)
    return out


def decode_heartbeat(payload: bytes) -> dict[str, Any]:
    """Check a heartbeat message and return its fields (ProtocolError naming the field otherwise)."""
    body = _load(payload, HEARTBEAT_SCHEMA, MAX_HEARTBEAT_BYTES)
    out = _check_fields(body, HEARTBEAT_SCHEMA, HEARTBEAT_FIELDS)
    _optional_version(body, HEARTBEAT_SCHEMA, out)
    for key in ("unit", "outbox", "link"):
        if not isinstance(body.get(key), dict):
            raise ProtocolError(f"{HEARTBEAT_SCHEMA} payload key {key!r} must be an object")
    if len(body["unit"]) > 64:
        raise ProtocolError(f"{HEARTBEAT_SCHEMA} payload key 'unit' has {len(body['unit'])} keys, over the limit of 64")
    _check_tree(body["unit"], "heartbeat payload key 'unit'")
    outbox = body["outbox"]
    for key in HEARTBEAT_OUTBOX_KEYS:
        if key not in outbox:
            raise ProtocolError(f"{HEARTBEAT_SCHEMA} payload key 'outbox' lacks {key!r}")
        _COUNT.check(HEARTBEAT_SCHEMA, f"outbox.{key}", outbox[key])
    link = body["link"]
    FieldRule("id", choices=LINK_STATES).check(HEARTBEAT_SCHEMA, "link.state", link.get("state"))
    for key in ("connects", "connect_attempts"):
        _COUNT.check(HEARTBEAT_SCHEMA, f"link.{key}", link.get(key))
    if link.get("last_error") is not None:
        error = link["last_error"]
        if not isinstance(error, str) or len(error) > MAX_TEXT_CHARS or _SURROGATES_RE.search(error):
            raise ProtocolError(f"{HEARTBEAT_SCHEMA} payload key 'link.last_error' must be null or text")
    out["unit"] = body["unit"]
    for key in HEARTBEAT_VERDICT_KEYS:
        if key in outbox:
            _COUNT.check(HEARTBEAT_SCHEMA, f"outbox.{key}", outbox[key])
    out["outbox"] = {k: outbox[k] for k in (*HEARTBEAT_OUTBOX_KEYS, *HEARTBEAT_VERDICT_KEYS) if k in outbox}
    out["link"] = {k: link.get(k) for k in ("state", "connects", "connect_attempts", "last_error")}
    return out


_VERDICT_FIELDS: dict[str, FieldRule] = {"site": _ID, "unit_id": _ID, "at": _TIME}


def decode_verdict(payload: bytes) -> dict[str, Any]:
    """Check a verdict message and return its fields, `verdicts` as a list of Verdict (ProtocolError
    naming the field otherwise). Whether the verdicts are about hits the unit holds is the unit's check."""
    body = _load(payload, VERDICT_SCHEMA, MAX_VERDICT_BYTES)
    out = _check_fields(body, VERDICT_SCHEMA, _VERDICT_FIELDS)
    items = body.get("verdicts")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_VERDICTS:
        raise ProtocolError(f"{VERDICT_SCHEMA} payload key 'verdicts' must be a list of 1 to {MAX_VERDICTS} objects")
    verdicts = []
    for i, item in enumerate(items):
        where = f"verdicts[{i}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{VERDICT_SCHEMA} payload key {where!r} must be an object")
        _ID.check(VERDICT_SCHEMA, f"{where}.id", item.get("id"))
        FieldRule("id", choices=OUTCOMES).check(VERDICT_SCHEMA, f"{where}.outcome", item.get("outcome"))
        reason, error = item.get("reason"), item.get("error")
        if item["outcome"] == "refused":
            _ID.check(VERDICT_SCHEMA, f"{where}.reason", reason)
            FieldRule("text").check(VERDICT_SCHEMA, f"{where}.error", error)
        elif reason is not None or error is not None:
            raise ProtocolError(f"{VERDICT_SCHEMA} payload key {where!r}: only a refusal carries a reason and error")
        verdicts.append(Verdict(item["id"], item["outcome"], reason, error))
    out["verdicts"] = verdicts
    return out
