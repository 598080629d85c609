"""The gate scenario (testing/gate.py): people step one after another into the same spot, with gaps of
0.2 to 1.5 s, one replaced by the next between two frames, one walking out as the next walks in.

Real engine, real clips, a real signed watchlist; as a file and over the real RTSP server. Every
person shown must be embedded, every enrolled one hit once, nobody else. Position-only tracking
(the unit before tracks checked who they follow) misses people here; a test shows it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.decision import DecisionConfig
from edge.frame import Frame
from edge.pipeline import CameraSpec, Pipeline
from edge.sinks import MemorySink
from edge.tracker import TrackerConfig
from testing.broker import wait_for
from testing.gate import FPS, LEGACY_MATCHING, LEGACY_TRACKER, GateScene, gate_scene, judge_gate, run_gate_clip


def _store(engine: Any, scene: GateScene, tmp: Path) -> tuple[Path, Path]:
    """A signed watchlist of the scene's enrolled people, applied to a unit store: (root key, store)."""
    from testing.demo import apply_watchlist, build_watchlist

    root, bundle = build_watchlist(
        tmp, engine, {p: [img] for p, img in scene.enrolment.items()}, default_threshold=scene.threshold
    )
    store = tmp / "unit.db"
    apply_watchlist(store, root, bundle, engine.model_id, engine.embedding_dim)
    return root, store


def _matcher(engine: Any, scene: GateScene, tmp: Path) -> Any:
    from matching.matcher import Matcher
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    root, store = _store(engine, scene, tmp)
    matcher = Matcher(dim=engine.embedding_dim)
    wl = Watchlist(WatchlistConfig(root_key=root, store=store), matcher, model_id=engine.model_id)
    wl.start()
    wl.close()
    return matcher


@pytest.fixture(scope="module")
def scene(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> GateScene:
    """People from lag-dev where present, else scikit-image's."""
    return gate_scene(engine, tmp_path_factory.mktemp("gate") / "gate.mp4")


@pytest.fixture(scope="module")
def scene_without_data(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> GateScene:
    return gate_scene(engine, tmp_path_factory.mktemp("gate-skimage") / "gate.mp4", use_data=False)


def run_file(
    engine: Any, scene: GateScene, tmp: Path, matching: DecisionConfig, tracker: TrackerConfig | None = None
) -> tuple[dict[str, Any], Pipeline]:
    """The clip's frames at 5 fps through the pipeline, synchronously; the judged result."""
    return run_gate_clip(engine, scene, _matcher(engine, scene, tmp), matching, tracker)


def assert_every_person_checked(result: dict[str, Any], scene: GateScene) -> None:
    assert result["unchecked"] == [], (scene.source, result)
    assert result["people_checked"] == result["people_shown"] == 7
    assert result["missed"] == [] and result["enrolled_hit"] == 5, (scene.source, result)
    assert result["wrong"] == 0 and result["repeats"] == 0, (scene.source, result)


def test_gate_clip_every_person_checked_and_enrolled_hit_once(engine: Any, scene: GateScene, tmp_path: Path) -> None:
    result, pipe = run_file(engine, scene, tmp_path, DecisionConfig())
    assert_every_person_checked(result, scene)
    # Checking everyone does not mean embedding every frame: a few faces per person, re-checks included.
    assert result["embeddings"] <= 4 * result["people_shown"], result
    reports = pipe.analysers["gate"].finish_all()
    assert sum(r.split_from is not None for r in reports) >= 3  # the swaps at one spot were split, not new tracks
    assert pipe.stats()["gate"]["splits"] >= 3
    assert sum(r.hit for r in reports) >= 5


def test_gate_clip_without_the_evaluation_data(engine: Any, scene_without_data: GateScene, tmp_path: Path) -> None:
    assert scene_without_data.source.startswith("scikit-image")
    result, _ = run_file(engine, scene_without_data, tmp_path, DecisionConfig())
    assert_every_person_checked(result, scene_without_data)


def test_position_only_tracking_misses_the_next_person(
    engine: Any, scene_without_data: GateScene, tmp_path: Path
) -> None:
    # The unit as it was: no change cues, no re-checks, no splits, any face decides.
    legacy, blind = DecisionConfig(**LEGACY_MATCHING), TrackerConfig(**LEGACY_TRACKER)
    result, _ = run_file(engine, scene_without_data, tmp_path, legacy, blind)
    assert result["enrolled_hit"] < 5 and result["unchecked"], result


def test_gate_over_rtsp(engine: Any, scene: GateScene, rtsp_server_factory: Any, tmp_path: Path) -> None:
    from edge.camera.capture import CameraReader
    from edge.camera.config import CaptureConfig

    srv = rtsp_server_factory({"gate": scene.clip})
    reader = CameraReader(CaptureConfig(id="gate", url=srv.url("gate")))
    loop_frames = round(scene.seconds * FPS)
    # Clip time of a frame from its sequence number (the server plays the clip from its start for each
    # client, 10 frames a second, looped): judged over the first loop.
    seq_of: dict[float, int] = {}

    class Recording:
        def latest(self, after_seq: int = -1, timeout: float = 1.0) -> Frame | None:
            frame = reader.latest(after_seq, timeout)
            if frame is not None:
                seq_of[frame.captured_at] = frame.seq
            return frame

    sink = MemorySink()
    pipe = Pipeline(
        unit_id="gate",
        cameras=[CameraSpec("gate", Recording(), 5.0)],
        engine=engine,
        matcher=_matcher(engine, scene, tmp_path),
        sinks=[sink],
        matching=DecisionConfig(),
    )
    embeds: list[float] = []
    real = pipe.process_batch

    def spy(batch: list[Any]) -> list[Any]:
        embeds.extend(seq_of[r.candidate.frame.captured_at] / FPS for r in batch)
        return real(batch)

    pipe.process_batch = spy  # type: ignore[method-assign]
    reader.start()
    pipe.start()
    try:
        wait_for(
            lambda: max(seq_of.values(), default=-1) >= loop_frames,
            timeout=scene.seconds + 60,
            what="the RTSP stream to play the clip through",
        )
    finally:
        pipe.stop()
        reader.stop()
    hits = [(seq_of[h.captured_at] / FPS, h.person_id) for h in sink.hits if seq_of[h.captured_at] < loop_frames]
    first_loop = [t for t in embeds if t * FPS < loop_frames]
    result = judge_gate(scene.appearances, hits, first_loop, slack=0.3)
    assert_every_person_checked(result, scene)


def test_edge_analyse_tells_each_tracks_story(engine: Any, scene: GateScene, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edge.cli import main

    root, store = _store(engine, scene, tmp_path)
    config = tmp_path / "unit.toml"
    config.write_text(
        f"""
[unit]
id = "unit-a"
site = "site-a"

[[cameras]]
id = "gate"
url = "{scene.clip}"
analysis_fps = 5

[watchlist]
root_key = "{root}"
store = "{store}"

[sinks.jsonl]
path = "{tmp_path / "hits.jsonl"}"
"""
    )
    out = CliRunner().invoke(main, ["analyse", "--config", str(config), str(scene.clip)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "5 hits" in lines[0] and "watchlist version 1" in lines[0], lines[0]
    tracks = [x for x in lines[2:] if not x.startswith("hit at")]
    enrolled = [a.person for a in scene.appearances if a.enrolled]
    for person in enrolled:
        assert any(person[:24] in x and "hit:" in x for x in tracks), (person, out.output)
    # Tracks of people not on the list say how near they came: best person, score, threshold, shortfall.
    assert any("no hit: best" in x and "short by" in x for x in tracks), out.output
    assert any("split from" in x for x in tracks), out.output
    assert [x.split(": ")[1].split(" score")[0] for x in lines if x.startswith("hit at")] == enrolled
    assert not (tmp_path / "hits.jsonl").exists(), "analyse prints hits, it never sends or stores them"

    missing = CliRunner().invoke(main, ["analyse", "--config", str(config), str(tmp_path / "nope.mp4")])
    assert missing.exit_code == 1 and "no such video file" in missing.output
