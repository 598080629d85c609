"""A camera's running figures (frames, faces, embeddings, hits, lag), shared by the pipeline's threads.

The sampler, detector and embedder threads add to them and the heartbeat and status line read them.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    """Running figures of one camera's analysis. The sampler, detector and embedder threads add to them
    and the heartbeat reads them, so every change goes through a method that holds the lock, and
    `snapshot` reads them under it (a figure read alone is one attribute, safe as it is)."""

    frames_sampled: int = 0
    frames_analysed: int = 0
    frames_skipped: int = 0  # sampled, then replaced by a newer frame before a detector was free
    faces: int = 0
    embedded: int = 0
    second_looks: int = 0  # faces near a decision embedded again with their mirror image
    embeds_dropped: int = 0  # embed queue full
    rechecks: int = 0  # embeddings that checked a track still holds the same person
    splits: int = 0  # tracks split because a face was someone else's
    matched: int = 0
    hits: int = 0
    errors: int = 0
    last_error: str | None = None
    lag_s: float = 0.0  # capture to end of detection, last analysed frame
    lag_max_s: float = 0.0
    hit_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    analysed_window: _Window = field(default_factory=_Window)
    frames_full: int = 0  # frames the detector searched whole
    frames_regions: int = 0  # frames it searched only in regions (edge.regions), maybe none
    searched_share_sum: float = 0.0  # of the frame's area searched, summed over analysed frames
    faces_confirmed: int = 0  # followed faces found where they were heading, without a search (edge.regions)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, **added: int) -> None:
        """Add to counters by name: ``stats.count(faces=3, embedded=1)``."""
        with self._lock:
            for name, n in added.items():
                setattr(self, name, getattr(self, name) + n)

    def failed(self, error: str) -> None:
        """Count an error and keep its text as the last one."""
        with self._lock:
            self.errors += 1
            self.last_error = error

    def analysed(self, lag_s: float, now: float) -> None:
        """Count an analysed frame, `lag_s` behind capture, finished at `now` (monotonic)."""
        with self._lock:
            self.frames_analysed += 1
            self.analysed_window.add(now)
            self.lag_s = lag_s
            self.lag_max_s = max(self.lag_max_s, lag_s)

    def hit(self, latency_s: float) -> None:
        """Count a hit delivered `latency_s` after its face was captured."""
        with self._lock:
            self.hits += 1
            self.hit_latency_s.append(latency_s)

    def searched(self, full: bool, share: float, confirmed: int = 0) -> None:
        """Count where the detector looked on one frame (and how many followed faces it confirmed)."""
        with self._lock:
            self.faces_confirmed += confirmed
            if full:
                self.frames_full += 1
            else:
                self.frames_regions += 1
            self.searched_share_sum += share

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready copy of the figures, all taken at one moment."""
        with self._lock:
            return self._snapshot(now)

    def _snapshot(self, now: float) -> dict[str, Any]:
        lat = np.array(list(self.hit_latency_s), dtype=np.float64)
        searched = self.frames_full + self.frames_regions
        return {
            "frames_sampled": self.frames_sampled,
            "frames_analysed": self.frames_analysed,
            "frames_skipped": self.frames_skipped,
            "analysed_fps": round(self.analysed_window.rate(now), 2),
            "faces": self.faces,
            "embedded": self.embedded,
            "second_looks": self.second_looks,
            "embeds_dropped": self.embeds_dropped,
            "rechecks": self.rechecks,
            "splits": self.splits,
            "matched": self.matched,
            "hits": self.hits,
            "errors": self.errors,
            "last_error": self.last_error,
            "lag_s": round(self.lag_s, 3),
            "lag_max_s": round(self.lag_max_s, 3),
            "hit_latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
            "hit_latency_p99_s": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
            "frames_full": self.frames_full,
            "frames_regions": self.frames_regions,
            "searched_share": round(self.searched_share_sum / searched, 3) if searched else None,
            "faces_confirmed": self.faces_confirmed,
        }
