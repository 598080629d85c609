"""One camera's analysis: detect, judge quality, track, and decide which faces to embed.

Its config table ``[analysis]`` sits beside it; the embed policy reads ``[matching]``
(edge.decision.DecisionConfig). The threads that call it are in edge.pipeline; this module holds
no threads of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from common.config import StrictModel
from edge.decision import Decision, DecisionConfig
from edge.faces import Candidate, EmbedReason, EmbedRequest, Evidence
from edge.frame import Frame
from edge.regions import GatingConfig, RegionPlanner, detect_in_regions, followed_boxes
from edge.stats import CameraStats
from edge.tracker import Observation, Track, Tracker, TrackerConfig

log = logging.getLogger(__name__)


class AnalysisConfig(StrictModel):
    """How the unit's analysis work is laid out (``[analysis]`` in the unit config)."""

    detect_workers: int = Field(1, ge=1, le=16, description="threads running face detection (all cameras share them)")
    embed_batch: int = Field(16, ge=1, le=256, description="most faces embedded in one batch")
    embed_wait_ms: float = Field(
        10.0, ge=0.0, le=1000.0, description="how long the embedder waits to fill a batch after the first face"
    )
    embed_queue: int = Field(64, ge=1, le=10000, description="faces waiting for the embedder at most; more are dropped")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    gating: GatingConfig = Field(default_factory=GatingConfig)


class FaceEngineLike(Protocol):
    """What the pipeline needs from engines.face_engine.FaceEngine."""

    model_id: str

    # `exclude`: boxes of faces already found in the image, not to be found again (MtcnnDetector.detect).
    def detect(self, image: np.ndarray, exclude: Sequence[Any] = ()) -> list[Any]: ...

    # Optional: `confirm(image, boxes)`, a detection or None per box (engines.face_engine.FaceEngine.confirm);
    # gating then looks for followed faces there before searching, and excludes those it finds.

    def assess(self, image: np.ndarray, detection: Any) -> Any: ...

    def embed(self, items: list[tuple[np.ndarray, Any]], *, look_again: Any = None) -> np.ndarray: ...


@dataclass
class TrackReport:
    """A track's story, for diagnostics (``edge analyse``) and the DEBUG log: when, how often embedded, the
    best person it came near and what was decided."""

    camera_id: str
    track_id: int
    first_seen: float
    last_seen: float
    split_from: int | None = None
    embeds: int = 0
    rechecks: int = 0
    not_embedded: dict[str, int] = field(default_factory=dict)  # why not, frames
    best_person: str | None = None
    best_score: float | None = None
    threshold: float | None = None
    decision: str = "not embedded"
    hit: bool = False


@dataclass
class _EmbedState:
    report: TrackReport
    embeds: int = 0  # embeddings of this track (its budget), re-checks not counted
    rechecks: int = 0
    last_embed_t: float = float("-inf")
    embedded_quality: float = float("-inf")
    pending: bool = False
    settled: bool = False
    change: str | None = None  # a sign of another person the tracker saw (edge.tracker.Track.change), not yet checked
    faces: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (quality, embedding), best first
    why_not: str | None = None


def appearance_cue(image: np.ndarray, box: tuple[float, float, float, float], size: int = 12) -> np.ndarray | None:
    """A cheap look of a face: its box, grey, shrunk to `size` x `size`, zero mean and unit length, so the
    dot product of two cues is their correlation. None for a box outside the image or a flat patch."""
    import cv2

    h, w = image.shape[:2]
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    crop = image[y1:y2, x1:x2]
    grey = crop.mean(axis=2, dtype=np.float32) if crop.ndim == 3 else crop.astype(np.float32)
    small = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 1e-3 else None


class CameraAnalyser:
    """Detection, quality, tracking and the embed policy for one camera. One detector thread at a time;
    the embedder thread reports back through `embedded`, `decided` and `not_embedded`.

    A track is one person: when a new face of a track does not look like its earlier faces (cosine
    below `same_person`), the track is split and the new one gets a fresh budget. A face is embedded
    when the track is new, when a clearly better face comes, while its mean has too few faces to
    decide, at once when the tracker flags a possible change of person (a gap, a size jump, another
    look), and at `recheck_interval_s` once it matched or used its budget -- so the next person at a
    gate is checked even when the tracker saw nothing change.

    Embeddings of a track are held in memory while the track lives, to average its faces; they are
    never stored or sent, and go when the track ends.
    """

    def __init__(
        self,
        camera_id: str,
        engine: FaceEngineLike,
        matching: DecisionConfig,
        tracker: TrackerConfig,
        *,
        gating: GatingConfig | None = None,
        keep_reports: bool = False,
        phase: float = 0.0,
    ) -> None:
        """`gating`: search only changed areas and followed faces between full-frame passes (edge.regions);
        None or not enabled: every frame whole. `phase`: where in the full-frame schedule this camera starts
        (edge.regions.RegionPlanner). `keep_reports`: keep the story of every finished track in
        `reports` (for diagnostics of a clip)."""
        self.camera_id = camera_id
        self.engine = engine
        self.matching = matching
        self.tracker = Tracker(tracker)
        self.stats = CameraStats()
        self._lock = threading.Lock()
        self._state: dict[int, _EmbedState] = {}
        self.keep_reports = keep_reports
        self.reports: list[TrackReport] = []
        # Regions of followed faces only may be searched shrunk down to the detector's smallest face
        # ([analysis.gating] max_shrink); an engine that does not say its smallest face gets them whole.
        min_face = int(getattr(engine, "min_face_size", 0) or 0)
        self.planner = RegionPlanner(gating, min_face, phase) if gating is not None and gating.enabled else None

    def analyse(self, frame: Frame) -> tuple[list[EmbedRequest], list[int]]:
        """Detect and track the faces of one frame; return the faces to embed and the ids of tracks that ended."""
        image = frame.image
        detections = self._detect(frame)
        observations = []
        for det in detections:
            q = self.engine.assess(image, det)
            score = float(q.score)
            usable = bool(q.ok) and score >= self.matching.min_quality
            box = tuple(float(v) for v in det.box)
            observations.append(
                Observation(
                    box=box,  # type: ignore[arg-type]
                    score=float(det.score),
                    quality=score,
                    usable=usable,
                    data=Candidate(frame, det, score, "" if usable else _why_unusable(q, score, self.matching)),
                    cue=appearance_cue(image, box),  # type: ignore[arg-type]
                )
            )
        t = frame.captured_at
        requests: list[EmbedRequest] = []
        with self._lock:
            update = self.tracker.update(observations, t)
            ended = [tr.id for tr in update.ended]
            for tr in update.ended:
                self._finish(tr.id, tr.last_seen)
            for tr in update.live:
                st = self._state.get(tr.id)
                if st is not None and tr.change is not None:
                    st.change = tr.change  # checked when the policy allows, maybe frames later
                if tr.last_seen != t:
                    continue
                if st is None:
                    st = self._state[tr.id] = _EmbedState(
                        TrackReport(self.camera_id, tr.id, tr.first_seen, t, split_from=tr.split_from)
                    )
                st.report.last_seen = t
                plan = self._plan(tr, st, t)
                if isinstance(plan, str):
                    self._note_not_embedded(tr.id, st, plan)
                    continue
                obs, reason, detail = plan
                st.pending = True
                st.why_not = None
                requests.append(EmbedRequest(self.camera_id, tr.id, obs.data, reason, detail))
            self.stats.count(faces=len(detections))
        return requests, ended

    def _detect(self, frame: Frame) -> list[Any]:
        """The faces of a frame: the followed faces the planner confirmed where they were heading, and those
        found searching the whole frame or only the regions it gives (the confirmed ones left out)."""
        if self.planner is None:
            detections = self.engine.detect(frame.image)
            self.stats.searched(True, 1.0)
            return detections
        with self._lock:  # the embedder thread may split a track meanwhile
            faces = followed_boxes(self.tracker.tracks, frame.captured_at, self.planner.config.track_missed_frames)
        plan = self.planner.plan(frame.image, frame.captured_at, faces, getattr(self.engine, "confirm", None))
        self.stats.searched(plan.full, plan.share, len(plan.confirmed))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "camera %s frame %d: %s, %d face(s) confirmed, %d region(s), %.0f%% of the frame",
                self.camera_id,
                frame.seq,
                "whole frame (" + plan.reason + ")" if plan.full else "regions",
                len(plan.confirmed),
                len(plan.regions),
                100 * plan.share,
            )
        return detect_in_regions(self.engine.detect, frame.image, plan)

    def _plan(self, tr: Track, st: _EmbedState, t: float) -> tuple[Observation, EmbedReason, str] | str:
        """Which face of `tr` to embed now, why and what the tracker saw (for a re-check after a change);
        or, as text, why none."""
        m = self.matching
        if st.pending:
            return "waiting for the embedder"
        latest = tr.last if tr.last.usable else None
        if latest is None and not tr.best:
            return _rejected(tr.last)
        if st.embeds == 0:
            st.change = None  # nothing embedded yet to compare with: the first face is checked anyway
            return tr.best[0], EmbedReason.FIRST, ""
        if st.change is not None:
            # A flag that keeps coming (flicker, a face the detector keeps losing) must not cost an
            # embedding per frame: the flag waits for reembed_interval_s and counts as a re-check.
            if st.rechecks >= m.max_rechecks_per_track:
                st.change = None
                return "re-check budget used"
            if t - st.last_embed_t < m.reembed_interval_s:
                return f"embedded lately (check after {st.change} waits)"
            if latest is None:
                return f"{_rejected(tr.last)} (after {st.change})"
            # The face now may be someone else's: check it, not the best face of whoever was here before.
            change, st.change = st.change, None
            return latest, EmbedReason.CHANGE, change
        if st.settled or st.embeds >= m.max_embeds_per_track:
            if st.rechecks >= m.max_rechecks_per_track:
                return "re-check budget used"
            if t - st.last_embed_t < m.recheck_interval_s:
                return "matched" if st.settled else "budget used"
            if latest is None:
                return _rejected(tr.last)
            return latest, EmbedReason.PERIODIC, ""
        if t - st.last_embed_t < m.reembed_interval_s:
            return "embedded lately"
        best = tr.best_observation
        if m.decision == "track" and len(st.faces) < m.min_track_faces:
            # The track's mean needs a few faces before it may decide: take the face now (the best one
            # may be the face already embedded).
            if latest is None:
                return _rejected(tr.last)
            return latest, EmbedReason.MORE_FACES, ""
        if best is not None and best.quality >= st.embedded_quality + m.reembed_min_gain:
            return best, EmbedReason.BETTER, ""
        return "no better face"

    def _note_not_embedded(self, track_id: int, st: _EmbedState, why: str) -> None:
        st.report.not_embedded[why] = st.report.not_embedded.get(why, 0) + 1
        if why != st.why_not:
            st.why_not = why
            log.debug("camera %s track %d: not embedded: %s", self.camera_id, track_id, why)

    def _finish(self, track_id: int, last_seen: float) -> None:
        st = self._state.pop(track_id, None)
        if st is None:
            return
        st.report.last_seen = last_seen
        st.report.embeds, st.report.rechecks = st.embeds, st.rechecks
        log.debug(
            "camera %s track %d ended: %.1f s, %d embeddings (+%d re-checks), best %s %s, %s",
            self.camera_id,
            track_id,
            st.report.last_seen - st.report.first_seen,
            st.embeds,
            st.rechecks,
            st.report.best_person or "-",
            "-" if st.report.best_score is None else f"{st.report.best_score:.4f}",
            st.report.decision,
        )
        if self.keep_reports:
            self.reports.append(st.report)

    def finish_all(self) -> list[TrackReport]:
        """End every live track's story (the clip is over); return all reports, oldest first."""
        with self._lock:
            for tr in self.tracker.tracks:
                self._finish(tr.id, tr.last_seen)
        return sorted(self.reports, key=lambda r: (r.first_seen, r.track_id))

    def embedded(self, req: EmbedRequest, embedding: np.ndarray, same_person: float | None) -> Evidence:
        """Record an embedding of a request's face; return the track's evidence. When the face does not look
        like the track's earlier ones (cosine to their mean below `same_person`), the track is split first and
        the evidence is the new track's."""
        m = self.matching
        emb = np.asarray(embedding, dtype=np.float32)
        t = req.candidate.frame.captured_at
        with self._lock:
            st = self._state.get(req.track_id)
            if st is None:  # the track ended while its face waited
                return Evidence(req.track_id, 1, emb)
            st.pending = False
            split_from = None
            track_id = req.track_id
            if st.faces and same_person is not None:
                similarity = float(_mean_unit([e for _, e in st.faces]) @ emb)
                if similarity < same_person:
                    new = self.tracker.split(req.track_id, t)
                    if new is not None:
                        log.debug(
                            "camera %s track %d split at %.2f (%s): the face is someone else (%.4f < %.4f); "
                            "now track %d",
                            self.camera_id,
                            req.track_id,
                            t,
                            req.why,
                            similarity,
                            same_person,
                            new.id,
                        )
                        split_from, track_id = req.track_id, new.id
                        st = self._state[new.id] = _EmbedState(
                            TrackReport(self.camera_id, new.id, new.first_seen, new.last_seen, split_from=split_from)
                        )
            if split_from is not None:
                self.stats.count(splits=1)
            if req.reason.is_recheck and st.embeds > 0 and split_from is None:
                st.rechecks += 1
                self.stats.count(rechecks=1)
            else:
                st.embeds += 1
            st.last_embed_t = t
            st.embedded_quality = max(st.embedded_quality, req.candidate.quality)
            st.faces.append((req.candidate.quality, emb))
            st.faces.sort(key=lambda f: f[0], reverse=True)
            del st.faces[m.aggregate_faces :]
            st.report.embeds, st.report.rechecks = st.embeds, st.rechecks
            probe = _mean_unit([e for _, e in st.faces])
            return Evidence(track_id, len(st.faces), probe, split_from)

    def decided(self, track_id: int, decision: Decision) -> None:
        """Record the decision on a track's latest evidence in its state and its story."""
        hit, best = decision.match is not None, decision.best
        with self._lock:
            st = self._state.get(track_id)
            if st is None:
                return
            st.settled = st.settled or hit
            rep = st.report
            if rep.hit:
                return  # the track's story is its hit
            if best is not None and (hit or rep.best_score is None or best.score > rep.best_score):
                rep.best_person, rep.best_score, rep.threshold = best.person_id, float(best.score), best.threshold
            rep.decision, rep.hit = decision.text, hit

    def not_embedded(self, req: EmbedRequest, why: str = "embed queue full") -> None:
        """A request was dropped before embedding; the track may ask again."""
        with self._lock:
            st = self._state.get(req.track_id)
            if st is not None:
                st.pending = False
                self._note_not_embedded(req.track_id, st, why)


def _why_unusable(quality: Any, score: float, matching: DecisionConfig) -> str:
    # The gate's failures name the measured value and the limit; an engine that gives only reason codes
    # is shown those.
    failures = tuple(getattr(quality, "failures", ()) or ())
    if failures:
        return "quality: " + "; ".join(failures)
    reasons = tuple(getattr(quality, "reasons", ()) or ())
    if reasons:
        return "quality: " + ", ".join(reasons)
    return f"quality score {score:.2f} below min_quality {matching.min_quality:g}"


def _rejected(obs: Observation) -> str:
    return getattr(obs.data, "rejected", "") or "quality"


def _mean_unit(vectors: list[np.ndarray]) -> np.ndarray:
    v = np.mean(np.stack(vectors), axis=0) if len(vectors) > 1 else np.asarray(vectors[0], dtype=np.float32)
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > 0 else v.astype(np.float32)
