"""Hit emission (once per track and person, cooldown per camera and person) and the JSON-lines sink."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge.hits import CropConfig, HitEmitter, crop_box, stranger_rate
from edge.sinks import HitSink, JsonlSink, JsonlSinkConfig, SinkError
from matching.match import Match
from testing.hits import schema_errors
from wire import records
from wire.records import Hit

T0 = 1_700_000_000.0
BOX = (100.0, 80.0, 180.0, 180.0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def match(person: str = "p1", score: float = 0.8, threshold: float = 0.5, second: float = 0.2) -> Match:
    return Match(person_id=person, score=score, threshold=threshold, second_score=second)


def offer(
    em: HitEmitter,
    *,
    cam: str = "cam1",
    track: int = 1,
    m: Match | None = None,
    t: float = T0,
    image: np.ndarray | None = None,
) -> Hit | None:
    return em.offer(
        camera_id=cam,
        track_id=track,
        match=m or match(),
        box=BOX,
        captured_at=t,
        image=image,
        model_id="model-x",
        watchlist_version=7,
    )


def test_one_hit_per_track_and_person() -> None:
    em = HitEmitter("unit-1", cooldown_s=0.0)
    first = offer(em)
    assert first is not None
    assert [offer(em, t=T0 + k) for k in range(1, 20)] == [None] * 19
    other_person = offer(em, m=match("p2"), t=T0 + 1)
    assert other_person is not None and other_person.person_id == "p2"


def test_cooldown_per_camera_and_person() -> None:
    em = HitEmitter("unit-1", cooldown_s=60.0)
    assert offer(em, track=1, t=T0) is not None
    assert offer(em, track=2, t=T0 + 30) is None, "new track of the same person inside the cooldown"
    assert offer(em, track=3, cam="cam2", t=T0 + 30) is not None, "cooldown is per camera"
    assert offer(em, track=4, m=match("p2"), t=T0 + 30) is not None, "cooldown is per person"
    assert offer(em, track=5, t=T0 + 59.9) is None
    assert offer(em, track=6, t=T0 + 60.0) is not None, "cooldown counts from the last hit, not the last sighting"
    assert em.suppressed == 2


def test_below_threshold_is_never_a_hit() -> None:
    em = HitEmitter("unit-1")
    assert offer(em, m=match(score=0.49, threshold=0.5)) is None


def test_forgotten_track_id_may_hit_again_after_cooldown() -> None:
    em = HitEmitter("unit-1", cooldown_s=10.0)
    assert offer(em, track=1, t=T0) is not None
    assert offer(em, track=1, t=T0 + 20) is None
    em.forget_track("cam1", 1)
    assert offer(em, track=1, t=T0 + 20) is not None


def test_hit_carries_everything_and_a_real_jpeg_crop(image: np.ndarray) -> None:
    em = HitEmitter("unit-1", crop=CropConfig(margin=0.25, max_px=64))
    hit = offer(em, m=match(score=0.81, threshold=0.5, second=0.31), image=image, track=9)
    assert hit is not None
    assert (hit.unit_id, hit.camera_id, hit.person_id, hit.track_id) == ("unit-1", "cam1", "p1", 9)
    assert hit.captured_at == T0 and hit.box == BOX and hit.model_id == "model-x" and hit.watchlist_version == 7
    assert hit.score == pytest.approx(0.81) and hit.threshold == 0.5 and hit.margin == pytest.approx(0.5)
    assert len(hit.id) == 32
    assert hit.crop_jpeg is not None
    crop = cv2.imdecode(np.frombuffer(hit.crop_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert max(crop.shape[:2]) == 64
    # The crop shows the same pixels as the box in the frame (colour order kept: RGB in, JPEG right way round).
    x1, y1, x2, y2 = crop_box(image.shape, BOX, 0.25)
    want = cv2.resize(image[y1:y2, x1:x2], (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(crop[:, :, ::-1].astype(int) - want.astype(int)).mean() < 8


def test_crop_box_is_clipped_and_outside_box_rejected() -> None:
    assert crop_box((100, 100, 3), (-10, -10, 50, 50), 0.5) == (0, 0, 80, 80)
    with pytest.raises(ValueError, match="outside"):
        crop_box((100, 100, 3), (200, 200, 250, 250), 0.0)


def _hit(person: str = "p1", crop: bytes | None = None) -> Hit:
    return Hit(
        unit_id="u",
        camera_id="c",
        captured_at=T0,
        person_id=person,
        score=0.7,
        threshold=0.5,
        margin=0.2,
        box=BOX,
        model_id="m",
        watchlist_version=1,
        track_id=3,
        crop_jpeg=crop,
    )


def test_jsonl_sink_writes_one_line_per_hit_with_crop(tmp_path: Path) -> None:
    jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    sink = JsonlSink(JsonlSinkConfig(path=tmp_path / "sub" / "hits.jsonl"), "site-a")
    assert isinstance(sink, HitSink)
    sink.submit(_hit("p1", jpeg))
    sink.submit(_hit("p2"))
    # Flushed per hit: readable before close.
    lines = (tmp_path / "sub" / "hits.jsonl").read_text().splitlines()
    assert [json.loads(x)["person_id"] for x in lines] == ["p1", "p2"]
    rec = json.loads(lines[0])
    assert base64.b64decode(rec["crop_jpeg_b64"]) == jpeg
    assert rec["box"] == list(BOX) and rec["watchlist_version"] == 1 and rec["track_id"] == 3
    assert sink.stats()["written"] == 2
    sink.close()
    sink.close()
    with pytest.raises(SinkError, match="closed"):
        sink.submit(_hit())


def test_jsonl_sink_without_crops_and_rotation(tmp_path: Path) -> None:
    jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    path = tmp_path / "hits.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=path, include_crop=False, max_bytes=4096, backups=2), "site-a")
    for k in range(60):
        sink.submit(_hit(f"p{k}", jpeg))
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["hits.jsonl", "hits.jsonl.1", "hits.jsonl.2"]
    kept = [json.loads(x) for p in tmp_path.iterdir() for x in p.read_text().splitlines()]
    assert all(r["crop_jpeg_b64"] is None and r["crop_dropped"] == "not_kept" for r in kept)
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    assert "p59" in {r["person_id"] for r in kept} and "p0" not in {r["person_id"] for r in kept}


def test_jsonl_line_is_the_mqtt_hit_record(tmp_path: Path, payload_schemas: dict[str, Any]) -> None:
    jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    path = tmp_path / "hits.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=path), "site-a")
    hit = _hit("p1", jpeg)
    sink.submit(hit)
    sink.close()
    line = path.read_bytes().splitlines()[0]
    assert schema_errors(json.loads(line), payload_schemas["hit"]) == []
    fields, crop = records.decode_hit(line)
    assert crop == jpeg
    assert fields["id"] == hit.id and fields["site"] == "site-a" and fields["schema"] == records.HIT_SCHEMA


def test_jsonl_sink_unwritable_path_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SinkError, match=str(blocker / "hits.jsonl")):
        JsonlSink(JsonlSinkConfig(path=blocker / "hits.jsonl"), "site-a")


def test_a_crop_that_cannot_be_cut_loses_the_crop_not_the_hit(caplog: pytest.LogCaptureFixture) -> None:
    em = HitEmitter("unit-1", cooldown_s=60.0)
    tiny = np.zeros((4, 4, 3), np.uint8)  # BOX lies outside it: no crop can be cut
    with caplog.at_level("WARNING", logger="edge.hits"):
        hit = offer(em, image=tiny)
    assert hit is not None and hit.crop_jpeg is None
    assert "sent without a crop" in caplog.text
    assert offer(em, track=2, t=T0 + 1) is None  # and its cooldown holds as for any hit


def test_a_hit_that_cannot_be_made_leaves_no_cooldown_behind() -> None:
    from wire.errors import RecordError

    em = HitEmitter("unit-1", cooldown_s=60.0)
    with pytest.raises(RecordError, match="person_id"):
        offer(em, m=match("case-2024\x9f0173"))
    # Nothing was recorded for the refused hit: the next frame is not taken for a repeat in
    # cooldown (it fails the same way, and is counted by the caller, never silently dropped).
    with pytest.raises(RecordError, match="person_id"):
        offer(em, m=match("case-2024\x9f0173"), t=T0 + 1)
    assert em.suppressed == 0


def test_the_hit_carries_the_calibrated_stranger_rate_of_its_score_signed(payload_schemas: dict[str, Any]) -> None:
    from engines.calibration import Calibration
    from wire.signing import KnownKeys, Verdict, generate_unit_key, public_key_line, verify_record

    cal = Calibration.load_for("dlib-resnet-v1")
    # 600 persons with 1,200 templates: the list-wide rate, not the one person's (600 times smaller).
    rate = stranger_rate(cal, 0.99, 600, 1200)
    assert rate == pytest.approx(cal.expected_rates(0.99, 600, 2.0).fpir)
    assert rate > 100 * cal.expected_rates(0.99, 1, 2.0).fpir
    assert stranger_rate(None, 0.99, 600, 1200) is None and stranger_rate(cal, 0.99, 0, 0) is None

    em = HitEmitter("unit-1", cooldown_s=0.0)
    hit = em.offer(
        camera_id="cam1",
        track_id=1,
        match=match(score=0.99),
        box=BOX,
        captured_at=T0,
        image=None,
        model_id="dlib-resnet-v1",
        watchlist_version=7,
        stranger_rate=rate,
    )
    assert hit is not None and hit.stranger_rate == rate
    record = records.hit_record(hit, "site-a")
    assert (
        record["stranger_rate"] == rate
        and schema_errors(record | {"crop_jpeg_b64": None, "crop_dropped": None}, payload_schemas["hit"]) == []
    )
    # Inside the signature: a receiver that finds it changed finds the signature broken.
    signer = generate_unit_key()
    keys = KnownKeys.parse(public_key_line("site-a", "unit-1", signer.public_raw))
    signed = signer.sign(record, None)
    assert verify_record(json.dumps(signed).encode(), keys) == Verdict.VALID
    forged = json.dumps(signed | {"stranger_rate": rate / 1000}).encode()
    assert verify_record(forged, keys) != Verdict.VALID
    # Without a calibration the record is byte for byte an older unit's: no key at all.
    assert "stranger_rate" not in records.hit_record(offer(HitEmitter("unit-1"), t=T0), "site-a")
    with pytest.raises(records.RecordError, match="stranger_rate"):
        Hit(**{**hit.__dict__, "stranger_rate": float("nan")})
