"""One camera's analysis: detect, judge quality, track, and decide which faces to embed.

Its config tables (``[matching]``, ``[analysis]``) sit beside it. The threads that call it are in
edge.pipeline; this module holds no threads of its own.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from common.config import StrictModel
from edge.frame import Frame
from edge.hits import CropConfig
from edge.tracker import Observation, Tracker, TrackerConfig


class MatchingConfig(StrictModel):
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
    crop: CropConfig = Field(default_factory=CropConfig)


class AnalysisConfig(StrictModel):
    """How the unit's analysis work is laid out (``[analysis]`` in the unit config)."""

    detect_workers: int = Field(1, ge=1, le=16, description="threads running face detection (all cameras share them)")
    embed_batch: int = Field(16, ge=1, le=256, description="most faces embedded in one batch")
    embed_wait_ms: float = Field(
        10.0, ge=0.0, le=1000.0, description="how long the embedder waits to fill a batch after the first face"
    )
    embed_queue: int = Field(64, ge=1, le=10000, description="faces waiting for the embedder at most; more are dropped")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)


class FaceEngineLike(Protocol):
    """What the pipeline needs from engines.face_engine.FaceEngine."""

    model_id: str

    def detect(self, image: np.ndarray) -> list[Any]: ...

    def assess(self, image: np.ndarray, detection: Any) -> Any: ...

    def embed(self, items: list[tuple[np.ndarray, Any]]) -> np.ndarray: ...


@dataclass(frozen=True)
class Candidate:
    """A detected face kept by a track: the frame it is in and the engine's detection."""

    frame: Frame
    detection: Any
    quality: float


@dataclass(frozen=True)
class EmbedRequest:
    """A track's face sent to the embedder."""

    camera_id: str
    track_id: int
    candidate: Candidate


@dataclass
class _EmbedState:
    embeds: int = 0
    last_embed_t: float = float("-inf")
    embedded_quality: float = float("-inf")
    pending: bool = False
    settled: bool = False


class _Window:
    """Counts of events over a sliding time window, for rates (frames/s and such)."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._times: deque[float] = deque()
        # Added to by the detector thread, read by the status/heartbeat thread.
        self._lock = threading.Lock()

    def add(self, t: float) -> None:
        with self._lock:
            self._times.append(t)
            self._trim(t)

    def rate(self, now: float) -> float:
        with self._lock:
            self._trim(now)
            return len(self._times) / self.seconds

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.seconds:
            self._times.popleft()


@dataclass
class CameraStats:
    """Running figures of one camera's analysis."""

    frames_sampled: int = 0
    frames_analysed: int = 0
    frames_skipped: int = 0  # sampled, then replaced by a newer frame before a detector was free
    faces: int = 0
    embedded: int = 0
    embeds_dropped: int = 0  # embed queue full
    matched: int = 0
    hits: int = 0
    errors: int = 0
    last_error: str | None = None
    lag_s: float = 0.0  # capture to end of detection, last analysed frame
    lag_max_s: float = 0.0
    hit_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    analysed_window: _Window = field(default_factory=_Window)

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready copy of the figures."""
        lat = np.array(list(self.hit_latency_s), dtype=np.float64)
        return {
            "frames_sampled": self.frames_sampled,
            "frames_analysed": self.frames_analysed,
            "frames_skipped": self.frames_skipped,
            "analysed_fps": round(self.analysed_window.rate(now), 2),
            "faces": self.faces,
            "embedded": self.embedded,
            "embeds_dropped": self.embeds_dropped,
            "matched": self.matched,
            "hits": self.hits,
            "errors": self.errors,
            "last_error": self.last_error,
            "lag_s": round(self.lag_s, 3),
            "lag_max_s": round(self.lag_max_s, 3),
            "hit_latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
            "hit_latency_p99_s": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
        }


class CameraAnalyser:
    """Detection, quality, tracking and the embed policy for one camera. One detector thread at a time."""

    def __init__(
        self, camera_id: str, engine: FaceEngineLike, matching: MatchingConfig, tracker: TrackerConfig
    ) -> None:
        self.camera_id = camera_id
        self.engine = engine
        self.matching = matching
        self.tracker = Tracker(tracker)
        self.stats = CameraStats()
        self._lock = threading.Lock()
        self._state: dict[int, _EmbedState] = {}

    def analyse(self, frame: Frame) -> tuple[list[EmbedRequest], list[int]]:
        """Detect and track the faces of one frame; return the faces to embed and the ids of tracks that ended."""
        image = frame.image
        detections = self.engine.detect(image)
        observations = []
        for det in detections:
            q = self.engine.assess(image, det)
            score = float(q.score)
            usable = bool(q.ok) and score >= self.matching.min_quality
            observations.append(
                Observation(
                    box=tuple(float(v) for v in det.box),  # type: ignore[arg-type]
                    score=float(det.score),
                    quality=score,
                    usable=usable,
                    data=Candidate(frame, det, score),
                )
            )
        tracks = self.tracker.update(observations, frame.captured_at)
        requests: list[EmbedRequest] = []
        with self._lock:
            ended = [tr.id for tr in self.tracker.ended]
            for tid in ended:
                self._state.pop(tid, None)
            for tr in tracks:
                best = tr.best_observation
                if best is None or tr.last_seen != frame.captured_at:
                    continue
                st = self._state.setdefault(tr.id, _EmbedState())
                if self._wants_embed(st, best.quality, frame.captured_at):
                    st.pending = True
                    requests.append(EmbedRequest(self.camera_id, tr.id, best.data))
            self.stats.faces += len(detections)
        return requests, ended

    def _wants_embed(self, st: _EmbedState, quality: float, t: float) -> bool:
        m = self.matching
        if st.settled or st.pending or st.embeds >= m.max_embeds_per_track:
            return False
        if st.embeds == 0:
            return True
        return quality >= st.embedded_quality + m.reembed_min_gain and t - st.last_embed_t >= m.reembed_interval_s

    def embedded(self, req: EmbedRequest, matched: bool) -> None:
        """Record that a request was embedded (and whether it matched someone, which ends embedding of the track)."""
        with self._lock:
            st = self._state.get(req.track_id)
            if st is None:
                return
            st.pending = False
            st.embeds += 1
            st.last_embed_t = req.candidate.frame.captured_at
            st.embedded_quality = req.candidate.quality
            st.settled = st.settled or matched

    def not_embedded(self, req: EmbedRequest) -> None:
        """A request was dropped before embedding; the track may ask again."""
        with self._lock:
            st = self._state.get(req.track_id)
            if st is not None:
                st.pending = False
