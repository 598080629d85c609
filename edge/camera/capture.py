"""Camera readers: one thread per camera that keeps only the newest frame and never gives up.

    reader = CameraReader(CaptureConfig(id="gate-1", url="rtsp://10.0.0.5/stream1"))
    reader.start()
    frame = reader.latest(after_seq=-1, timeout=1.0)   # newest Frame, or None
    reader.state                                         # CameraState: up / down since / last error
    reader.stop()

Each connection runs in its own session thread that blocks in the backend's read. The reader's
supervisor thread watches it: a session that delivers no frame for `stall_timeout_s` (cameras that
reboot send no end-of-stream) is abandoned, not waited for; it closes its own source when its read
finally returns (closing a capture from another thread while it reads is not safe in OpenCV or
FFmpeg). Then the supervisor reconnects with capped exponential backoff and jitter, forever.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge.camera.config import CaptureConfig
from edge.camera.sources import EndOfStream, Picture, Source, SourceError, open_source
from edge.camera.urls import redact_url
from edge.frame import Frame

log = logging.getLogger(__name__)

# How often the supervisor looks at its session; bounds how late a stall is noticed.
_POLL_S = 0.05
# Extra time granted to a backend's own open timeout before the watchdog abandons the open.
_OPEN_GRACE_S = 2.0
# Seconds over which fps is measured.
_FPS_WINDOW_S = 2.0


@dataclass(frozen=True)
class CameraState:
    """What a camera is doing, for logs and the unit's status."""

    camera_id: str
    up: bool
    since: float  # epoch seconds of the last change between up and down
    last_error: str | None  # why it is down; None while up (the error moves to previous_error)
    reconnects: int  # connection attempts after the first
    frames: int  # frames delivered since start
    fps: float  # recent delivery rate; 0 while down
    converted: int = 0  # frames converted to RGB because a consumer asked for them (the rest never are)
    previous_error: str | None = None  # why it was last down, once it came back
    previous_error_at: float | None = None  # epoch seconds when that error was last seen


class _Session(threading.Thread):
    """One connection: open the source, read until it fails, ends, or is abandoned."""

    def __init__(self, reader: CameraReader, number: int) -> None:
        super().__init__(name=f"capture-{reader.config.id}-{number}", daemon=True)
        self.reader = reader
        self.cfg = reader.config
        self.started_at = time.monotonic()
        self.opened_at: float | None = None
        self.last_frame_at: float | None = None
        self.delivered = 0
        self.error: str | None = None
        self.eof = False
        self.abandoned = threading.Event()
        self.done = threading.Event()
        self.source: Source | None = None

    def decode_note(self) -> str:
        """What the backend knows about decode failures so far ('' when nothing)."""
        note = getattr(self.source, "decode_note", None)
        return note() if note is not None else ""

    def run(self) -> None:
        try:
            source = open_source(self.cfg)
        except SourceError as e:
            self.error = str(e)
            self.done.set()
            return
        except Exception as e:  # a backend bug must not kill the camera forever
            log.exception("camera %s: unexpected error opening %s", self.cfg.id, redact_url(self.cfg.url))
            self.error = f"unexpected error opening: {type(e).__name__}: {e}"
            self.done.set()
            return
        self.source = source
        self.opened_at = time.monotonic()
        try:
            self._read_loop(source)
        except EndOfStream:
            self.eof = True
        except SourceError as e:
            self.error = str(e)
        except Exception as e:
            log.exception("camera %s: unexpected error reading", self.cfg.id)
            self.error = f"unexpected error reading: {type(e).__name__}: {e}"
        finally:
            source.close()
            self.done.set()

    def _read_loop(self, source: Source) -> None:
        pace = self.cfg.realtime and source.kind == "file"
        anchor: tuple[float, float] | None = None  # (wall, pts) the file's clock is measured from
        period = 1.0 / (getattr(source, "fps", None) or 25.0)
        n = 0
        while not self.abandoned.is_set():
            picture, pts = source.read()
            if self.abandoned.is_set():
                return
            if pace:
                pts = n * period if pts is None else pts
                now = time.monotonic()
                if anchor is None or pts < anchor[1]:
                    anchor = (now, pts)
                wait = anchor[0] + (pts - anchor[1]) - now
                if wait > 0 and self.abandoned.wait(wait):
                    return
            n += 1
            self.last_frame_at = time.monotonic()
            self.delivered += 1
            self.reader._deliver(self, picture)


class CameraReader:
    """Reads one camera on its own threads and always holds the newest frame (see module doc)."""

    def __init__(self, config: CaptureConfig, on_state: Callable[[CameraState], None] | None = None) -> None:
        self.config = config
        self._on_state = on_state
        self._cond = threading.Condition()
        # The newest picture, when it arrived, and its frame once someone asked for it (converted to RGB then).
        self._picture: Picture | None = None
        self._picture_at = 0.0
        self._frame: Frame | None = None
        self._seq = -1
        self._converted = 0
        self._convert_errors = 0
        self._frames = 0
        self._times: deque[float] = deque(maxlen=2000)
        self._up_at = 0.0
        self._up = False
        self._since = time.time()
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._previous_error: str | None = None
        self._previous_error_at: float | None = None
        self._reconnects = 0
        self._session: _Session | None = None
        self._abandoned: list[_Session] = []
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

    @property
    def camera_id(self) -> str:
        return self.config.id

    def start(self) -> None:
        """Start reading in the background; returns at once."""
        if self._thread is not None:
            raise RuntimeError(f"camera {self.config.id}: reader already started (readers are not restartable)")
        self._thread = threading.Thread(target=self._supervise, name=f"capture-{self.config.id}", daemon=True)
        self._thread.start()
        log.info("camera %s: reading %s with %s", self.config.id, redact_url(self.config.url), self.config.backend)

    def latest(self, after_seq: int = -1, timeout: float = 1.0) -> Frame | None:
        """The newest frame with seq > `after_seq`, waiting up to `timeout` s; None if none came.

        Frames in between are skipped on purpose: a slow consumer sees the present, not a backlog. Only
        the pictures asked for are converted to RGB (here, on the caller's thread, once per picture). A
        picture that cannot be converted is logged and skipped: the next one is waited for.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                while self._picture is None or self._seq <= after_seq:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._finished.is_set() and self._picture is not None:
                        return None
                    self._cond.wait(left)
                if self._frame is not None and self._frame.seq == self._seq:
                    return self._frame
                seq, picture, at = self._seq, self._picture, self._picture_at
            try:
                frame = Frame(self.config.id, seq, at, picture.rgb())
            except Exception as e:  # a damaged picture must not stop the camera's consumers
                with self._cond:
                    self._convert_errors += 1
                    count = self._convert_errors
                log.warning(
                    "camera %s: picture %d could not be converted to RGB (%d so far): %s", self.config.id, seq, count, e
                )
                after_seq = seq
                continue
            with self._cond:
                self._converted += 1
                if self._seq == seq:
                    self._frame = frame
            return frame

    @property
    def state(self) -> CameraState:
        """A snapshot of the camera's state."""
        with self._cond:
            return self._snapshot()

    @property
    def finished(self) -> bool:
        """True once a non-looping file has been read to its end, or the reader was stopped."""
        return self._finished.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading and release the camera, waiting up to `timeout` s for blocked reads to return."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for s in [self._session, *self._abandoned]:
            if s is not None:
                s.abandoned.set()
                s.join(max(0.0, deadline - time.monotonic()))
        still = [s.name for s in [self._session, *self._abandoned] if s is not None and s.is_alive()]
        if still:
            log.warning(
                "camera %s: stopped; %d read(s) still blocked, left to time out: %s", self.config.id, len(still), still
            )
        self._finished.set()
        with self._cond:
            if self._up:
                self._up, self._since = False, time.time()
            self._cond.notify_all()

    # -- internals ---------------------------------------------------------------------------

    def _snapshot(self) -> CameraState:
        fps = 0.0
        if self._up:
            now = time.monotonic()
            while self._times and self._times[0] < now - _FPS_WINDOW_S:
                self._times.popleft()
            # Over the window, or since coming up if that is shorter; so a silent camera reads ~0.
            span = min(_FPS_WINDOW_S, now - self._up_at)
            fps = len(self._times) / span if span > 0.2 else 0.0
        return CameraState(
            camera_id=self.config.id,
            up=self._up,
            since=self._since,
            last_error=self._last_error,
            reconnects=self._reconnects,
            frames=self._frames,
            fps=round(fps, 2),
            converted=self._converted,
            previous_error=self._previous_error,
            previous_error_at=self._previous_error_at,
        )

    def _deliver(self, session: _Session, picture: Picture) -> None:
        notify: CameraState | None = None
        with self._cond:
            if session is not self._session or session.abandoned.is_set():
                return
            self._seq += 1
            self._frames += 1
            self._picture, self._picture_at, self._frame = picture, time.time(), None
            self._times.append(time.monotonic())
            if not self._up:
                waited = time.time() - self._since
                first = self._frames == 1
                self._up, self._since = True, time.time()
                if self._last_error is not None:
                    # An error shown while the camera is up again misleads whoever reads the heartbeat.
                    self._previous_error, self._previous_error_at = self._last_error, self._last_error_at
                    self._last_error = self._last_error_at = None
                self._up_at = time.monotonic()
                self._times.clear()
                self._times.append(self._up_at)
                notify = self._snapshot()
                log.info(
                    "camera %s: up (%dx%d), %s %.1f s, reconnects=%d",
                    self.config.id,
                    picture.width,
                    picture.height,
                    "first frame after" if first else "was down for",
                    waited,
                    self._reconnects,
                )
            self._cond.notify_all()
        if notify is not None:
            self._notify(notify)

    def _mark_down(self, error: str, retry_in: float | None) -> None:
        with self._cond:
            changed = self._up or error != self._last_error
            word = "down" if self._up or self._last_error is None else "still down"
            if self._up:
                self._up, self._since = False, time.time()
            self._last_error, self._last_error_at = error, time.time()
            snap = self._snapshot()
        retry = f"; retrying in {retry_in:.1f} s" if retry_in is not None else ""
        if changed:
            log.warning(
                "camera %s: %s since %s: %s%s",
                self.config.id,
                word,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.since)),
                error,
                retry,
            )
            self._notify(snap)
        else:
            log.info("camera %s: still down (%s)%s, reconnects=%d", self.config.id, error, retry, snap.reconnects)

    def _notify(self, state: CameraState) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(state)
        except Exception:
            log.exception("camera %s: on_state callback failed", self.config.id)

    def _backoff(self, failures: int) -> float:
        cap = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2 ** min(failures, 30))
        # Equal jitter: never below half the step, so many cameras behind one switch spread out
        # without any of them hammering a dead camera.
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def _watch(self, session: _Session) -> str | None:
        """Wait until the session ends or must be abandoned; the error, or None for end-of-file/stop."""
        cfg = self.config
        while not session.done.wait(_POLL_S):
            if self._stop.is_set():
                return None
            now = time.monotonic()
            if session.opened_at is None:
                if now - session.started_at > cfg.open_timeout_s + _OPEN_GRACE_S:
                    return f"open did not return within open_timeout_s={cfg.open_timeout_s:g} (connection hung)"
            else:
                last = session.last_frame_at or session.opened_at
                if now - last > cfg.stall_timeout_s:
                    limit = f"stall_timeout_s={cfg.stall_timeout_s:g}"
                    if not session.delivered:
                        return (
                            f"connected, but no frame decoded within {limit} (garbage data, unsupported codec, "
                            f"or a camera that sends nothing){session.decode_note()}"
                        )
                    return f"stalled: no new frame for {limit} (connected but silent){session.decode_note()}"
        if session.eof:
            return None
        return session.error or "stream ended"

    def _supervise(self) -> None:
        failures = 0
        number = 0
        while not self._stop.is_set():
            session = _Session(self, number)
            number += 1
            with self._cond:
                self._session = session
            session.start()
            error = self._watch(session)
            if not session.done.is_set():
                session.abandoned.set()
                self._abandoned = [s for s in self._abandoned if s.is_alive()] + [session]
                if len(self._abandoned) > 3:
                    log.warning(
                        "camera %s: %d abandoned reads are still blocked in the backend",
                        self.config.id,
                        len(self._abandoned),
                    )
            if self._stop.is_set():
                return
            if error is None and session.eof:
                if self.config.loop and session.delivered:
                    continue
                ended = "end of file" if session.delivered else "no frame could be decoded from file"
                self._mark_down(f"{ended} {self.config.url}", None)
                self._finished.set()
                with self._cond:
                    self._cond.notify_all()
                return
            if session.delivered:
                failures = 0
            delay = self._backoff(failures)
            failures += 1
            self._mark_down(error or "stream ended", delay)
            if self._stop.wait(delay):
                return
            with self._cond:
                self._reconnects += 1


__all__ = ["CameraReader", "CameraState", "CaptureConfig", "EndOfStream", "SourceError"]
