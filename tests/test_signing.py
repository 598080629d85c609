"""Signed records: a unit signs its hits and status with its own Ed25519 key; the centre's
verify_record tells valid from unsigned, forged, changed and unknown (issue 11: "there is no way
for the centre to know which unit really sent a hit")."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, wait_for
from testing.hits import face_jpeg, make_hit, noise_jpeg, schema_errors
from wire import records
from wire.signing import (
    KnownKeys,
    SigningError,
    UnitKey,
    Verdict,
    generate_unit_key,
    load_unit_key,
    public_key_line,
    verify_record,
    write_unit_key,
)

FACE = face_jpeg()


@pytest.fixture(scope="module")
def unit1():
    return generate_unit_key()


@pytest.fixture(scope="module")
def keys(unit1):
    other = generate_unit_key()
    text = "\n".join(
        [
            "# the centre's unit keys",
            public_key_line("site-a", "unit-1", unit1.public_raw),
            public_key_line("site-b", "unit-9", other.public_raw),
        ]
    )
    return KnownKeys.parse(text)


def signed_hit(signer, crop=FACE, **overrides) -> bytes:
    hit = make_hit(crop=crop, **overrides)
    return records.hit_payload(records.hit_record(hit, "site-a"), crop, None, signer=signer)


def edit(payload: bytes, **changes) -> bytes:
    body = json.loads(payload)
    body.update(changes)
    return json.dumps(body).encode()


def test_a_signed_hit_is_valid_and_still_a_protocol_v1_hit(unit1, keys, payload_schemas) -> None:
    payload = signed_hit(unit1)
    assert verify_record(payload, keys) == Verdict.VALID == "valid"
    body = json.loads(payload)
    assert body["key_id"] == unit1.key_id and len(base64.b64decode(body["sig"])) == 64
    assert schema_errors(body, payload_schemas["hit"]) == []
    fields, crop = records.decode_hit(payload)
    assert crop == FACE and "sig" not in fields


def test_every_field_and_the_crop_are_covered(unit1, keys) -> None:
    payload = signed_hit(unit1)
    for change in (
        {"score": 0.99},
        {"person_id": "someone-else"},
        {"captured_at": 1.0},
        {"camera_id": "cam-9"},
        {"crop_dropped": "oversized"},
        {"box": [1.0, 1.0, 2.0, 2.0]},
    ):
        assert verify_record(edit(payload, **change), keys) == Verdict.BAD_SIGNATURE, change
    other_crop = base64.b64encode(noise_jpeg(3000)).decode()
    assert verify_record(edit(payload, crop_jpeg_b64=other_crop), keys) == Verdict.BAD_SIGNATURE
    assert verify_record(edit(payload, crop_jpeg_b64=None), keys) == Verdict.BAD_SIGNATURE
    # Re-encoding the JSON (spaces, key order) does not matter: the canonical form is signed.
    body = json.loads(payload)
    assert verify_record(json.dumps(dict(reversed(list(body.items()))), indent=1).encode(), keys) == Verdict.VALID


def test_unsigned_unknown_and_borrowed_keys(unit1, keys) -> None:
    plain = signed_hit(None)
    assert verify_record(plain, keys) == Verdict.UNSIGNED
    assert verify_record(signed_hit(generate_unit_key()), keys) == Verdict.UNKNOWN_KEY
    # A hit moved to another unit: that unit's keys do not include unit-1's.
    moved = signed_hit(unit1, unit_id="unit-9")
    assert verify_record(edit(moved, site="site-b"), keys) == Verdict.UNKNOWN_KEY
    assert verify_record(signed_hit(unit1, unit_id="unit-5"), keys) == Verdict.UNKNOWN_UNIT
    assert verify_record(edit(signed_hit(unit1), sig="A" * 86 + "=="), keys) == Verdict.BAD_SIGNATURE
    assert verify_record(edit(signed_hit(unit1), sig="not base64!"), keys) == Verdict.BAD_SIGNATURE
    assert keys.knows_unit("site-a", "unit-1") and not keys.knows_unit("site-a", "unit-5")


def test_status_messages_are_signed_too(unit1, keys) -> None:
    payload = records.status_payload("site-a", "unit-1", "online", "connected", signer=unit1)
    records.decode_status(payload)
    assert verify_record(payload, keys) == Verdict.VALID
    assert verify_record(edit(payload, state="offline"), keys) == Verdict.BAD_SIGNATURE


def test_key_files(tmp_path: Path, unit1) -> None:
    path = write_unit_key(unit1, tmp_path / "unit-1.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_unit_key(path).key_id == unit1.key_id
    with pytest.raises(SigningError, match="refusing to overwrite"):
        write_unit_key(generate_unit_key(), path)
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(SigningError, match="junk.key"):
        load_unit_key(tmp_path / "junk.key")
    folder = tmp_path / "unit-keys"
    folder.mkdir()
    (folder / "unit-1.pub").write_text(public_key_line("site-a", "unit-1", unit1.public_raw) + "\n")
    loaded = KnownKeys.load(folder)
    assert len(loaded) == 1 and loaded.knows_unit("site-a", "unit-1")
    (folder / "bad.pub").write_text("checkpoint-unit-key v1 site-a unit-2 AAAA\n")
    with pytest.raises(SigningError, match="bad.pub:1"):
        KnownKeys.load(folder)
    assert len(KnownKeys([UnitKey("s", "u", unit1.key_id, unit1.public_raw)])) == 1


def test_config_names_a_bad_signing_key(tmp_path: Path) -> None:
    (tmp_path / "garbage.key").write_bytes(b"\x00" * 40)
    with pytest.raises(ValidationError, match="signing_key"):
        MqttConfig(site="site-a", signing_key=tmp_path / "garbage.key")
    with pytest.raises(ValidationError, match="signing_key"):
        MqttConfig(site="site-a", signing_key=tmp_path / "missing.key")


def test_the_reporter_signs_hits_and_status_on_the_wire(mosquitto, tmp_path: Path, unit1, keys) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    key_path = write_unit_key(unit1, tmp_path / "unit-1.key")
    got: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    spy.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.connect(mosquitto.host, mosquitto.port)
    spy.subscribe("checkpoint/v1/#", qos=1)
    spy.loop_start()
    assert subscribed.wait(10)
    cfg = MqttConfig(
        host=mosquitto.host,
        port=mosquitto.port,
        site="site-a",
        signing_key=key_path,
        require_subscriber=False,
        **FAST,
    )
    reporter = MqttReporter(cfg, OutboxConfig(path=tmp_path / "outbox.sqlite"), "unit-1")
    try:
        hits = [make_hit(crop=FACE), make_hit(crop=None)]
        for h in hits:
            reporter.submit(h)
        wait_for(lambda: sum(t.endswith("/hits") for t, _ in got) == 2, what="two hits")
        wait_for(lambda: any(t.endswith("/status") for t, _ in got), what="a status")
    finally:
        reporter.close(2)
        spy.loop_stop()
        spy.disconnect()
    signed = [(t, p) for t, p in got if t.endswith(("/hits", "/status"))]
    assert signed and all(verify_record(p, keys) == Verdict.VALID for _, p in signed), [
        (t, verify_record(p, keys)) for t, p in signed
    ]
