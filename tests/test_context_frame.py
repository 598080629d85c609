"""The optional context frame (issue 21): the whole frame, downscaled, with the face's box, sent with a
hit only where the unit's config turns it on, and kept exactly like a crop: bounded and dropped first
by the outbox, covered by the hit's signature, bounded (stripped, counted) by the receiver, stored
beside the crop and purged with it; a receiver and a unit older than it keep working. Against a real
Mosquitto and receiver, on SQLite and PostgreSQL stores."""

from __future__ import annotations

import base64
import json
import sqlite3
import time

import numpy as np
import pytest

from central.store import HitStore
from edge.hits import CONTEXT_BOX_RGB, CropConfig, HitEmitter, encode_context
from edge.outbox import Outbox, OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from matching.match import Match
from testing.broker import FAST, wait_for
from testing.hits import face_jpeg, make_hit, noise_jpeg, schema_errors
from tests.console_support import signing_unit, start_receiver
from wire import records, signing
from wire.errors import ProtocolError


def scene(h: int = 720, w: int = 1280) -> np.ndarray:
    """A grey frame with a light face-sized patch: what a camera gives, minus the people."""
    img = np.full((h, w, 3), 90, dtype=np.uint8)
    img[200:400, 500:650] = 200
    return img


def test_the_context_frame_is_the_whole_scene_downscaled_with_the_box():
    import cv2

    img = scene()
    before = img.copy()
    jpeg = encode_context(img, (500.0, 200.0, 650.0, 400.0), CropConfig(context_frame=True, context_max_px=640))
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert frame.shape == (360, 640, 3)
    # The box is drawn where the face is, at the frame's scale (x1 = 500 / 2 = 250), in red.
    edge = frame[150:190, 248:252].reshape(-1, 3).mean(axis=0)
    assert np.abs(edge - CONTEXT_BOX_RGB).max() < 60, edge
    assert np.array_equal(img, before), "the camera's frame itself is never drawn on"
    small = scene(240, 320)
    jpeg = encode_context(small, (10.0, 10.0, 60.0, 80.0), CropConfig(context_frame=True))
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (240, 320)  # never enlarged


def test_a_hit_carries_a_context_frame_only_when_the_unit_turns_it_on():
    match = Match(person_id="case-1", score=0.9, threshold=0.6, second_score=0.3)
    kw = dict(
        track_id=1, match=match, box=(500.0, 200.0, 650.0, 400.0), image=scene(), model_id="m", watchlist_version=1
    )
    off = HitEmitter("unit-1").offer(camera_id="cam-1", captured_at=1.0, **kw)
    assert off is not None and off.crop_jpeg is not None and off.context_jpeg is None
    on = HitEmitter("unit-1", crop=CropConfig(context_frame=True)).offer(camera_id="cam-2", captured_at=1.0, **kw)
    assert on is not None and on.context_jpeg[:3] == records.JPEG_MAGIC


def test_on_the_wire_optional_signed_and_bounded(payload_schemas):
    signer = signing.generate_unit_key()
    keys = signing.KnownKeys([signing.UnitKey("site-a", "unit-1", signer.key_id, signer.public_raw)])
    hit = make_hit(crop=face_jpeg())
    record = records.hit_record(hit, "site-a", queued_at=1.0)
    # Without a frame: no key at all, the message of a unit older than context frames.
    plain = records.hit_payload(record, hit.crop_jpeg, None, signer=signer)
    assert b"context" not in plain
    fields, _ = records.decode_hit(plain)
    assert (fields["context_jpeg"], fields["context_dropped"]) == (None, None)
    frame = encode_context(scene(), (500.0, 200.0, 650.0, 400.0), CropConfig(context_frame=True))
    payload = records.hit_payload(record, hit.crop_jpeg, None, signer=signer, context=frame)
    body = json.loads(payload)
    assert schema_errors(body, payload_schemas["hit"]) == []
    fields, crop = records.decode_hit(payload)
    assert fields["context_jpeg"] == frame and crop == hit.crop_jpeg
    assert signing.verify_record(payload, keys, crop=crop) == signing.Verdict.VALID
    # The signature covers the frame as sent: another frame (or a removed one) does not verify.
    other = dict(body, context_jpeg_b64=base64.b64encode(face_jpeg()).decode())
    assert signing.verify_record(json.dumps(other).encode(), keys) == signing.Verdict.BAD_SIGNATURE
    gone = dict(body, context_jpeg_b64=None, context_dropped="outbox_full")
    assert signing.verify_record(json.dumps(gone).encode(), keys) == signing.Verdict.BAD_SIGNATURE
    # A receiver older than the frame signs over every key it is given, the frame's text among them:
    # that is what `canonical_bytes` still does, so such a receiver verifies the hit too.
    assert body["context_jpeg_b64"].encode() in signing.canonical_bytes(body)
    dropped = records.hit_payload(record, hit.crop_jpeg, None, context_dropped="oversized")
    assert records.decode_hit(dropped)[0]["context_dropped"] == "oversized"
    assert schema_errors(json.loads(dropped), payload_schemas["hit"]) == []
    # Malformed frames are refused like malformed crops; an oversized one is left out, the hit kept.
    for bad, words in (("not base64!", "not valid base64"), (base64.b64encode(b"GIF89a").decode(), "not a JPEG")):
        with pytest.raises(ProtocolError, match=f"context_jpeg_b64.*{words}"):
            records.decode_hit(json.dumps(dict(body, context_jpeg_b64=bad)).encode())
    with pytest.raises(ProtocolError, match="context_dropped"):
        records.decode_hit(json.dumps(dict(body, context_dropped="<script>")).encode())
    limit = payload_schemas["hit"]["properties"]["context_jpeg_b64"]["maxLength"]
    assert limit == records.b64_length(records.MAX_CONTEXT_BYTES)
    assert records.MAX_PAYLOAD_BYTES["hits"] >= 2 * limit + 32 * 1024  # a full crop and a full frame fit
    big = noise_jpeg(records.MAX_CONTEXT_BYTES + 40_000)
    fields, _ = records.decode_hit(records.hit_payload(record, None, None, context=big))
    assert fields["context_jpeg"] is None and fields["context_dropped"] == "oversized"
    assert "over the limit" in fields["context_refused"]


def put(box: Outbox, hit) -> int | None:
    return box.put(
        hit.id, records.encode_record(records.hit_record(hit, "site-a")), hit.crop_jpeg, context=hit.context_jpeg
    )


def test_the_outbox_bounds_frames_like_crops_and_drops_them_first(tmp_path):
    crop, frame = noise_jpeg(20_000, seed=1), noise_jpeg(40_000, seed=2)
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite", max_bytes=256 * 1024, max_crop_bytes=30_000))
    # Over max_crop_bytes: the frame goes at once, the hit and its crop stay.
    put(box, make_hit(id="big", crop=crop, context_jpeg=frame))
    (row,) = box.rows()
    assert (row.crop, row.context, row.context_dropped) == (crop, None, "oversized")
    assert box.counters()["contexts_dropped_oversized"] == 1
    box.close()

    box = Outbox(OutboxConfig(path=tmp_path / "p.sqlite", max_bytes=256 * 1024, max_crop_bytes=64_000))
    for i in range(4):
        put(box, make_hit(id=f"h{i}", crop=crop, context_jpeg=frame))  # 4 x 60 kB
    assert [r.context_dropped for r in box.rows()] == [None] * 4
    # The fifth needs room: the oldest frames go first, every crop stays.
    put(box, make_hit(id="h4", crop=crop, context_jpeg=frame))
    rows = box.rows()
    assert [r.hit_id for r in rows] == [f"h{i}" for i in range(5)]
    assert all(r.crop == crop for r in rows)
    assert rows[0].context is None and rows[0].context_dropped == "outbox_full" and rows[-1].context == frame
    assert box.counters()["contexts_dropped_full"] >= 1 and box.counters()["crops_dropped_full"] == 0
    assert box.pending_bytes <= 256 * 1024
    # Under more pressure the crops go only once no frame is left.
    for i in range(5, 20):
        put(box, make_hit(id=f"h{i}", crop=crop, context_jpeg=frame))
    rows = box.rows()
    framed = [r for r in rows if r.context is not None]
    cropless = [r for r in rows if r.crop is None]
    assert cropless and framed == [], "a crop went while a frame was kept"
    stats = box.stats()
    assert stats["contexts_dropped_full"] + stats["contexts_dropped_oversized"] >= 1
    box.close()


def test_an_outbox_from_before_context_frames_is_taken_over(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, hit_id TEXT NOT NULL UNIQUE, queued_at REAL "
        "NOT NULL, record BLOB NOT NULL, crop BLOB, crop_dropped TEXT, size INTEGER NOT NULL, state INTEGER NOT NULL "
        "DEFAULT 0, reason TEXT, error TEXT);"
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    )
    old.execute("INSERT INTO outbox(hit_id, queued_at, record, size) VALUES ('h0', 1.0, X'7B7D', 2)")
    old.commit()
    old.close()
    box = Outbox(OutboxConfig(path=path))
    put(box, make_hit(id="h1", context_jpeg=face_jpeg()))
    rows = box.rows()
    assert [(r.hit_id, r.context is not None) for r in rows] == [("h0", False), ("h1", True)]
    assert box.counters()["contexts_dropped_full"] == 0
    held = sum(len(r.record) + len(r.crop or b"") + len(r.context or b"") for r in rows)
    box.close()
    # A frame goes with its hit, whichever way the hit leaves (here: acknowledged, verdicts off).
    box = Outbox(OutboxConfig(path=path, verdicts="off"))
    assert box.pending_bytes == held  # the frame counted beside its hit's row, after a reopen too
    box.ack([r.seq for r in box.take(10)])
    assert box.rows() == [] and box.pending_bytes == 0
    left = sqlite3.connect(path)
    assert left.execute("SELECT COUNT(*) FROM contexts").fetchone()[0] == 0
    left.close()
    box.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = str(tmp_path / "hits.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = HitStore(url)
    yield s
    s.close()


def test_through_broker_and_receiver_stored_stripped_and_purged_like_crops(mosquitto, store, tmp_path):
    key = signing_unit(tmp_path)
    rx = start_receiver(mosquitto, store, "rx-context", unit_keys=tmp_path / "unit-keys")
    # A unit whose outbox lets a frame through that is larger than the receiver keeps.
    reporter = MqttReporter(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, site="site-a", signing_key=key, **FAST),
        OutboxConfig(path=tmp_path / "outbox.sqlite", max_crop_bytes=400 * 1024),
        "unit-1",
    )
    try:
        frame = encode_context(scene(), (500.0, 200.0, 650.0, 400.0), CropConfig(context_frame=True))
        with_frame = make_hit(crop=face_jpeg(), context_jpeg=frame, person_id="case-1")
        without = make_hit(crop=face_jpeg(), person_id="case-2")
        huge = make_hit(crop=None, context_jpeg=noise_jpeg(300 * 1024, seed=3), person_id="case-3")
        for hit in (with_frame, without, huge):
            reporter.submit(hit)
        wait_for(lambda: all(store.hit(h.id) for h in (with_frame, without, huge)), what="three hits stored")
        stored = store.hit(with_frame.id)
        assert stored["has_context"] and stored["context_dropped"] is None and stored["signature"] == "valid"
        assert store.context_frame(with_frame.id) == frame and store.crop(with_frame.id) == with_frame.crop_jpeg
        assert not store.hit(without.id)["has_context"] and store.context_frame(without.id) is None
        # Too large for the receiver: verified as sent, then stored without it, counted and said why.
        big = store.hit(huge.id)
        assert (big["has_context"], big["context_dropped"], big["signature"]) == (False, "oversized", "valid")
        assert rx.stats()["contexts_stripped"] == 1
        # Exported with the crops when asked; purged with them.
        import io

        out = io.StringIO()
        store.export_jsonl(out, with_crops=True)
        lines = {json.loads(line)["id"]: json.loads(line) for line in out.getvalue().splitlines()}
        assert base64.b64decode(lines[with_frame.id]["context_jpeg_b64"]) == frame
        assert lines[without.id]["context_jpeg_b64"] is None
        # `crop --context` writes it out, entered in the audit chain as a view of the frame.
        from click.testing import CliRunner

        from central.cli import main as cli

        res = CliRunner().invoke(
            cli, ["crop", "--db", store.location, with_frame.id, "--context", "--out", str(tmp_path / "scene.jpg")]
        )
        assert res.exit_code == 0, res.output
        assert (tmp_path / "scene.jpg").read_bytes() == frame
        res = CliRunner().invoke(cli, ["crop", "--db", store.location, without.id, "--context", "--out", "x.jpg"])
        assert res.exit_code == 1 and "came without a context frame" in res.output
        views = [e for e in store.audit_entries(limit=None) if e["action"] == "view_context"]
        assert [e["subject"] for e in views] == [with_frame.id]
        assert store.purge(0, now=time.time() + 10) == 3
        assert store.context_frame(with_frame.id) is None
        assert store._read("SELECT COUNT(*) AS n FROM context_frames")[0]["n"] == 0
    finally:
        reporter.close()
        rx.close()
