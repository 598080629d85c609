"""Follow faces from frame to frame on one camera, so each person is embedded a few times, not every frame.

A small IoU tracker with a centroid fallback and a constant-velocity guess, enough for faces
sampled a few times a second: detections are matched greedily to the predicted box of each
live track by overlap first, then, for what is left, by centre distance measured in face
widths. A track that has not been seen for ``max_age_s`` ends. Each track keeps its few
best-quality observations (with whatever payload the caller attached, e.g. the frame and
detection) so the caller can embed the best one.

Position alone cannot tell one person from the next at a gate, where people step one after
another into the same spot. So the tracker also flags cheap signs that the face it continues may
belong to someone else -- a gap with no face, a jump in face size, a change in a small grey patch
of the face (the observation's ``cue``) -- in ``Track.change``, for the update that saw them. It
never decides on them alone: the caller embeds the face and, if it does not look like the track's
earlier faces, calls ``split`` to end the track and start a new one in its place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from common.config import StrictModel

Box = tuple[float, float, float, float]


class TrackerConfig(StrictModel):
    """How faces are followed on each camera (``[analysis.tracker]`` in the unit config)."""

    iou_threshold: float = Field(0.2, gt=0.0, le=1.0, description="least overlap for a detection to continue a track")
    max_center_distance: float = Field(
        1.0, gt=0.0, description="if overlap fails: largest centre distance, in face widths, to continue a track"
    )
    max_size_ratio: float = Field(2.0, ge=1.0, description="largest change of face size between two sightings")
    max_age_s: float = Field(1.5, gt=0.0, description="a track unseen this long ends")
    keep_best: int = Field(2, ge=1, le=16, description="best-quality observations kept per track")
    change_gap_s: float = Field(
        0.3,
        gt=0.0,
        description="a face after at least one analysed frame without it and this long may be someone else",
    )
    change_size_ratio: float = Field(
        1.25, ge=1.0, description="a face this much larger or smaller than the last may be someone else"
    )
    change_min_cue: float = Field(
        0.7,
        ge=-1.0,
        le=1.0,
        description="a face whose grey patch correlates less than this with the track's last one may be someone else",
    )


@dataclass(frozen=True)
class Observation:
    """One detection handed to the tracker. `usable` says the face passed the quality gate."""

    box: Box
    score: float
    quality: float = 0.0
    usable: bool = True
    data: Any = None
    cue: np.ndarray | None = None  # a cheap appearance descriptor, unit length (see edge.analysis.appearance_cue)


@dataclass
class Track:
    """A face followed over time on one camera."""

    id: int
    box: Box
    first_seen: float
    last_seen: float
    last: Observation
    observations: int = 1
    best: list[Observation] = field(default_factory=list)
    velocity: tuple[float, float] = (0.0, 0.0)  # centre motion, pixels per second
    missed: int = 0  # analysed frames in a row without this track's face
    change: str | None = None  # why this update's face may be someone else (gap, size, look); None: no sign, or unseen
    split_from: int | None = None  # the track this one was split from (same place, another person)

    @property
    def best_observation(self) -> Observation | None:
        """The highest-quality usable observation so far, or None if no sighting passed the quality gate."""
        return self.best[0] if self.best else None

    def predicted_box(self, t: float) -> Box:
        """Where the track's box should be at time `t`, moving at its last velocity."""
        dt = max(0.0, min(t - self.last_seen, 1.0))
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        x1, y1, x2, y2 = self.box
        return (x1 + dx, y1 + dy, x2 + dx, y2 + dy)


@dataclass(frozen=True)
class Update:
    """What one frame did to a camera's tracks."""

    live: list[Track]  # the live tracks, oldest first
    ended: list[Track]  # the tracks that ended in this update, or were split since the one before


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _center(b: Box) -> tuple[float, float]:
    return ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)


def _width(b: Box) -> float:
    return math.sqrt(max((b[2] - b[0]) * (b[3] - b[1]), 1e-6))


class Tracker:
    """Tracks of one camera. Not thread-safe: one camera, one caller."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._tracks: dict[int, Track] = {}
        self._next_id = 1
        self._last_t: float | None = None
        self._split_ended: list[Track] = []

    @property
    def tracks(self) -> list[Track]:
        """The live tracks, oldest first."""
        return list(self._tracks.values())

    @property
    def started(self) -> int:
        """How many tracks this tracker has started (splits included)."""
        return self._next_id - 1

    def update(self, detections: Sequence[Observation], t: float) -> Update:
        """Match this frame's detections (taken at time `t`, seconds) to tracks; return the live tracks and
        those that ended. A detection that continues no track starts a new one.
        """
        cfg = self.config
        if self._last_t is not None and t < self._last_t:
            # Frames arrive in order per camera; a clock step backwards must not age out every track.
            t = self._last_t
        self._last_t = t
        ended = self._split_ended + [tr for tr in self._tracks.values() if t - tr.last_seen > cfg.max_age_s]
        self._split_ended = []
        for tr in ended:
            self._tracks.pop(tr.id, None)

        tracks = list(self._tracks.values())
        predicted = {tr.id: tr.predicted_box(t) for tr in tracks}
        unmatched_dets = set(range(len(detections)))
        unmatched_tracks = {tr.id for tr in tracks}
        pairs: list[tuple[int, int]] = []

        by_overlap = sorted(
            (
                (iou(predicted[tr.id], det.box), tr.id, i)
                for tr in tracks
                for i, det in enumerate(detections)
                if self._sizes_compatible(tr.box, det.box)
            ),
            reverse=True,
        )
        for overlap, tid, i in by_overlap:
            if overlap < cfg.iou_threshold:
                break
            if tid in unmatched_tracks and i in unmatched_dets:
                pairs.append((tid, i))
                unmatched_tracks.discard(tid)
                unmatched_dets.discard(i)

        by_distance = sorted(
            (self._distance(predicted[tid], detections[i].box), tid, i)
            for tid in unmatched_tracks
            for i in unmatched_dets
            if self._sizes_compatible(self._tracks[tid].box, detections[i].box)
        )
        for dist, tid, i in by_distance:
            if dist > cfg.max_center_distance:
                break
            if tid in unmatched_tracks and i in unmatched_dets:
                pairs.append((tid, i))
                unmatched_tracks.discard(tid)
                unmatched_dets.discard(i)

        for tid in unmatched_tracks:
            self._tracks[tid].missed += 1
            self._tracks[tid].change = None
        for tid, i in pairs:
            self._continue(self._tracks[tid], detections[i], t)
        for i in sorted(unmatched_dets):
            self._start(detections[i], t)
        return Update(self.tracks, ended)

    def _sizes_compatible(self, a: Box, b: Box) -> bool:
        ratio = _width(a) / _width(b)
        return 1.0 / self.config.max_size_ratio <= ratio <= self.config.max_size_ratio

    @staticmethod
    def _distance(a: Box, b: Box) -> float:
        (ax, ay), (bx, by) = _center(a), _center(b)
        return math.hypot(ax - bx, ay - by) / ((_width(a) + _width(b)) / 2.0)

    def split(self, track_id: int, t: float) -> Track | None:
        """End track `track_id` and start a new one in its place from its latest face (seen at `t` or
        later): the face there is someone else's. The old track is in the next update's `ended`.
        Returns the new track, or None if `track_id` is no longer live."""
        old = self._tracks.pop(track_id, None)
        if old is None:
            return None
        new = Track(
            id=self._next_id,
            box=old.box,
            first_seen=max(t, old.first_seen),
            last_seen=old.last_seen,
            last=old.last,
            velocity=old.velocity,
            split_from=old.id,
        )
        self._next_id += 1
        self._keep(new, old.last)
        self._tracks[new.id] = new
        self._split_ended.append(old)
        return new

    def _start(self, det: Observation, t: float) -> None:
        tr = Track(id=self._next_id, box=det.box, first_seen=t, last_seen=t, last=det)
        self._next_id += 1
        self._keep(tr, det)
        self._tracks[tr.id] = tr

    def _continue(self, tr: Track, det: Observation, t: float) -> None:
        dt = t - tr.last_seen
        if dt > 0:
            (ox, oy), (nx, ny) = _center(tr.box), _center(det.box)
            vx, vy = (nx - ox) / dt, (ny - oy) / dt
            # Smooth the velocity: detector boxes jitter by a few pixels from frame to frame.
            tr.velocity = (0.5 * tr.velocity[0] + 0.5 * vx, 0.5 * tr.velocity[1] + 0.5 * vy)
        tr.change = self._change(tr, det, dt)
        tr.box = det.box
        tr.last_seen = t
        tr.last = det
        tr.missed = 0
        tr.observations += 1
        self._keep(tr, det)

    def _change(self, tr: Track, det: Observation, dt: float) -> str | None:
        cfg = self.config
        # A slow detector spaces frames out; only a frame analysed without the face makes a gap.
        if tr.missed and dt >= cfg.change_gap_s:
            return f"gap {dt:.2f} s"
        ratio = _width(det.box) / _width(tr.box)
        if max(ratio, 1.0 / ratio) >= cfg.change_size_ratio:
            return f"size x{ratio:.2f}"
        if det.cue is not None and tr.last.cue is not None and det.cue.shape == tr.last.cue.shape:
            corr = float(det.cue @ tr.last.cue)
            if corr < cfg.change_min_cue:
                return f"look {corr:.2f}"
        return None

    def _keep(self, tr: Track, det: Observation) -> None:
        if not det.usable:
            return
        tr.best.append(det)
        tr.best.sort(key=lambda o: o.quality, reverse=True)
        del tr.best[self.config.keep_best :]
