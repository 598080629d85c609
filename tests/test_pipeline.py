"""The analysis pipeline on real clips with the real face engine and a real signed watchlist.

The enrolled person is hit once per appearance and nobody else ever; tracks are embedded on a few
best faces, not every frame; faces of several cameras are batched; the threaded pipeline delivers
the same hits to a real JSON-lines file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edge.analysis import AnalysisConfig
from edge.decision import DecisionConfig
from edge.frame import Frame
from edge.pipeline import CameraSpec, Pipeline
from edge.sinks import JsonlSink, JsonlSinkConfig, MemorySink
from testing.broker import wait_for
from testing.media import make_face_clip
from tests.edge_support import (
    People,
    matcher_for,
    signed_store,
)
from wire.records import Hit

FPS = 10
SIZE = (640, 360)


@pytest.fixture(scope="module")
def watchlist(tmp_path_factory: pytest.TempPathFactory, people: People) -> tuple[Path, Path]:
    return signed_store(tmp_path_factory.mktemp("watchlist"), people)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, people: People) -> Path:
    """8 s: the enrolled person 0.5-3 s on the left, the other person 1-6 s on the right, the enrolled again 5-7.5 s."""
    d = tmp_path_factory.mktemp("clips")
    return make_face_clip(
        d / "two-people.mp4",
        [
            (people.enrolled_face, 0.5, 3.0, 40, 60, 200),
            (people.other_face, 1.0, 6.0, 380, 70, 200),
            (people.enrolled_face, 5.0, 7.5, 60, 100, 180),
        ],
        size=SIZE,
        fps=FPS,
        seconds=8.0,
    )


def decode(path: Path, camera_id: str, t0: float, every: int = 1) -> list[Frame]:
    import av

    frames = []
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i % every == 0:
                frames.append(Frame(camera_id, i, t0 + i / FPS, f.to_ndarray(format="rgb24")))
    return frames


def run_sync(engine: Any, matcher: Any, frames: list[Frame], matching: DecisionConfig) -> tuple[Pipeline, MemorySink]:
    sink = MemorySink()
    cams = sorted({f.camera_id for f in frames})
    pipe = Pipeline(
        unit_id="unit-t",
        cameras=[CameraSpec(c, None, 5.0) for c in cams],  # type: ignore[arg-type]
        engine=engine,
        matcher=matcher,
        sinks=[sink],
        matching=matching,
    )
    for f in frames:
        pipe.process_frame(f)
    return pipe, sink


def appearance_of(hit: Hit, t0: float) -> int:
    t = hit.captured_at - t0
    cx = (hit.box[0] + hit.box[2]) / 2
    assert cx < 320, f"hit at x={cx}: the enrolled person is on the left half, the other on the right"
    return 0 if t < 3.0 else 1


def test_enrolled_person_hit_once_per_appearance_and_nobody_else(
    engine: Any, people: People, watchlist: tuple[Path, Path], clip: Path
) -> None:
    matcher = matcher_for(*watchlist)
    t0 = 1_700_000_000.0
    frames = decode(clip, "cam1", t0, every=2)  # 5 analysed frames per second
    pipe, sink = run_sync(engine, matcher, frames, DecisionConfig(cooldown_s=1.0))
    assert [h.person_id for h in sink.hits] == [people.enrolled_id] * 2, (people.source, sink.hits)
    assert sorted(appearance_of(h, t0) for h in sink.hits) == [0, 1]
    st = pipe.stats()["cam1"]
    assert st["frames_analysed"] == len(frames) == 40
    # Faces were seen on most frames, but each track was embedded only on a few of its best faces.
    assert st["faces"] >= 45  # 51 face-frames in the clip at 5 fps
    assert 2 <= st["embedded"] <= 3 * DecisionConfig().max_embeds_per_track
    for hit in sink.hits:
        assert hit.unit_id == "unit-t" and hit.camera_id == "cam1" and hit.model_id == engine.model_id
        assert hit.watchlist_version == 1 and hit.threshold == pytest.approx(people.threshold)
        assert hit.score >= hit.threshold and hit.margin == pytest.approx(hit.score + 1.0)  # nobody second
        assert hit.crop_jpeg is not None and hit.crop_jpeg[:3] == b"\xff\xd8\xff"
        # The score in the calibration's terms, for the list matched against (its persons, their templates).
        index = matcher.index
        expected = engine.calibration.expected_rates(hit.score, index.n_persons, index.n_templates / index.n_persons)
        assert hit.stranger_rate == pytest.approx(expected.fpir)
    # Frame-to-hit: the hit of each appearance comes from one of its first analysed frames.
    firsts = sorted(h.captured_at - t0 for h in sink.hits)
    assert firsts[0] <= 0.5 + 0.6 and 5.0 <= firsts[1] <= 5.0 + 0.6


def test_cooldown_covers_the_second_appearance(
    engine: Any, people: People, watchlist: tuple[Path, Path], clip: Path
) -> None:
    matcher = matcher_for(*watchlist)
    frames = decode(clip, "cam1", 1_700_000_000.0, every=2)
    _, sink = run_sync(engine, matcher, frames, DecisionConfig(cooldown_s=60.0))
    assert [h.person_id for h in sink.hits] == [people.enrolled_id]


def test_unmatched_person_alone_gives_nothing(
    engine: Any, people: People, watchlist: tuple[Path, Path], tmp_path: Path
) -> None:
    matcher = matcher_for(*watchlist)
    other = make_face_clip(
        tmp_path / "other.mp4", [(people.other_face, 0.0, 3.0, 200, 60, 220)], size=SIZE, fps=FPS, seconds=3.0
    )
    pipe, sink = run_sync(engine, matcher, decode(other, "cam1", 1_700_000_000.0, every=2), DecisionConfig())
    assert sink.hits == []
    st = pipe.stats()["cam1"]
    assert st["faces"] >= 10 and st["matched"] == 0
    if people.source == "lag-dev":
        # (The cameraman of the fallback looks aside and never passes the quality gate.)
        assert st["embedded"] >= 1


def test_threaded_pipeline_two_cameras_to_jsonl(
    engine: Any, people: People, watchlist: tuple[Path, Path], clip: Path, tmp_path: Path
) -> None:
    from edge.camera.capture import CameraReader
    from edge.camera.config import CaptureConfig

    matcher = matcher_for(*watchlist)
    readers = [CameraReader(CaptureConfig(id=f"cam{i}", url=str(clip), realtime=True)) for i in (1, 2)]
    sink = JsonlSink(JsonlSinkConfig(path=tmp_path / "hits.jsonl"), "site-a")
    pipe = Pipeline(
        unit_id="unit-t",
        cameras=[CameraSpec(r.camera_id, r, 5.0) for r in readers],
        engine=engine,
        matcher=matcher,
        sinks=[sink],
        matching=DecisionConfig(cooldown_s=1.0),
        analysis=AnalysisConfig(embed_wait_ms=400.0),
    )
    batches: list[set[str]] = []
    real = pipe.process_batch

    def spy(batch: list[Any]) -> list[Hit]:
        batches.append({r.camera_id for r in batch})
        return real(batch)

    pipe.process_batch = spy  # type: ignore[method-assign]
    for r in readers:
        r.start()
    pipe.start()
    out = tmp_path / "hits.jsonl"
    wait_for(lambda: all(r.finished for r in readers), 20, what="both clips read to their end")
    # The sink flushes each hit: the four the clips make (two per camera, 1 s cooldown) are the event;
    # one more made before the stop would still show in the count asserted below.
    wait_for(lambda: out.is_file() and len(out.read_text().splitlines()) >= 4, 20, what="four hits in hits.jsonl")
    pipe.stop()
    for r in readers:
        r.stop()
    sink.close()
    assert pipe.healthy() is False  # stopped threads are not healthy
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_cam = {c: [x for x in lines if x["camera_id"] == c] for c in ("cam1", "cam2")}
    assert all(x["person_id"] == people.enrolled_id for x in lines)
    assert [len(v) for v in by_cam.values()] == [2, 2], lines
    assert all(x["crop_jpeg_b64"] for x in lines)
    # Both cameras play the same clip at once, so some batches held faces of both.
    assert any(len(b) == 2 for b in batches), batches
    for st in pipe.stats().values():
        # Sampled at analysis_fps (5), never at the stream's 10 fps; how close to 5 a loaded machine
        # gets is the benchmark's business (bench/pipeline.py), not a test's.
        assert 0 < st["frames_analysed"] <= 5.5 * 8.0
        assert st["hit_latency_p50_s"] is not None


def test_slots_keep_only_the_newest_frame_and_serve_cameras_fairly() -> None:
    import numpy as np

    from edge.pipeline import _Slots

    img = np.zeros((4, 4, 3), np.uint8)
    slots = _Slots()

    def f(cam: str, seq: int) -> Frame:
        return Frame(cam, seq, time.time(), img)

    assert slots.put(f("a", 0)) is False
    assert slots.put(f("b", 0)) is False
    assert slots.put(f("b", 1)) is True, "a newer frame replaces the waiting one"
    first = slots.take(0.1)
    assert first is not None and (first.camera_id, first.seq) == ("a", 0)
    slots.done("a")
    slots.put(f("a", 1))
    # b has waited since before a's new frame, though its frame is newer: b goes first.
    second = slots.take(0.1)
    assert second is not None and (second.camera_id, second.seq) == ("b", 1)
    # A camera being analysed is not handed to a second detector.
    slots.put(f("b", 2))
    third = slots.take(0.1)
    assert third is not None and third.camera_id == "a"
    assert slots.take(0.1) is None
    slots.done("b")
    fourth = slots.take(0.1)
    assert fourth is not None and (fourth.camera_id, fourth.seq) == ("b", 2)
    # A sampler finding its camera's frame still waiting can wait for a detector to take it.
    import threading

    slots.done("a")
    slots.put(f("a", 2))
    assert slots.wait_taken("a", 0.05) is False
    taker = threading.Thread(target=lambda: slots.take(5.0))
    taker.start()
    assert slots.wait_taken("a", 5.0) is True
    taker.join()
    assert slots.wait_taken("b", 0.0) is True  # nothing of b's waits
    slots.close()
    assert slots.take(1.0) is None


class _FirstAsked:
    """A real camera reader, noting when the pipeline first asked it for a frame."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.camera_id = reader.camera_id
        self.first_asked: float | None = None

    def latest(self, after_seq: int = -1, timeout: float = 1.0) -> Frame | None:
        if self.first_asked is None:
            self.first_asked = time.monotonic()
        return self.reader.latest(after_seq, timeout)


def test_cameras_are_sampled_and_searched_whole_in_turn(
    engine: Any, watchlist: tuple[Path, Path], tmp_path: Path
) -> None:
    from edge.camera.capture import CameraReader
    from edge.camera.config import CaptureConfig
    from testing.broker import wait_for
    from testing.media import astronaut_face

    clip = make_face_clip(tmp_path / "still.mkv", [(astronaut_face(), 0, 2, 10, 10, 100)], size=(320, 240), seconds=2)
    readers = [CameraReader(CaptureConfig(id=f"cam{i}", url=str(clip), loop=True)) for i in range(4)]
    cams = [_FirstAsked(r) for r in readers]
    pipe = Pipeline(
        unit_id="unit-t",
        cameras=[CameraSpec(c.camera_id, c, 5.0) for c in cams],
        engine=engine,
        matcher=matcher_for(*watchlist),
        sinks=[MemorySink()],
    )
    # Each camera a quarter further into the full-frame schedule (edge.regions.RegionPlanner.phase) ...
    assert [pipe.analysers[c.camera_id].planner.phase for c in cams] == [0.0, 0.25, 0.5, 0.75]
    for r in readers:
        r.start()
    started = time.monotonic()
    pipe.start()
    try:
        wait_for(lambda: all(c.first_asked is not None for c in cams), 10.0, "every camera sampled once")
    finally:
        pipe.stop()
        for r in readers:
            r.stop()
    # ... and a quarter of the sampling period (0.2 s at 5 fps) later into its sampling.
    for i, c in enumerate(cams):
        assert c.first_asked - started >= 0.05 * i - 0.005, (i, c.first_asked - started)


def test_a_new_frame_wakes_a_waiting_detector_even_while_a_sampler_waits() -> None:
    import threading

    import numpy as np

    from edge.pipeline import _Slots
    from testing.broker import wait_for

    img = np.zeros((4, 4, 3), np.uint8)
    slots = _Slots()

    def waiting() -> int:
        # Threads blocked in the slots, whichever condition they wait on.
        return sum(len(c._waiters) for c in {id(c): c for c in (slots._cond, slots._taken)}.values())  # type: ignore[attr-defined]

    slots.put(Frame("a", 0, time.time(), img))
    assert slots.take(0.1) is not None  # a is being analysed ...
    slots.put(Frame("a", 1, time.time(), img))  # ... and its next frame waits: a's sampler waits for it to go
    sampler = threading.Thread(target=lambda: slots.wait_taken("a", 5.0))
    sampler.start()
    wait_for(lambda: waiting() == 1, 5.0, "the sampler waiting")
    got: list[Frame | None] = []
    detector = threading.Thread(target=lambda: got.append(slots.take(5.0)))
    detector.start()
    wait_for(lambda: waiting() == 2, 5.0, "the detector waiting")
    slots.put(Frame("b", 0, time.time(), img))
    # The detector gets b's frame at once, not after its 5 s timeout (the put's wake-up went to the sampler).
    wait_for(lambda: got, 2.0, "the detector to take b's frame")
    assert got[0] is not None and got[0].camera_id == "b"
    slots.close()
    sampler.join()
    detector.join()


def test_a_hit_that_cannot_be_made_is_logged_and_the_next_ones_still_come(
    engine: Any, people: People, watchlist: tuple[Path, Path], clip: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A listed person whose id the wire refuses (a C1 control character, issue 20) must not stop the
    embedder: the failure is counted and logged with the match, and later hits still come."""
    from matching.matcher import TemplateIndex

    matcher = matcher_for(*watchlist)
    good = matcher.index
    bad_id = "case-2024\x9f0173"
    templates = good.templates_of(people.enrolled_id)
    matcher.swap(
        TemplateIndex.build(
            [bad_id] * len(templates),
            templates,
            thresholds={bad_id: good.threshold_for(people.enrolled_id)},
            version=good.version,
            model_id=good.model_id,
            default_threshold=good.default_threshold,
        )
    )
    t0 = 1_700_000_000.0
    frames = decode(clip, "cam1", t0, every=2)
    first, second = [f for f in frames if f.captured_at - t0 < 4.0], [f for f in frames if f.captured_at - t0 >= 4.0]
    with caplog.at_level("ERROR", logger="edge.pipeline"):
        pipe, sink = run_sync(engine, matcher, first, DecisionConfig(cooldown_s=1.0))
    assert sink.hits == []
    st = pipe.stats()["cam1"]
    assert st["errors"] >= 1 and repr(bad_id) in st["last_error"]
    assert any(repr(bad_id) in r.getMessage() and "could not be made" in r.getMessage() for r in caplog.records)
    matcher.swap(good)  # HQ fixes the id
    for f in second:
        pipe.process_frame(f)
    assert [h.person_id for h in sink.hits] == [people.enrolled_id]
