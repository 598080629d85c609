"""Hostile payloads are refused at decode with a ProtocolError naming the field, and the JSON Schemas
in wire/schemas/ refuse the same payloads (issue 11: one bad message stopped the receiver)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from testing.hits import face_jpeg, make_hit, noise_jpeg, schema_errors
from wire import records
from wire.errors import ProtocolError, RecordError

FACE = face_jpeg()


def good_hit() -> dict[str, Any]:
    body = records.hit_record(make_hit(crop=FACE), "site-a")
    return json.loads(records.hit_payload(body, FACE, None))


def good_status() -> dict[str, Any]:
    return json.loads(records.status_payload("site-a", "unit-1", "online", "connected"))


def good_heartbeat() -> dict[str, Any]:
    outbox = {k: 0 for k in records.HEARTBEAT_OUTBOX_KEYS} | {"max_bytes": 1024}
    link = {"state": "connected", "connects": 1, "connect_attempts": 1, "last_error": None}
    unit = {"cameras_up": 1, "cameras": [{"id": "cam-1", "fps_in": 12.5, "last_error": "line 1\nline 2"}]}
    return json.loads(
        records.heartbeat_payload("site-a", "unit-1", interval_s=30, uptime_s=5, unit=unit, outbox=outbox, link=link)
    )


GOOD = {"hit": good_hit, "status": good_status, "heartbeat": good_heartbeat}
DECODE: dict[str, Callable[[bytes], Any]] = {
    "hit": records.decode_hit,
    "status": records.decode_status,
    "heartbeat": records.decode_heartbeat,
}


def with_(kind: str, key: str, value: Any) -> bytes:
    body = GOOD[kind]()
    target = body
    *parents, last = key.split(".")
    for p in parents:
        target = target[p]
    target[last] = value
    return json.dumps(body).encode()


def raw_with(kind: str, key: str, literal: str) -> bytes:
    """The good payload with `key`'s value replaced by a JSON literal json.dumps cannot write."""
    body = GOOD[kind]()
    body[key] = "@@HERE@@"
    return json.dumps(body).replace('"@@HERE@@"', literal).encode()


HUGE_CROP = base64.b64encode(noise_jpeg(records.MAX_CROP_BYTES + 50_000)).decode()

# (case, kind, payload, the field the error must name)
BAD: list[tuple[str, str, bytes, str]] = [
    ("score 10**30", "hit", with_("hit", "score", 10**30), "score"),
    ("score -5", "hit", with_("hit", "score", -5), "score"),
    ("threshold 7", "hit", with_("hit", "threshold", 7), "threshold"),
    ("margin 9", "hit", with_("hit", "margin", 9.0), "margin"),
    ("track_id 2**63", "hit", with_("hit", "track_id", 2**63), "track_id"),
    ("track_id -2", "hit", with_("hit", "track_id", -2), "track_id"),
    ("watchlist_version 2**63", "hit", with_("hit", "watchlist_version", 2**63), "watchlist_version"),
    ("captured_at -1", "hit", with_("hit", "captured_at", -1), "captured_at"),
    ("captured_at 1e300", "hit", with_("hit", "captured_at", 1e300), "captured_at"),
    ("queued_at 0", "hit", with_("hit", "queued_at", 0), "queued_at"),
    ("lone surrogate in person_id", "hit", with_("hit", "person_id", "p-\ud800"), "person_id"),
    ("newline in camera_id", "hit", with_("hit", "camera_id", "cam\n2025-01-01 HIT forged"), "camera_id"),
    ("escape sequence in unit_id", "hit", with_("hit", "unit_id", "u\x1b[2J"), "unit_id"),
    ("line separator in site", "hit", with_("hit", "site", "a\u2028b"), "site"),
    ("129-character model_id", "hit", with_("hit", "model_id", "m" * 129), "model_id"),
    ("5 MiB id", "hit", with_("hit", "id", "i" * (5 * 1024 * 1024)), "bytes"),
    ("empty person_id", "hit", with_("hit", "person_id", ""), "person_id"),
    ("person_id a number", "hit", with_("hit", "person_id", 7), "person_id"),
    ("5,000-digit integer", "hit", raw_with("hit", "track_id", "9" * 5000), "track_id"),
    ("NaN score", "hit", raw_with("hit", "score", "NaN"), "score"),
    ("Infinity threshold", "hit", raw_with("hit", "threshold", "Infinity"), "threshold"),
    ("1e400 captured_at", "hit", raw_with("hit", "captured_at", "1e400"), "captured_at"),
    ("box out of range", "hit", with_("hit", "box", [0, 0, 1e9, 10]), "box"),
    ("box with NaN", "hit", raw_with("hit", "box", "[0, 0, NaN, 10]"), "box"),
    ("oversized crop", "hit", with_("hit", "crop_jpeg_b64", HUGE_CROP), "crop_jpeg_b64"),
    ("stranger_rate 1.5", "hit", with_("hit", "stranger_rate", 1.5), "stranger_rate"),
    ("stranger_rate -0.1", "hit", with_("hit", "stranger_rate", -0.1), "stranger_rate"),
    ("stranger_rate a string", "hit", with_("hit", "stranger_rate", "1 in 12000"), "stranger_rate"),
    ("stranger_rate null", "hit", with_("hit", "stranger_rate", None), "stranger_rate"),
    ("NaN stranger_rate", "hit", raw_with("hit", "stranger_rate", "NaN"), "stranger_rate"),
    ("bad key_id", "hit", with_("hit", "key_id", "../../etc"), "key_id"),
    ("bad sig", "hit", with_("hit", "sig", "x" * 5000), "sig"),
    ("lone surrogate in reason", "status", with_("status", "reason", "bye \udc80"), "reason"),
    ("newline in reason", "status", with_("status", "reason", "bye\nHIT forged"), "reason"),
    ("status at 1e300", "status", with_("status", "at", 1e300), "at"),
    ("status at -1", "status", with_("status", "at", -1), "at"),
    ("state unknown", "status", with_("status", "state", "dancing"), "state"),
    ("long reason", "status", with_("status", "reason", "r" * (records.MAX_TEXT_CHARS + 1)), "reason"),
    ("heartbeat at 1e300", "heartbeat", with_("heartbeat", "at", 1e300), "at"),
    ("interval_s 1e9", "heartbeat", with_("heartbeat", "interval_s", 1e9), "interval_s"),
    ("outbox count 2**63", "heartbeat", with_("heartbeat", "outbox.pending", 2**63), "outbox.pending"),
    ("negative outbox count", "heartbeat", with_("heartbeat", "outbox.sent", -1), "outbox.sent"),
    ("link state unknown", "heartbeat", with_("heartbeat", "link.state", "flying"), "link.state"),
    ("surrogate in unit figures", "heartbeat", with_("heartbeat", "unit.error", "\ud800"), "unit"),
    ("100 keys in unit figures", "heartbeat", with_("heartbeat", "unit", {f"k{i}": i for i in range(100)}), "unit"),
]

# Refused by decode but beyond what the schema keywords can say: the schema check sees a payload that is
# not JSON at all (NaN, Infinity, nesting Python cannot even parse) or one the schema cannot bound.
NOT_JSON_FOR_A_SCHEMA = {"NaN score", "Infinity threshold", "box with NaN", "NaN stranger_rate"}


@pytest.mark.parametrize(("case", "kind", "payload", "field"), BAD, ids=[b[0] for b in BAD])
def test_decode_refuses_with_a_protocol_error_naming_the_field(case: str, kind: str, payload: bytes, field: str):
    with pytest.raises(ProtocolError) as err:
        DECODE[kind](payload)
    assert type(err.value) is ProtocolError
    assert field in str(err.value), str(err.value)[:300]
    assert len(str(err.value)) < 600, "the error must not echo the whole payload"


def _strict_json(payload: bytes) -> Any:
    def refuse(text: str) -> None:
        raise ValueError(f"{text} is not JSON")

    # Python cannot make an int of 5,000 digits; a number of that size stands in for the schema check.
    return json.loads(payload, parse_constant=refuse, parse_int=lambda s: int(s) if len(s) < 4000 else 10.0**300)


@pytest.mark.parametrize(("case", "kind", "payload", "field"), BAD, ids=[b[0] for b in BAD])
def test_the_schema_refuses_the_same_payloads(case, kind, payload, field, payload_schemas):
    if case in NOT_JSON_FOR_A_SCHEMA:
        with pytest.raises(ValueError):
            _strict_json(payload)
        return
    if case == "100 keys in unit figures" or case == "surrogate in unit figures":
        body = _strict_json(payload)
        errors = schema_errors(body, payload_schemas[kind])
        # maxProperties says the first; the second only decode can see (free-form values).
        assert errors or case == "surrogate in unit figures"
        return
    body = _strict_json(payload)
    assert schema_errors(body, payload_schemas[kind]), f"the schema accepts {case}"


@pytest.mark.parametrize("kind", ["hit", "status", "heartbeat"])
def test_good_payloads_pass_both(kind: str, payload_schemas) -> None:
    body = GOOD[kind]()
    assert schema_errors(body, payload_schemas[kind]) == []
    DECODE[kind](json.dumps(body).encode())


@pytest.mark.parametrize("kind", ["hit", "status", "heartbeat"])
def test_deep_nesting_is_a_protocol_error_not_a_recursion_error(kind: str) -> None:
    deep = ("[" * 200_000 + "]" * 200_000).encode()
    with pytest.raises(ProtocolError, match="payload"):
        DECODE[kind](deep)
    nested_in_field = json.dumps(GOOD[kind]()).replace('"site-a"', "[" * 100_000 + "]" * 100_000, 1).encode()
    with pytest.raises(ProtocolError):
        DECODE[kind](nested_in_field)


def test_deep_nesting_inside_heartbeat_figures_is_bounded() -> None:
    tree: Any = 1
    for _ in range(records.MAX_TREE_DEPTH + 2):
        tree = {"x": tree}
    with pytest.raises(ProtocolError, match="nested deeper"):
        records.decode_heartbeat(with_("heartbeat", "unit", tree))


def test_a_bigger_crop_limit_can_be_configured() -> None:
    payload = with_("hit", "crop_jpeg_b64", HUGE_CROP)
    fields, crop = records.decode_hit(payload, max_crop_bytes=1024 * 1024)
    assert crop is not None and crop.startswith(records.JPEG_MAGIC)


def test_unknown_keys_are_dropped() -> None:
    fields, _ = records.decode_hit(with_("hit", "extra", {"a": [1, 2, 3]}))
    assert "extra" not in fields
    fields, _ = records.decode_hit(with_("hit", "key_id", "0123456789abcdef"))
    assert "key_id" not in fields


def test_a_stranger_rate_in_range_is_kept_and_an_older_units_hit_has_none(payload_schemas) -> None:
    for rate in (0, 1, 8.3e-5):
        payload = with_("hit", "stranger_rate", rate)
        assert records.decode_hit(payload)[0]["stranger_rate"] == rate
        assert schema_errors(json.loads(payload), payload_schemas["hit"]) == []
    assert "stranger_rate" not in good_hit()
    assert records.decode_hit(json.dumps(good_hit()).encode())[0]["stranger_rate"] is None


def test_schema_limits_are_the_decoders(payload_schemas) -> None:
    hit = payload_schemas["hit"]["properties"]
    for key in ("id", "site", "unit_id", "camera_id", "person_id", "model_id"):
        assert hit[key]["maxLength"] == records.MAX_ID_CHARS
        assert hit[key]["pattern"] == records.TEXT_PATTERN
    for key, rule in records.HIT_FIELDS.items():
        if rule.kind in ("number", "integer"):
            lo = "exclusiveMinimum" if rule.lo_exclusive else "minimum"
            assert (hit[key][lo], hit[key]["maximum"]) == (rule.lo, rule.hi), key
    rate = records.STRANGER_RATE
    assert (hit["stranger_rate"]["minimum"], hit["stranger_rate"]["maximum"]) == (rate.lo, rate.hi) == (0, 1)
    assert hit["crop_jpeg_b64"]["maxLength"] == records.b64_length(records.MAX_CROP_BYTES)
    status = payload_schemas["status"]["properties"]
    assert status["reason"]["maxLength"] == records.MAX_TEXT_CHARS
    assert status["at"]["maximum"] == records.MAX_TIME


def test_safe_text_escapes_what_could_forge_a_line() -> None:
    assert records.safe_text("cam\n2025 HIT x") == "cam\\n2025 HIT x"
    assert records.safe_text("a\x1b[2Jb\u2028c\ud800") == "a\\x1b[2Jb\\u2028c\\ud800"
    assert records.safe_text("back\\slash") == "back\\\\slash"
    # Direction overrides would make a log show "case-1\u202e1-esac" as another id.
    assert records.safe_text("case-1\u202e1-esac \u2066x\u200f") == "case-1\\u202e1-esac \\u2066x\\u200f"
    assert records.safe_text("x" * 300, limit=10) == "x" * 10 + "..."
    assert records.safe_text("Zürich gate-2") == "Zürich gate-2"


def test_the_unit_cannot_build_a_hit_the_receiver_would_refuse() -> None:
    with pytest.raises(RecordError, match="camera_id"):
        make_hit(camera_id="cam\n1")
    with pytest.raises(RecordError, match="person_id"):
        make_hit(person_id="p" * 129)
    # Quantised scores stray a hair past 1: the record is clamped into the schema's range.
    body = records.hit_record(make_hit(score=1.00005, margin=2.0001), "site-a")
    assert body["score"] == 1.0 and body["margin"] == 2.0
    records.decode_hit(records.hit_payload(body, None, None))


def test_the_unit_cuts_long_heartbeat_text_instead_of_losing_the_heartbeat() -> None:
    outbox = {k: 0 for k in records.HEARTBEAT_OUTBOX_KEYS}
    link = {"state": "disconnected", "connects": 0, "connect_attempts": 3, "last_error": "e" * 5000}
    unit = {"cameras": [{"id": "cam-1", "last_error": "ffmpeg said " + "x" * 20_000 + " \ud800"}]}
    payload = records.heartbeat_payload(
        "site-a", "unit-1", interval_s=30, uptime_s=1, unit=unit, outbox=outbox, link=link
    )
    body = records.decode_heartbeat(payload)
    assert len(body["unit"]["cameras"][0]["last_error"]) == records.MAX_TEXT_CHARS
    assert len(body["link"]["last_error"]) == records.MAX_TEXT_CHARS
