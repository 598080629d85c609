"""The canary: the unit checks its whole path, camera frame to the centre's verdict, on a schedule.

At start and every ``[canary] interval_s`` the unit feeds a few frames of the canary person's
picture (engines/canary_media.py: a pinned public-domain photo, never committed) into its
pipeline as one more camera, `CANARY_CAMERA_ID`. They go the way of every camera's frames:
detection, quality gate, tracking, embedding, matching against the list in force (which must hold
the canary person, wire.records.CANARY_PERSON_ID), the hit (flagged ``canary`` and signed), the
outbox, MQTT and the receiver, whose verdict comes back. The run passed when the centre answered
the canary hit 'stored' (or 'duplicate'); with no MQTT reporter, when the hit reached the sinks.
A run that does not pass within `verdict_timeout_s` failed, and `Canary.status()` (the heartbeat's
``unit.canary``) and the unit's warnings say at which step: no face found, none embedded, not
matched (and whether the list holds the canary), no verdict, or refused by the centre and why.
So one check catches a wrong kernel or a broken model, a stale or empty list, and broken
reporting, credentials or ACL; the centre turns the unit red when the canary fails or is late.

    canary = Canary(config.canary, frames, stats=lambda: pipeline.stats().get(CANARY_CAMERA_ID, {}))
    pipeline = Pipeline(cameras=[..., CameraSpec(CANARY_CAMERA_ID, canary.source, CANARY_FPS)],
                        sinks=[..., canary])    # the canary sees the hits handed to the sinks
    reporter.on_verdicts = canary.verdicts      # and the centre's verdicts
    canary.tick()                               # often: starts runs when due, times them out
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from common.config import StrictModel
from edge.frame import Frame
from wire.records import CANARY_PERSON_ID, Hit, Verdict

log = logging.getLogger(__name__)

CANARY_CAMERA_ID = "canary"
"""The canary's camera id in hits, figures and logs; no [[cameras]] table may use it."""
# The canary's frames are sampled at this rate: a run of 5 frames takes a second.
CANARY_FPS = 5.0


class CanaryConfig(StrictModel):
    """``[canary]`` in the unit config."""

    enabled: bool = Field(
        True,
        description="run the canary; a unit with it on refuses watchlists without the canary person, so HQ's lists "
        "must carry it before units are upgraded (docs/edge.md, The canary: upgrade order)",
    )
    interval_s: float = Field(600.0, ge=5.0, le=86400.0, description="a canary run at start and then this often")
    verdict_timeout_s: float = Field(
        120.0,
        gt=0.0,
        le=3600.0,
        description="a run fails when the centre's verdict has not come this long after it began",
    )
    frames: int = Field(5, ge=2, le=50, description="frames of the canary picture per run")


class CanarySource:
    """A camera that shows nothing until a run begins, then the canary frames once each (a
    edge.pipeline.FrameSource: the pipeline's sampler reads it like any camera reader)."""

    def __init__(self, images: Sequence[np.ndarray], clock: Callable[[], float] = time.time) -> None:
        self._images = list(images)
        self._clock = clock
        self._queue: deque[np.ndarray] = deque()
        self._cond = threading.Condition()
        self._seq = 0

    def show(self) -> None:
        """Queue one run's frames (a run still being shown is replaced)."""
        with self._cond:
            self._queue = deque(self._images)
            self._cond.notify_all()

    def latest(self, after_seq: int = -1, timeout: float = 1.0) -> Frame | None:
        """The next canary frame, stamped now; None when no run is showing within `timeout`."""
        with self._cond:
            if not self._queue and not self._cond.wait_for(lambda: bool(self._queue), timeout):
                return None
            image = self._queue.popleft()
            self._seq += 1
            return Frame(CANARY_CAMERA_ID, self._seq, self._clock(), image)


@dataclass
class _Run:
    started_at: float  # epoch seconds
    started_mono: float
    figures: dict[str, int]  # the canary camera's counters when the run began
    hit_id: str | None = None


_COUNTERS = ("faces", "embedded", "matched", "hits")


class Canary:
    """Schedules canary runs and decides whether each passed. A edge.sinks.HitSink, so the pipeline
    hands it every hit; `verdicts` takes the centre's verdicts from the MQTT reporter."""

    name = "canary"

    def __init__(
        self,
        config: CanaryConfig,
        images: Sequence[np.ndarray],
        *,
        stats: Callable[[], dict[str, Any]] = dict,
        has_canary: Callable[[], bool | None] = lambda: None,
        list_version: Callable[[], int] = lambda: 0,
        expects_verdicts: bool = True,
        unavailable: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`stats`: the canary camera's figures (edge.stats.CameraStats.snapshot), to say at which step a
        run failed; `has_canary`: whether the list in force holds the canary person (None: unknown);
        `expects_verdicts`: the hits go to a centre that answers them (MQTT); else a hit handed to the
        sinks is a pass. `unavailable`: why no run can be made (no pictures); every due run then fails
        with it."""
        self.config = config
        self.source = CanarySource(images, clock)
        self._stats = stats
        self._has_canary = has_canary
        self._list_version = list_version
        self.expects_verdicts = expects_verdicts
        self.unavailable = unavailable
        self._clock = clock
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._next_mono = time.monotonic()  # the first run at once
        self.runs = self.passes = self.failures = 0
        self.last_run_at: float | None = None
        self.last_passed_at: float | None = None
        self.last_failed_at: float | None = None
        self.problem: str | None = None  # why the latest finished run failed; None after a pass
        self.passed: bool | None = None  # the latest finished run's result (None: none finished yet)

    # -- schedule ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Time out a run that took too long; start the next one when it is due."""
        now = time.monotonic()
        with self._lock:
            run = self._run
            if run is not None and now - run.started_mono > self.config.verdict_timeout_s:
                self._fail(self._diagnose(run))
            if self._run is None and now >= self._next_mono:
                self._next_mono = now + self.config.interval_s
                if self.unavailable is not None:
                    self.runs += 1
                    self.last_run_at = self._clock()
                    self._fail(self.unavailable)
                    return
                self._run = _Run(self._clock(), now, self._counters())
                self.runs += 1
                self.last_run_at = self._run.started_at
                self.source.show()
                log.debug("canary run %d started", self.runs)

    def _counters(self) -> dict[str, int]:
        figures = self._stats()
        return {k: int(figures.get(k, 0)) for k in _COUNTERS}

    # -- outcomes ------------------------------------------------------------------------------

    def submit(self, hit: Hit) -> None:
        """HitSink: note the canary hit of the running run (other hits are not the canary's business)."""
        if not hit.canary or hit.camera_id != CANARY_CAMERA_ID:
            return
        with self._lock:
            if self._run is None or self._run.hit_id is not None:
                return
            self._run.hit_id = hit.id
            if not self.expects_verdicts:
                self._pass()

    def verdicts(self, verdicts: Sequence[Verdict]) -> None:
        """The centre's verdicts as they arrive (edge.reporter.MqttReporter.on_verdicts)."""
        with self._lock:
            run = self._run
            if run is None or run.hit_id is None:
                return
            for v in verdicts:
                if v.hit_id != run.hit_id:
                    continue
                if v.outcome == "refused":
                    self._fail(f"the centre refused the canary hit: {v.reason} ({v.error})")
                else:
                    self._pass()
                return

    def _pass(self) -> None:
        if self.problem is not None:
            log.info("canary passed again (was: %s)", self.problem)
        self.passes += 1
        self.passed, self.problem = True, None
        self.last_passed_at = self._clock()
        self._run = None

    def _fail(self, reason: str) -> None:
        self.failures += 1
        self.passed, self.problem = False, reason
        self.last_failed_at = self._clock()
        self._run = None
        log.error("canary failed: %s", reason)

    def _diagnose(self, run: _Run) -> str:
        """At which step a run that timed out stopped, from the canary camera's counters."""
        now = self._counters()
        grew = {k: now[k] - run.figures[k] for k in _COUNTERS}
        took = f"within {self.config.verdict_timeout_s:g} s"
        if run.hit_id is not None:
            return (
                f"the canary hit {run.hit_id} got no verdict from the centre {took}: check the link to the broker, "
                "the unit's credentials and ACL, and the receiver"
            )
        if grew["faces"] == 0:
            return f"no face found in the canary pictures {took}: the detector or its model is broken"
        if grew["embedded"] == 0:
            return f"faces found in the canary pictures but none embedded {took}: the quality gate or embedder failed"
        has = self._has_canary()
        if has is False:
            return (
                f"the canary person was not matched: the list in force (version {self._list_version()}) does not "
                f"hold {CANARY_PERSON_ID!r}"
            )
        if grew["matched"] == 0:
            return (
                "the canary person was not matched although the list holds it: the embeddings are wrong "
                "(embedder model, its kernels on this CPU) or the threshold is"
            )
        return f"the canary person matched but no canary hit was made {took}: see the unit's log"

    # -- figures -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The heartbeat's ``unit.canary``: what the centre judges the canary by."""
        with self._lock:
            state = "failed" if self.passed is False else "passed" if self.passed else "waiting"
            return {
                "interval_s": self.config.interval_s,
                "state": state,
                "running": self._run is not None,
                "reason": self.problem,
                "last_run_at": _rounded(self.last_run_at),
                "last_passed_at": _rounded(self.last_passed_at),
                "last_failed_at": _rounded(self.last_failed_at),
                "runs": self.runs,
                "passes": self.passes,
                "failures": self.failures,
            }

    def warning(self) -> str | None:
        """The unit's warning while the latest run failed."""
        return None if self.problem is None else f"canary failed: {self.problem}"

    # -- HitSink -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self.status()

    def close(self, timeout: float = 0.0, reason: str = "shutdown") -> None:
        """Nothing to flush."""


def _rounded(t: float | None) -> float | None:
    return None if t is None else round(t, 3)
