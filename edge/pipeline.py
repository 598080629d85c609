"""Frames in, hits out: the threads that sample each camera, run its analysis (edge.analysis), have
each embed batch decided (edge.decision), and emit hits.

Threads and queues, data flowing one way:

    camera reader (edge.camera.capture, newest frame only)
      -> sampler thread per camera, at the camera's analysis_fps
      -> one slot per camera holding only the newest sampled frame (a slow detector skips frames,
         it never queues stale ones; after a burst, the sampler first waits up to one period for its
         waiting frame to be taken, so a brief delay does not lose the frame)
      -> detector worker(s): detect, assess quality, update the camera's tracker, choose which
         tracks to embed (their best-quality face so far; again only if a clearly better face comes)
      -> embed queue (bounded, shared by all cameras)
      -> embedder thread: batches faces of all cameras, has edge.decision.decide_batch embed, match and
         decide each track, turns hits into wire Hits (edge.hits) and hands them to the sinks.

Faces that match nothing are dropped in the embedder thread at once: their embedding and image
are never stored or sent. A track's best face (a reference to its frame) is held in memory only
while the track lives (``analysis.tracker.max_age_s`` after it was last seen).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from edge.analysis import AnalysisConfig, CameraAnalyser, FaceEngineLike
from edge.canary import CANARY_CAMERA_ID
from edge.decision import DecisionConfig, MatcherLike, SecondLook, decide_batch, same_person_level
from edge.faces import EmbedRequest
from edge.frame import Frame
from edge.hits import HitEmitter, stranger_rate
from edge.sinks import HitSink
from wire.records import Hit

log = logging.getLogger(__name__)


class FrameSource(Protocol):
    """What the pipeline needs from edge.camera.capture.CameraReader."""

    def latest(self, after_seq: int = -1, timeout: float = 1.0) -> Frame | None: ...


@dataclass(frozen=True)
class CameraSpec:
    """One camera as the pipeline sees it: where its frames come from and how often to analyse them."""

    camera_id: str
    source: FrameSource
    analysis_fps: float


class _Slots:
    """The newest sampled frame of each camera, waiting for a detector; a newer frame replaces an older one."""

    def __init__(self) -> None:
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # detectors wait here for a frame
        # Samplers wait here for their camera's frame to be taken: on a condition of their own, so a notify
        # meant for a detector never wakes a sampler instead, and a take wakes no other detector.
        self._taken = threading.Condition(lock)
        self._frames: dict[str, Frame] = {}
        # When each camera's slot was filled after it was last emptied: a replaced frame keeps its
        # camera's place in line, or a camera whose frames keep being replaced would never be served.
        self._waiting_since: dict[str, float] = {}
        self._busy: set[str] = set()
        self._closed = False

    def put(self, frame: Frame) -> bool:
        """Offer a frame; return True if it replaced one that was never analysed."""
        with self._cond:
            replaced = frame.camera_id in self._frames
            self._frames[frame.camera_id] = frame
            self._waiting_since.setdefault(frame.camera_id, time.monotonic())
            self._cond.notify()
            return replaced

    def wait_taken(self, camera_id: str, timeout: float) -> bool:
        """Wait until no frame of `camera_id` waits for a detector; False if one still does after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while camera_id in self._frames and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._taken.wait(left)
            return True

    def take(self, timeout: float) -> Frame | None:
        """The frame of the camera that has waited longest and that no detector works on; None on timeout or close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                ready = [cid for cid in self._frames if cid not in self._busy]
                if ready:
                    cid = min(ready, key=lambda c: self._waiting_since[c])
                    frame = self._frames.pop(cid)
                    del self._waiting_since[cid]
                    self._busy.add(cid)
                    self._taken.notify_all()
                    return frame
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return None

    def done(self, camera_id: str) -> None:
        with self._cond:
            self._busy.discard(camera_id)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._taken.notify_all()


_STOP = object()


class Pipeline:
    """Runs the analysis of all cameras: start(), then stop() to finish the work in flight and return."""

    def __init__(
        self,
        *,
        unit_id: str,
        cameras: Sequence[CameraSpec],
        engine: FaceEngineLike,
        matcher: MatcherLike | Callable[[], MatcherLike],
        sinks: Sequence[HitSink],
        matching: DecisionConfig | None = None,
        analysis: AnalysisConfig | None = None,
        clock: Callable[[], float] = time.time,
        keep_reports: bool = False,
        calibration: Any = None,
    ) -> None:
        """`matcher` is a Matcher, or a callable returning the current one (the watchlist may be replaced
        while running). `keep_reports`: keep every finished track's story (edge.analysis.TrackReport) in
        the analysers, for diagnostics of a clip. `calibration`: the model's engines.calibration.Calibration,
        which places the second look (``matching.second_look_fpir``); by default the engine's own, and no
        second look for a model without one (FaceEngine.calibration)."""
        ids = [c.camera_id for c in cameras]
        if len(set(ids)) != len(ids):
            raise ValueError(f"camera ids must be unique, got {ids}")
        self.unit_id = unit_id
        self.cameras = list(cameras)
        self.engine = engine
        self._matcher = _current(matcher)
        self.sinks = list(sinks)
        self.matching = matching or DecisionConfig()
        self.analysis = analysis or AnalysisConfig()
        self.clock = clock
        self.emitter = HitEmitter(unit_id, self.matching.cooldown_s, self.matching.crop)
        # Cameras started together would all sample at the same instants and all take their scheduled full
        # frames on the same round: the detectors then idle between bursts they cannot finish in a period.
        # Each camera starts a share of the way into the period and into the full-frame schedule instead.
        self._phases = {c.camera_id: i / len(cameras) for i, c in enumerate(cameras)}
        self.analysers = {
            c.camera_id: CameraAnalyser(
                c.camera_id,
                engine,
                self.matching,
                self.analysis.tracker,
                gating=self.analysis.gating,
                keep_reports=keep_reports,
                phase=self._phases[c.camera_id],
            )
            for c in cameras
        }
        self._slots = _Slots()
        self._embed_q: queue.Queue[EmbedRequest | object] = queue.Queue(self.analysis.embed_queue)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._beats: dict[str, float] = {}
        self._deaths: dict[str, str] = {}  # thread name -> the error it died of
        self.hits_total = 0
        self.second_look = SecondLook(
            self.matching, calibration if calibration is not None else getattr(engine, "calibration", None)
        )

    @property
    def matcher(self) -> MatcherLike:
        """The matcher in use now."""
        return self._matcher()

    # -- threads -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sampler, detector and embedder threads."""
        if self._threads:
            raise RuntimeError("pipeline already started")
        for cam in self.cameras:
            self._spawn(f"sample-{cam.camera_id}", self._sample_loop, cam)
        for i in range(self.analysis.detect_workers):
            self._spawn(f"detect-{i}", self._detect_loop)
        self._spawn("embed", self._embed_loop)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self._beats[name] = time.monotonic()
        th = threading.Thread(target=self._guard, args=(name, target, *args), name=name, daemon=True)
        self._threads.append(th)
        th.start()

    def _guard(self, name: str, target: Callable[..., None], *args: Any) -> None:
        try:
            target(name, *args)
        except Exception as exc:
            # A thread that dies silently would stop analysis without a trace: the daemon reads why in problems().
            self._deaths[name] = f"{type(exc).__name__}: {exc}"
            log.exception("pipeline thread %s failed", name)
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sampling, finish the faces already waiting for the embedder (their hits reach the sinks), join."""
        self._stop.set()
        self._slots.close()
        deadline = time.monotonic() + timeout
        for th in self._threads:
            if th.name != "embed":
                th.join(max(0.0, deadline - time.monotonic()))
        try:
            self._embed_q.put(_STOP, timeout=max(0.1, deadline - time.monotonic()))
        except queue.Full:
            log.warning("embed queue still full at shutdown; faces waiting in it are dropped")
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))
        alive = [th.name for th in self._threads if th.is_alive()]
        if alive:
            log.warning("pipeline threads still running after %.1f s: %s", timeout, ", ".join(alive))

    def problems(self, max_silence_s: float = 10.0) -> list[str]:
        """What stops the pipeline doing its job: each thread that died (with the error it died of) or
        has not gone round its loop within `max_silence_s`; empty while all run, and after stop()."""
        if self._stop.is_set():
            return []
        now = time.monotonic()
        found = []
        for th in self._threads:
            if not th.is_alive():
                found.append(f"pipeline thread {th.name} died: {self._deaths.get(th.name, 'it returned')}")
            elif now - self._beats.get(th.name, 0.0) > max_silence_s:
                silent = now - self._beats.get(th.name, 0.0)
                found.append(f"pipeline thread {th.name} is hung: no round of its loop for {silent:.0f} s")
        return found

    def healthy(self, max_silence_s: float = 10.0) -> bool:
        """True if the pipeline runs (started, not stopped) and `problems` finds none."""
        return bool(self._threads) and not self._stop.is_set() and not self.problems(max_silence_s)

    def _sample_loop(self, name: str, cam: CameraSpec) -> None:
        period = 1.0 / cam.analysis_fps
        stats = self.analysers[cam.camera_id].stats
        last_seq = -1
        next_t = time.monotonic() + period * self._phases[cam.camera_id]
        while not self._stop.is_set():
            self._beats[name] = time.monotonic()
            wait = next_t - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            # The detectors are behind on this camera: its waiting frame is at most a period old, so let them
            # take it rather than replace it (a burst then delays frames instead of losing them). Only if it
            # still waits a period later is it replaced by the newest, and counted as skipped.
            self._slots.wait_taken(cam.camera_id, period)
            frame = cam.source.latest(after_seq=last_seq, timeout=min(1.0, max(period, 0.1)))
            if frame is None:
                # Down or finished cameras may answer at once; do not spin on them.
                if self._stop.wait(min(period, 0.5)):
                    return
                continue
            last_seq = frame.seq
            stats.count(frames_sampled=1, frames_skipped=int(self._slots.put(frame)))
            next_t += period
            now = time.monotonic()
            if next_t < now:
                next_t = now

    def _detect_loop(self, name: str) -> None:
        while not self._stop.is_set():
            self._beats[name] = time.monotonic()
            frame = self._slots.take(timeout=0.5)
            if frame is None:
                continue
            try:
                self._analyse(frame)
            finally:
                self._slots.done(frame.camera_id)

    def _analyse(self, frame: Frame) -> None:
        an = self.analysers[frame.camera_id]
        try:
            requests, ended = an.analyse(frame)
        except Exception as exc:  # one bad frame or engine hiccup must not stop the camera's analysis
            an.stats.failed(f"{type(exc).__name__}: {exc}")
            log.warning("camera %s: analysis of frame %d failed: %s", frame.camera_id, frame.seq, exc)
            return
        for tid in ended:
            self.emitter.forget_track(frame.camera_id, tid)
        for req in requests:
            try:
                self._embed_q.put_nowait(req)
            except queue.Full:
                an.stats.count(embeds_dropped=1)
                an.not_embedded(req, "embed queue full")
        an.stats.analysed(self.clock() - frame.captured_at, time.monotonic())

    def _embed_loop(self, name: str) -> None:
        stopping = False
        while not stopping:
            self._beats[name] = time.monotonic()
            try:
                first = self._embed_q.get(timeout=0.5)
            except queue.Empty:
                continue
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.analysis.embed_wait_ms / 1000.0
            while len(batch) < self.analysis.embed_batch:
                try:
                    item = self._embed_q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self.process_batch(batch)  # type: ignore[arg-type]
        # Faces queued before the stop still get their chance to become hits.
        rest = []
        while True:
            try:
                item = self._embed_q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                rest.append(item)
        for i in range(0, len(rest), self.analysis.embed_batch):
            self.process_batch(rest[i : i + self.analysis.embed_batch])  # type: ignore[arg-type]

    # -- the work, callable without threads ------------------------------------------------------

    def process_frame(self, frame: Frame) -> list[Hit]:
        """Analyse one frame and embed/match what it asks for, synchronously; return the hits (also sent to sinks)."""
        an = self.analysers[frame.camera_id]
        an.stats.count(frames_sampled=1)
        requests, ended = an.analyse(frame)
        for tid in ended:
            self.emitter.forget_track(frame.camera_id, tid)
        an.stats.analysed(self.clock() - frame.captured_at, time.monotonic())
        return self.process_batch(requests) if requests else []

    def process_batch(self, batch: list[EmbedRequest]) -> list[Hit]:
        """Embed a batch of faces (any cameras), decide each track (edge.decision.decide_batch), emit hits to
        the sinks; drop the rest at once."""
        try:
            matcher = self.matcher
            # The list these faces are matched against, for the hits' calibrated stranger rate.
            index = getattr(matcher, "index", None)
            same_person = same_person_level(self.matching, matcher)
            decisions = decide_batch(
                self.matching,
                self.engine,
                matcher,
                batch,
                self.second_look.level(matcher),
                lambda r, e: self.analysers[r.camera_id].embedded(r, e, same_person),
            )
        except Exception as exc:
            log.warning("embedding/matching a batch of %d faces failed: %s", len(batch), exc)
            for r in batch:
                an = self.analysers[r.camera_id]
                an.stats.failed(f"{type(exc).__name__}: {exc}")
                an.not_embedded(r, f"embedding failed: {type(exc).__name__}")
            return []
        hits: list[Hit] = []
        for d in decisions:
            req, match = d.request, d.decision.match
            an = self.analysers[req.camera_id]
            an.stats.count(embedded=1, second_looks=int(d.looked_again))
            an.decided(d.track_id, d.decision)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("camera %s track %d (%s): %s", req.camera_id, d.track_id, req.why, d.describe())
            if match is None:
                continue
            an.stats.count(matched=1)
            det = req.candidate.detection
            box = tuple(float(v) for v in det.box)
            frame = req.candidate.frame
            try:
                hit = self.emitter.offer(
                    camera_id=req.camera_id,
                    track_id=d.track_id,
                    match=match,
                    box=_clip_box(box, frame.width, frame.height),
                    captured_at=frame.captured_at,
                    image=frame.image,
                    model_id=self.engine.model_id,
                    watchlist_version=int(getattr(matcher, "version", 0)),
                    # The calibration that places the second look, at the size of the list matched against.
                    stranger_rate=stranger_rate(
                        self.second_look.calibration,
                        match.score,
                        int(getattr(index, "n_persons", 0) or 0),
                        int(getattr(index, "n_templates", 0) or 0),
                    ),
                )
            except Exception as exc:  # one hit that cannot be made must not stop every later one
                an.stats.failed(f"a hit for person {match.person_id!r} could not be made: {exc}")
                log.error(
                    "camera %s: a hit for person %r (track %d, score %.4f, captured at %.3f) could not be made: %s: %s",
                    req.camera_id,
                    match.person_id,
                    d.track_id,
                    match.score,
                    frame.captured_at,
                    type(exc).__name__,
                    exc,
                )
                continue
            if hit is None or not self._canary_in_place(hit):
                continue
            self._deliver(hit)
            an.stats.hit(self.clock() - hit.captured_at)
            hits.append(hit)
        return hits

    def _canary_in_place(self, hit: Hit) -> bool:
        """The canary person is reported from the canary's own frames only, and those report nobody
        else: a canary picture held up to a real camera is no check of the unit (and never an
        operator's hit), and a listed person matched on the canary's picture is a wrong match."""
        if hit.canary == (hit.camera_id == CANARY_CAMERA_ID):
            return True
        if hit.canary:
            log.warning("camera %s: the canary person was seen (its picture held up?); not reported", hit.camera_id)
        else:
            log.error(
                "the canary's picture matched listed person %s (score %.3f); not reported: check the list and threshold",
                hit.person_id,
                hit.score,
            )
        return False

    def _deliver(self, hit: Hit) -> None:
        self.hits_total += 1
        log.info(
            "HIT camera %s person %s score %.3f (threshold %.3f, margin %.3f) track %d hit %s",
            hit.camera_id,
            hit.person_id,
            hit.score,
            hit.threshold,
            hit.margin,
            hit.track_id,
            hit.id,
        )
        for sink in self.sinks:
            try:
                sink.submit(hit)
            except Exception as exc:  # one failing sink must not keep the hit from the others
                log.error("sink %s could not keep hit %s (camera %s): %s", sink.name, hit.id, hit.camera_id, exc)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-camera figures (see CameraStats.snapshot)."""
        now = time.monotonic()
        return {cid: an.stats.snapshot(now) for cid, an in self.analysers.items()}


def _clip_box(box: tuple[float, ...], width: int, height: int) -> tuple[float, float, float, float]:
    # Detector boxes may reach past the frame edge; a hit's box describes what is in the picture.
    x1, y1, x2, y2 = box
    x1, y1 = min(max(0.0, x1), width - 1.0), min(max(0.0, y1), height - 1.0)
    x2, y2 = max(min(float(width), x2), x1 + 1.0), max(min(float(height), y2), y1 + 1.0)
    return (x1, y1, x2, y2)


def _current(matcher: MatcherLike | Callable[[], MatcherLike]) -> Callable[[], MatcherLike]:
    """`matcher` as a callable that returns the matcher in use: a Matcher stays the one in use."""
    if callable(matcher) and not hasattr(matcher, "match"):
        return matcher
    fixed = cast(MatcherLike, matcher)
    return lambda: fixed
