"""The matcher's near misses and the per-track embedding policy (edge.analysis.CameraAnalyser)
without a face engine: why a track's face is embedded or not. The decisions on embedded faces are
tests/test_decision.py's."""

from __future__ import annotations

import numpy as np
import pytest

from edge.analysis import CameraAnalyser, appearance_cue
from edge.decision import Decision, DecisionConfig
from edge.faces import EmbedReason
from edge.tracker import TrackerConfig
from matching.match import Match
from matching.matcher import Matcher, TemplateIndex


def m(score: float, person: str = "p1", threshold: float = 0.9) -> Match:
    return Match(person_id=person, score=score, threshold=threshold, second_score=-1.0)


def test_matcher_gives_near_misses_only_when_asked() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    matcher = Matcher(TemplateIndex.build(["a", "b", "c"], emb, version=1, model_id="m", default_threshold=0.99))
    probe = emb[0] * 0.8 + emb[1] * 0.2
    probe = (probe / np.linalg.norm(probe))[None]
    assert matcher.match(probe) == [None]
    (near,) = matcher.match(probe, misses=True)
    assert near is not None and near.person_id == "a" and not near.is_hit and near.score < 0.99
    assert near.second_score == pytest.approx(float(probe[0] @ emb[1]), abs=1e-3)
    assert matcher.default_threshold == pytest.approx(0.99)
    assert Matcher(threshold=0.5).default_threshold == 0.5 and Matcher().default_threshold is None


def test_appearance_cue_tells_two_faces_apart_and_ignores_brightness() -> None:
    from skimage import data

    img = data.astronaut()
    box = (180.0, 20.0, 300.0, 180.0)
    a = appearance_cue(img, box)
    brighter = appearance_cue(np.clip(img.astype(np.int16) + 30, 0, 255).astype(np.uint8), box)
    elsewhere = appearance_cue(img, (300.0, 300.0, 420.0, 460.0))
    assert a is not None and brighter is not None and elsewhere is not None
    assert float(a @ brighter) > 0.95 and float(a @ elsewhere) < 0.6
    assert appearance_cue(img, (600.0, 600.0, 700.0, 700.0)) is None  # outside the image


class _Det:
    def __init__(self, box: tuple[float, float, float, float]) -> None:
        self.box, self.score = box, 0.99


class _Quality:
    def __init__(self, ok: bool) -> None:
        self.ok, self.score, self.reasons = ok, 0.8 if ok else 0.1, () if ok else ("blurred",)


class _Engine:
    """Detection and quality answers scripted per frame (the policy under test needs no model)."""

    model_id = "scripted"

    def __init__(self) -> None:
        self.ok = True
        self.face = True

    def detect(self, image: np.ndarray, exclude: object = ()) -> list[_Det]:
        return [_Det((100.0, 100.0, 200.0, 200.0))] if self.face else []

    def assess(self, image: np.ndarray, det: _Det) -> _Quality:
        return _Quality(self.ok)

    def embed(self, items: list) -> np.ndarray:
        raise AssertionError("not used")


def _frame(t: float) -> object:
    from edge.frame import Frame

    return Frame("cam", int(t * 10), t, np.full((300, 300, 3), 128, np.uint8))


def test_policy_splits_on_another_person_and_rechecks_settled_tracks(caplog: pytest.LogCaptureFixture) -> None:
    eng = _Engine()
    an = CameraAnalyser(
        "cam", eng, DecisionConfig(recheck_interval_s=1.0, max_rechecks_per_track=1), TrackerConfig(), keep_reports=True
    )
    a = np.zeros(8, np.float32)
    a[0] = 1.0
    b = np.zeros(8, np.float32)
    b[1] = 1.0
    (req,), _ = an.analyse(_frame(0.0))
    assert req.reason is EmbedReason.FIRST and req.why == "first face"
    ev = an.embedded(req, a, same_person=0.9)
    assert ev.faces == 1 and ev.split_from is None
    an.decided(ev.track_id, Decision(m(0.95, "p1"), m(0.95, "p1"), "hit: one face"))
    assert an.analyse(_frame(0.2))[0] == []  # matched: no embedding until the re-check is due
    (req,), _ = an.analyse(_frame(1.2))
    assert req.reason is EmbedReason.PERIODIC and req.why == "re-check: periodic"
    ev2 = an.embedded(req, b, same_person=0.9)
    assert ev2.split_from == ev.track_id and ev2.track_id != ev.track_id and ev2.faces == 1
    _, ended = an.analyse(_frame(1.4))
    assert ended == [ev.track_id]
    eng.ok = False
    with caplog.at_level("DEBUG", logger="edge.analysis"):
        for t in (1.6, 1.8):
            assert an.analyse(_frame(t))[0] == []
    assert any("not embedded: quality: blurred" in r.getMessage() for r in caplog.records)
    reports = an.finish_all()
    assert [r.split_from for r in reports] == [None, ev.track_id]
    assert reports[0].hit and reports[0].best_person == "p1" and reports[0].rechecks == 0
    assert reports[1].not_embedded == {"embedded lately": 2, "quality: blurred": 1}


def test_a_gap_flags_a_check_that_waits_for_the_reembed_interval() -> None:
    eng = _Engine()
    an = CameraAnalyser("cam", eng, DecisionConfig(reembed_interval_s=0.5), TrackerConfig(change_gap_s=0.3))
    (req,), _ = an.analyse(_frame(0.0))
    an.decided(
        an.embedded(req, np.eye(8, dtype=np.float32)[0], same_person=0.9).track_id, Decision(m(0.95), m(0.95), "hit")
    )
    eng.face = False
    assert an.analyse(_frame(0.2))[0] == []
    eng.face = True
    assert an.analyse(_frame(0.4))[0] == []  # the face is back after a gap, but an embedding was 0.4 s ago
    (req,), _ = an.analyse(_frame(0.6))
    assert req.reason is EmbedReason.CHANGE and req.why == "re-check: gap 0.40 s", req.why
    ev = an.embedded(req, np.eye(8, dtype=np.float32)[0], same_person=0.9)
    assert ev.split_from is None and ev.faces == 2  # the same person: no split, one more face for the mean
    assert an.stats.rechecks == 1 and an.stats.splits == 0
