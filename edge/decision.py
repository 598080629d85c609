"""When a track's faces make a hit: the ``[matching]`` table (DecisionConfig), the second look near
the threshold, and the decision on every face of one embed batch.

One embed batch, all of it here (`decide_batch`, called by the embedder thread in edge.pipeline):

1. the level from which a face gets a second look, for the list in force (`SecondLook`: the model's
   calibration at the list's size, never above the threshold);
2. the engine embeds the batch; with a level, the plain embeddings are matched first, and the faces
   that come near it (`needs_second_look`) are embedded again with their mirror image;
3. each face joins its track's evidence (the caller's `evidence`: edge.analysis.CameraAnalyser.embedded
   averages the track's best faces into its probe, or splits the track when the face is someone else's);
4. the faces looked at again and the probes of tracks holding more than one face are matched
   (`match_faces_and_probes`), and `decide` weighs each track's face and probe.

All but `decide_batch` and `SecondLook` are pure functions of their arguments. The threads that call
them are in edge.pipeline; what becomes of a hit (once per track, cooldown) is edge.hits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from common.config import StrictModel
from edge.faces import EmbedRequest, Evidence
from edge.hits import CropConfig
from matching.match import Match

log = logging.getLogger(__name__)


class DecisionConfig(StrictModel):
    """Which faces are embedded and when a match becomes a hit (``[matching]`` in the unit config)."""

    threshold: float | None = Field(
        None,
        gt=-1.0,
        lt=1.0,
        description="cosine similarity a face needs to match a person; per-person overrides come from the "
        "watchlist; unset: the watchlist's default",
    )
    cooldown_s: float = Field(60.0, ge=0.0, description="no second hit for a person on a camera within this time")
    min_quality: float = Field(
        0.0, ge=0.0, description="least face quality score (besides passing the engine's quality checks) to embed"
    )
    max_embeds_per_track: int = Field(3, ge=1, le=100, description="embeddings per track at most")
    reembed_min_gain: float = Field(
        0.05, ge=0.0, description="quality a later face must gain over the last embedded one to be embedded too"
    )
    reembed_interval_s: float = Field(0.5, ge=0.0, description="least time between two embeddings of one track")
    same_person: float | None = Field(
        None,
        gt=-1.0,
        lt=1.0,
        description="cosine below which a track's new face is taken for another person and the track is split; "
        "unset: the match threshold in force (the model's level for 'same person')",
    )
    recheck_interval_s: float = Field(
        2.0, gt=0.0, description="a track that matched or used its budget is embedded again this often while it stays"
    )
    max_rechecks_per_track: int = Field(
        30, ge=0, le=10000, description="such re-check embeddings per track at most (0: never re-check)"
    )
    decision: Literal["track", "face"] = Field(
        "track",
        description="track: a hit needs the mean of the track's best faces above threshold, or one face above a "
        "stricter level; face: any one face above threshold (the behaviour before tracks had evidence)",
    )
    min_track_faces: int = Field(
        2, ge=1, le=100, description="faces a track's mean needs before it may decide alone (decision = track)"
    )
    single_face_strictness: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="one face alone decides when its score reaches threshold + this share of (1 - threshold)",
    )
    aggregate_faces: int = Field(4, ge=1, le=100, description="best-quality faces of a track averaged into its probe")
    second_look_fpir: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="a face whose best score comes within the level that would alert this share of strangers' "
        "faces (at this list's size, from the model's calibration) is embedded again with its mirror image and "
        "judged on both; 0: never",
    )
    crop: CropConfig = Field(default_factory=CropConfig)

    def strict_threshold(self, threshold: float) -> float:
        """The score one face needs to decide alone, for a person whose threshold is `threshold`."""
        return threshold + self.single_face_strictness * (1.0 - threshold)


class MatcherLike(Protocol):
    """What the decisions need from matching.matcher.Matcher."""

    @property
    def version(self) -> int: ...

    def match(self, embeddings: np.ndarray, *, misses: bool = False) -> list[Match | None]: ...


class EmbedderLike(Protocol):
    """What the decisions need from engines.face_engine.FaceEngine: `look_again(plain embeddings)` returns
    the mask of faces to embed again with their mirror image."""

    def embed(self, items: list[tuple[np.ndarray, Any]], *, look_again: Any = None) -> np.ndarray: ...


@dataclass(frozen=True)
class Decision:
    """What a track's evidence makes: `match`, the hit to report (None: no hit); `best`, the best person
    the track came near (the hit, else the match of its probe or face, hit or not); `text`, why, in words."""

    match: Match | None
    best: Match | None
    text: str


def decide(config: DecisionConfig, face: Match | None, probe: Match | None, faces: int) -> Decision:
    """Whether a track's evidence makes a hit.

    `face` is the best person for the newest face, `probe` for the mean of the track's best `faces`
    faces (both given even below threshold). With ``decision = "face"`` any face at its person's
    threshold hits. With ``"track"`` (the default) a hit needs the track's mean at threshold once it
    holds `min_track_faces` faces, or one face at the stricter level (`strict_threshold`): one
    face of a stranger reaches a threshold by chance far more often than the mean of several.
    """
    nearest = probe if faces > 1 else face
    if config.decision == "face" or faces < 1:
        if face is not None and face.is_hit:
            return Decision(face, face, f"hit: face {face.score:.4f} >= {face.threshold:.4f}")
        return Decision(None, nearest, _miss(face))
    if probe is not None and probe.is_hit and faces >= config.min_track_faces:
        return Decision(probe, probe, f"hit: mean of {faces} faces {probe.score:.4f} >= {probe.threshold:.4f}")
    if face is not None and face.is_hit:
        strict = config.strict_threshold(face.threshold)
        if face.score >= strict:
            return Decision(face, face, f"hit: one face {face.score:.4f} >= strict {strict:.4f}")
        if faces < config.min_track_faces:
            needs = config.min_track_faces
            return Decision(None, nearest, f"waiting: one face {face.score:.4f} >= {face.threshold:.4f}, needs {needs}")
    return Decision(None, nearest, _miss(nearest))


def _miss(m: Match | None) -> str:
    if m is None:
        return "no hit: nobody on the list"
    return f"no hit: best {m.person_id} {m.score:.4f} < {m.threshold:.4f} (short by {m.threshold - m.score:.4f})"


def threshold_in_force(config: DecisionConfig, matcher: Any) -> float | None:
    """The match threshold for a person without one of their own: the unit's, else the list's."""
    if config.threshold is not None:
        return config.threshold
    return getattr(matcher, "default_threshold", None)


def same_person_level(config: DecisionConfig, matcher: Any) -> float | None:
    """The cosine below which a track's new face is taken for someone else (None: never)."""
    # The match threshold is the model's calibrated level for "the same person"; faces of one
    # track (one person, seconds apart, same camera) score well above it, so a face below it is
    # taken for someone else. A wrong split costs one embedding; hits stay one per person and cooldown.
    if config.same_person is not None:
        return config.same_person
    return threshold_in_force(config, matcher)


def second_look_level(calibration: Any, fpir: float, threshold: float, persons: int, templates: int) -> float | None:
    """The score that would alert `fpir` of strangers' faces on a list of `persons` persons holding
    `templates` templates, by the model's `calibration`, and never above `threshold`. Raises
    engines.calibration.CalibrationError when the calibration cannot place it."""
    level = calibration.threshold_for_fpir(fpir, persons, max(1.0, templates / persons)).threshold
    return None if level is None else min(float(level), float(threshold))


def needs_second_look(match: Match | None, level: float) -> bool:
    """Whether a face whose plain embedding matched `match` is embedded again with its mirror image: its
    best score reaches `level`, or its person's own threshold when that is lower."""
    return match is not None and match.score >= min(level, match.threshold)


class SecondLook:
    """The level from which a face is embedded again with its mirror image, worked out (and logged) once
    for each list the matcher holds."""

    def __init__(self, config: DecisionConfig, calibration: Any) -> None:
        """`calibration`: the model's engines.calibration.Calibration; None: no second look."""
        self.config = config
        self.calibration = calibration
        self._level: tuple[tuple[int, int, int, float], float | None] | None = None

    def level(self, matcher: Any) -> float | None:
        """The level for the list `matcher` holds: the threshold that would alert ``second_look_fpir`` of
        strangers' faces at this list's size (never above the match threshold). None: no second look
        (turned off, no calibration, no list)."""
        fpir = self.config.second_look_fpir
        threshold = threshold_in_force(self.config, matcher)
        index = getattr(matcher, "index", None)
        persons = int(getattr(index, "n_persons", 0) or 0)
        if not fpir or self.calibration is None or threshold is None or persons < 1:
            return None
        templates = int(getattr(index, "n_templates", 0) or 0)
        # What the level follows, all of it (an index's id() could be reused by the next list's).
        key = (int(getattr(matcher, "version", 0)), persons, templates, float(threshold))
        if self._level is None or self._level[0] != key:
            from engines.calibration import CalibrationError

            try:
                level = second_look_level(self.calibration, fpir, threshold, persons, templates)
            except CalibrationError as exc:
                log.warning("no second look: %s", exc)
                level = None
            log.info(
                "second look from score %s (%s of strangers' faces at %d persons; threshold %.4f)",
                "-" if level is None else f"{level:.4f}",
                f"{fpir:g}",
                persons,
                threshold,
            )
            self._level = (key, level)
        return self._level[1]


def match_faces_and_probes(
    matcher: MatcherLike,
    embeddings: np.ndarray,
    first: Sequence[Match | None],
    looked_again: np.ndarray,
    evidence: Sequence[Evidence],
) -> tuple[list[Match | None], list[Match | None]]:
    """The best person for each face and for its track's probe, near misses included, in one call to the
    matcher. `first`: the matches of the plain embeddings (empty when none were made); only the faces
    looked at again are matched anew, and a probe only when its track holds more than the face just
    embedded (else the probe is the face)."""
    n = len(evidence)
    redo = [i for i in range(n) if not first or looked_again[i]]
    means = [i for i, ev in enumerate(evidence) if ev.faces > 1]
    queries = np.asarray(embeddings, dtype=np.float32)[redo]
    if means:
        queries = np.vstack([queries, np.stack([evidence[i].probe for i in means])])
    found = matcher.match(queries, misses=True) if len(queries) else []
    faces: list[Match | None] = list(first) if first else [None] * n
    for k, i in enumerate(redo):
        faces[i] = found[k]
    probes = list(faces)
    for k, i in enumerate(means):
        probes[i] = found[len(redo) + k]
    return faces, probes


@dataclass(frozen=True)
class FaceDecision:
    """The decision on one face of an embed batch, and what it rests on."""

    request: EmbedRequest
    track_id: int  # the track the face belongs to now (a new one when it was split off)
    faces: int  # faces in the track's probe
    looked_again: bool  # embedded again with its mirror image
    face: Match | None
    probe: Match | None
    decision: Decision

    def describe(self) -> str:
        """One line for the DEBUG log: the face's and the probe's best person, and the decision."""
        return f"face {_describe(self.face)}; mean of {self.faces} {_describe(self.probe)}; {self.decision.text}"


def _describe(m: Match | None) -> str:
    if m is None:
        return "-"
    return f"{m.person_id} {m.score:.4f}/{m.threshold:.4f} margin {m.margin:.4f}"


def decide_batch(
    config: DecisionConfig,
    engine: EmbedderLike,
    matcher: MatcherLike,
    batch: Sequence[EmbedRequest],
    level: float | None,
    evidence: Callable[[EmbedRequest, np.ndarray], Evidence],
) -> list[FaceDecision]:
    """Embed a batch of faces (any cameras), with a second look from `level` (None: none); add each face to
    its track's evidence (`evidence(request, embedding)`); match faces and probes; decide each track. The
    decisions come in the batch's order. The embeddings never leave this function (only the tracks'
    evidence, held while they live, keeps them)."""
    items = [(r.candidate.frame.image, r.candidate.detection) for r in batch]
    # With a second look the plain embeddings are matched to choose the faces to look at again;
    # the others keep that match, and only the faces looked at again are matched anew.
    first: list[Match | None] = []
    again = np.zeros(len(batch), dtype=bool)
    if level is None:
        embeddings = engine.embed(items)
    else:

        def near(plain: np.ndarray) -> np.ndarray:
            first.extend(matcher.match(plain, misses=True))
            again[:] = [needs_second_look(m, level) for m in first]
            return again.copy()

        embeddings = engine.embed(items, look_again=near)
    shown = [evidence(r, e) for r, e in zip(batch, embeddings)]
    faces, probes = match_faces_and_probes(matcher, embeddings, first, again, shown)
    return [
        FaceDecision(r, ev.track_id, ev.faces, bool(looked), face, probe, decide(config, face, probe, ev.faces))
        for r, ev, looked, face, probe in zip(batch, shown, again, faces, probes)
    ]
