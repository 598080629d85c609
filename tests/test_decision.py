"""When a track's faces make a hit (edge.decision), without a face engine: the track and face
decisions, the second look's level and which faces get it, which rows one batch asks the matcher
for, and a whole batch from embedding to decisions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge.decision import (
    Decision,
    DecisionConfig,
    SecondLook,
    decide,
    decide_batch,
    match_faces_and_probes,
    needs_second_look,
    same_person_level,
    second_look_level,
    threshold_in_force,
)
from edge.faces import Candidate, EmbedReason, EmbedRequest, Evidence
from edge.frame import Frame
from matching.match import Match


def m(score: float, person: str = "p1", threshold: float = 0.9) -> Match:
    return Match(person_id=person, score=score, threshold=threshold, second_score=-1.0)


def test_track_decision_needs_the_mean_of_faces_or_one_strict_face() -> None:
    cfg = DecisionConfig(min_track_faces=2, single_face_strictness=0.5)  # strict level: 0.95 at threshold 0.9
    d = decide(cfg, m(0.92), m(0.92), faces=1)
    assert d.match is None and d.text.startswith("waiting"), d.text
    d = decide(cfg, m(0.96), m(0.96), faces=1)
    assert d.match is not None and d.match.score == 0.96 and "strict" in d.text
    d = decide(cfg, m(0.92), m(0.91), faces=2)
    assert d.match is not None and d.match.score == 0.91 and "mean of 2" in d.text
    d = decide(cfg, m(0.93), m(0.88), faces=3)
    assert d.match is None and "short by 0.0200" in d.text, d.text
    d = decide(cfg, None, None, faces=1)
    assert d.match is None and "nobody" in d.text


def test_face_decision_is_any_face_at_threshold() -> None:
    cfg = DecisionConfig(decision="face")
    assert decide(cfg, m(0.9), m(0.5), faces=3).match is not None
    assert decide(cfg, m(0.89), m(0.99), faces=3).match is None


def test_a_decision_names_the_best_person_the_track_came_near() -> None:
    cfg = DecisionConfig(min_track_faces=2)
    face, probe = m(0.92, "face"), m(0.88, "probe")  # strict level: 0.925
    assert decide(cfg, face, probe, faces=3).best is probe  # no hit: the track's mean speaks for it
    assert decide(cfg, face, probe, faces=1).best is face  # one face: the probe is that face
    hit = decide(cfg, m(0.99, "strict"), probe, faces=3)
    assert hit.match is hit.best and hit.best is not None and hit.best.person_id == "strict"


def test_thresholds_in_force_come_from_the_unit_else_the_list() -> None:
    class Listed:
        default_threshold = 0.97

    assert threshold_in_force(DecisionConfig(), Listed()) == 0.97
    assert threshold_in_force(DecisionConfig(threshold=0.98), Listed()) == 0.98
    assert threshold_in_force(DecisionConfig(), object()) is None
    assert same_person_level(DecisionConfig(), Listed()) == 0.97
    assert same_person_level(DecisionConfig(same_person=0.5), Listed()) == 0.5


def test_second_look_goes_to_faces_near_the_level_or_their_own_threshold() -> None:
    assert needs_second_look(m(0.95, threshold=0.99), 0.95) and not needs_second_look(m(0.94, threshold=0.99), 0.95)
    assert needs_second_look(m(0.91, threshold=0.9), 0.95)  # a person's own lower threshold counts
    assert not needs_second_look(None, 0.0)


class _Calibration:
    """Answers threshold_for_fpir with a level that shows its arguments; counts the calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[float, int, float]] = []
        self.fail = fail

    def threshold_for_fpir(self, fpir: float, persons: int, per_person: float) -> Any:
        from engines.calibration import CalibrationError

        self.calls.append((fpir, persons, per_person))
        if self.fail:
            raise CalibrationError("no such list size")

        class Point:
            threshold = 0.9 + persons / 1000

        return Point()


class _Index:
    def __init__(self, persons: int, templates: int) -> None:
        self.n_persons, self.n_templates = persons, templates


class _Matcher:
    """Matches each row to the person of its first coordinate's value (score = that value); counts rows."""

    def __init__(self, persons: int = 2, templates: int = 3, version: int = 1, threshold: float = 0.99) -> None:
        self.index = _Index(persons, templates)
        self.version = version
        self.default_threshold = threshold
        self.rows: list[int] = []

    def match(self, embeddings: np.ndarray, *, misses: bool = False) -> list[Match | None]:
        assert misses, "decisions need the near misses too"
        self.rows.append(len(embeddings))
        return [m(float(e[0]), f"p{float(e[0]):.2f}", self.default_threshold) for e in embeddings]


def test_second_look_level_follows_the_calibration_and_never_passes_the_threshold() -> None:
    cal = _Calibration()
    assert second_look_level(cal, 0.2, 0.99, persons=4, templates=2) == pytest.approx(0.904)
    assert cal.calls == [(0.2, 4, 1.0)]  # fewer templates than persons still counts one a person
    assert second_look_level(cal, 0.2, 0.95, persons=100, templates=300) == pytest.approx(0.95)
    assert cal.calls[-1] == (0.2, 100, 3.0)


def test_second_look_is_worked_out_once_per_list() -> None:
    cal = _Calibration()
    look = SecondLook(DecisionConfig(second_look_fpir=0.2), cal)
    matcher = _Matcher(persons=2)
    assert look.level(matcher) == pytest.approx(0.902)
    assert look.level(matcher) == pytest.approx(0.902) and len(cal.calls) == 1
    matcher.version = 2  # a new list of the same size: worked out again
    assert look.level(matcher) == pytest.approx(0.902) and len(cal.calls) == 2
    assert look.level(_Matcher(persons=0)) is None  # no list yet
    assert SecondLook(DecisionConfig(second_look_fpir=0.0), cal).level(matcher) is None
    assert SecondLook(DecisionConfig(), None).level(matcher) is None
    assert SecondLook(DecisionConfig(), _Calibration(fail=True)).level(matcher) is None


def _evidence(track_id: int, faces: int, value: float) -> Evidence:
    return Evidence(track_id, faces, np.array([value, 0.0], dtype=np.float32))


def test_one_call_matches_the_faces_looked_at_again_and_the_probes_of_several_faces() -> None:
    matcher = _Matcher()
    embeddings = np.array([[0.1, 0], [0.2, 0], [0.3, 0]], dtype=np.float32)
    evidence = [_evidence(1, 1, 0.5), _evidence(2, 3, 0.6), _evidence(3, 2, 0.7)]
    first = [m(0.11), m(0.21), None]
    faces, probes = match_faces_and_probes(matcher, embeddings, first, np.array([False, True, False]), evidence)
    assert matcher.rows == [3]  # face 2 again, and the probes of tracks 2 and 3
    assert [f.score if f else None for f in faces] == [0.11, pytest.approx(0.2), None]
    assert [p.score if p else None for p in probes] == [0.11, pytest.approx(0.6), pytest.approx(0.7)]
    # Without a first match every face is matched; a track of one face has its face for a probe.
    faces, probes = match_faces_and_probes(matcher, embeddings[:1], [], np.zeros(1, bool), evidence[:1])
    assert matcher.rows[-1] == 1 and probes == faces and faces[0] is not None


class _Engine:
    """Embeds each face as (its detection's value, 0); a second look adds 0.05 to it."""

    def __init__(self) -> None:
        self.masks: list[np.ndarray] = []

    def embed(self, items: list[tuple[np.ndarray, Any]], *, look_again: Any = None) -> np.ndarray:
        plain = np.array([[det, 0.0] for _, det in items], dtype=np.float32)
        if look_again is None:
            return plain
        mask = look_again(plain.copy())
        self.masks.append(mask)
        plain[mask, 0] += 0.05
        return plain


def _request(track_id: int, value: float) -> EmbedRequest:
    frame = Frame("cam", 1, 0.0, np.zeros((4, 4, 3), np.uint8))
    return EmbedRequest("cam", track_id, Candidate(frame, value, 0.9), EmbedReason.FIRST)


def test_a_batch_is_embedded_with_a_second_look_near_the_level_and_decided_per_track() -> None:
    engine, matcher = _Engine(), _Matcher(threshold=0.9)
    batch = [_request(1, 0.5), _request(2, 0.87), _request(3, 0.93)]
    seen: list[tuple[int, float]] = []

    def evidence(req: EmbedRequest, embedding: np.ndarray) -> Evidence:
        seen.append((req.track_id, round(float(embedding[0]), 2)))
        return Evidence(req.track_id, 1, embedding)

    cfg = DecisionConfig(single_face_strictness=0.5)  # strict: 0.95 at threshold 0.9
    decisions = decide_batch(cfg, engine, matcher, batch, 0.85, evidence)
    assert [list(mask) for mask in engine.masks] == [[False, True, True]]
    assert seen == [(1, 0.5), (2, 0.92), (3, 0.98)]  # evidence gets the embeddings after the second look
    assert matcher.rows == [3, 2]  # all plain faces, then the two looked at again
    assert [d.request.track_id for d in decisions] == [1, 2, 3]
    assert [d.looked_again for d in decisions] == [False, True, True]
    assert decisions[0].decision == Decision(None, decisions[0].face, decisions[0].decision.text)
    assert decisions[1].decision.match is None and decisions[1].decision.text.startswith("waiting")
    assert decisions[2].decision.match is not None and "strict" in decisions[2].decision.text
    assert "mean of 1" in decisions[2].describe()
    # No level: no second look, each face matched once.
    matcher.rows.clear()
    decide_batch(cfg, engine, matcher, batch, None, evidence)
    assert matcher.rows == [3] and len(engine.masks) == 1


def test_what_flows_is_checked_and_said_in_words() -> None:
    with pytest.raises(ValueError, match="probe of shape"):
        Evidence(1, 1, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="0 faces"):
        Evidence(1, 0, np.zeros(2, np.float32))
    req = EmbedRequest("cam", 1, _request(1, 0.5).candidate, EmbedReason.CHANGE, "gap 0.40 s")
    assert req.why == "re-check: gap 0.40 s" and req.reason.is_recheck
    assert not EmbedReason.BETTER.is_recheck and EmbedReason.PERIODIC.is_recheck
