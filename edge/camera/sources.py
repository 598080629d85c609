"""Camera sources: open a URL, file or device with one backend and read decoded pictures.

A source is used by one thread at a time and is blocking: `read()` waits for the next picture. A
picture is converted to RGB only when asked (`Picture.rgb()`): a unit analyses 5 of the 10-25 frames a
camera sends each second, and converting the others is wasted work (docs/capture.md).
Each backend bounds its own waits (open and read timeouts through FFmpeg's interrupt callback);
edge.camera.capture adds a watchdog above that, because a read can still hang in code we do not control.

Backends:
- ``opencv``: OpenCV's FFmpeg backend (rtsp://, rtsps://, files) or its V4L2 backend (/dev/videoN).
- ``pyav``: FFmpeg through PyAV; reports decoder errors by name, per-camera RTSP transport.
- ``gstreamer``: a GStreamer pipeline through OpenCV's GStreamer backend; on Jetson the pipeline
  decodes in hardware (nvv4l2decoder). Needs an OpenCV built with GStreamer (JetPack's is).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edge.camera.urls import SourceKind, classify_url, redact_url

if TYPE_CHECKING:
    from edge.camera.config import CaptureConfig

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A camera could not be opened or read; the message says what to check."""


class EndOfStream(SourceError):
    """A video file was read to its end."""


@dataclass(frozen=True)
class Picture:
    """One decoded picture of `width` x `height`, not yet converted: `rgb()` gives it as RGB uint8 (H, W, 3)."""

    width: int
    height: int
    convert: Callable[[], np.ndarray]

    def rgb(self) -> np.ndarray:
        """The picture in RGB (converted now, at each call)."""
        return self.convert()


class Source(Protocol):
    """An opened camera. `read()` returns (the next picture, its presentation time in s or None)."""

    kind: SourceKind
    description: str

    def read(self) -> tuple[Picture, float | None]: ...

    def close(self) -> None: ...


def _out_size(w: int, h: int, width: int | None, height: int | None) -> tuple[int, int]:
    """The size a w x h picture is delivered at, given the camera's `width`/`height` settings (None: keep)."""
    if width is None and height is None:
        return w, h
    return width or max(1, round(w * height / h)), height or max(1, round(h * width / w))  # type: ignore[operator]


def _bgr_to_rgb(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if bgr.ndim == 2:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    elif bgr.shape[2] == 4:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    else:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if size == (rgb.shape[1], rgb.shape[0]):
        return rgb
    interp = cv2.INTER_AREA if size[0] < rgb.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


# FFmpeg may probe up to 5 s of a live stream by default and then hands the probed frames over at
# once; 1 s opens faster and keeps the first frames closer to live.
_PROBE_US = "1000000"

# OpenCV takes FFmpeg options only from this environment variable, read at each open: it is
# process-wide, so OpenCV cameras in one process share one RTSP transport (PyAV has no such limit).
_FFMPEG_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_env_lock = threading.Lock()
_env_ours: str | None = None


def _set_opencv_rtsp_transport(transport: str, camera_id: str) -> None:
    global _env_ours
    wanted = f"rtsp_transport;{transport}|analyzeduration;{_PROBE_US}"
    with _env_lock:
        current = os.environ.get(_FFMPEG_ENV)
        if current is not None and current != _env_ours:
            log.debug("camera %s: %s is set by the environment (%r); leaving it", camera_id, _FFMPEG_ENV, current)
            return
        if _env_ours is not None and _env_ours != wanted:
            log.warning(
                "camera %s: wants RTSP over %s but another OpenCV camera set %r; OpenCV's FFmpeg options are "
                'process-wide, use backend = "pyav" for per-camera transports',
                camera_id,
                transport,
                _env_ours,
            )
        os.environ[_FFMPEG_ENV] = wanted
        _env_ours = wanted


class OpenCVSource:
    """OpenCV VideoCapture: FFmpeg for URLs and files, V4L2 for devices, GStreamer for pipelines."""

    def __init__(self, cfg: CaptureConfig, kind: SourceKind, target: str | int, pipeline: str | None = None) -> None:
        # OpenCV holds one process-wide lock around every FFmpeg open unless told that FFmpeg is
        # thread-safe (it is since FFmpeg 4): without this, one camera whose open hangs keeps every
        # other camera of the unit dark until that open times out. An installer's own value wins.
        os.environ.setdefault("OPENCV_FFMPEG_IS_THREAD_SAFE", "1")
        import cv2

        self.kind = kind
        self.cfg = cfg
        self.description = f"opencv:{redact_url(target)}" if pipeline is None else "gstreamer pipeline"
        params: list[int] = []
        arg: str | int
        if pipeline is not None:
            if not opencv_has_gstreamer():
                raise SourceError(
                    "backend 'gstreamer' needs an OpenCV built with GStreamer (JetPack's OpenCV is; the pip "
                    'wheel opencv-python-headless is not): check `python -c "import cv2; '
                    "print(cv2.getBuildInformation())\"` or use backend 'opencv' / 'pyav'"
                )
            api, arg = cv2.CAP_GSTREAMER, pipeline
        elif kind == "v4l2":
            api, arg = cv2.CAP_V4L2, target
        else:
            api, arg = cv2.CAP_FFMPEG, target
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(cfg.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(cfg.read_timeout_s * 1000),
            ]
            if kind == "rtsp":
                _set_opencv_rtsp_transport(cfg.rtsp_transport, cfg.id)
        cap = cv2.VideoCapture(arg, api, params) if params else cv2.VideoCapture(arg, api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"could not open {self._what()}: {self._open_hint()}")
        self._cap = cap
        self._frames = 0
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None

    def _what(self) -> str:
        return self.description if self.kind != "rtsp" else f"{redact_url(self.cfg.url)} ({self.description})"

    def _open_hint(self) -> str:
        if self.kind == "rtsp":
            return (
                f"camera unreachable, wrong path or credentials, or no decodable video within "
                f"open_timeout_s={self.cfg.open_timeout_s:g}"
            )
        if self.kind == "v4l2":
            return "device missing, busy, or no permission (is the unit's user in the 'video' group?)"
        return "not a readable video file"

    def read(self) -> tuple[Picture, float | None]:
        import cv2

        t0 = time.monotonic()
        ok, bgr = self._cap.read()
        waited = time.monotonic() - t0
        if not ok or bgr is None:
            if self.kind == "file":
                raise EndOfStream(f"end of video file {self.cfg.url}")
            if not self._frames:
                raise SourceError(
                    "connected, but no decodable video arrived (garbage data, unsupported codec, or no frames "
                    f"within read_timeout_s={self.cfg.read_timeout_s:g})"
                )
            if waited >= self.cfg.read_timeout_s * 0.9:
                raise SourceError(f"no frame within read_timeout_s={self.cfg.read_timeout_s:g} (stream stalled?)")
            raise SourceError("stream ended (connection closed?) or sent an undecodable frame")
        if self.kind != "file" and waited >= self.cfg.read_timeout_s * 0.9:
            # FFmpeg holds the newest packet until the next one starts; a read timeout flushes it,
            # so this old frame is the sign of a stall, not of a live stream.
            raise SourceError(f"no new frame within read_timeout_s={self.cfg.read_timeout_s:g} (stream stalled?)")
        self._frames += 1
        pts = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 if self.kind == "file" else None
        size = _out_size(bgr.shape[1], bgr.shape[0], self.cfg.width, self.cfg.height)
        return Picture(size[0], size[1], partial(_bgr_to_rgb, bgr, size)), pts

    def close(self) -> None:
        self._cap.release()


class PyAVSource:
    """FFmpeg through PyAV, decoding packet by packet so decoder errors are seen and named."""

    # Consecutive packets that fail to decode before the stream is declared undecodable.
    MAX_DECODE_ERRORS = 50

    def __init__(self, cfg: CaptureConfig, kind: SourceKind, target: str | int) -> None:
        try:
            import av
        except ImportError:
            raise SourceError("backend 'pyav' needs the av package: pip install av (or use backend 'opencv')") from None

        self.kind = kind
        self.cfg = cfg
        self.description = f"pyav:{redact_url(target)}"
        options: dict[str, str] = {}
        fmt = None
        if kind == "rtsp":
            options = {"rtsp_transport": cfg.rtsp_transport, "analyzeduration": _PROBE_US}
        elif kind == "v4l2":
            fmt = "video4linux2"
            target = f"/dev/video{target}" if isinstance(target, int) else target
        try:
            self._container = av.open(
                str(target), format=fmt, options=options, timeout=(cfg.open_timeout_s, cfg.read_timeout_s)
            )
        except (av.FFmpegError, OSError) as e:
            raise SourceError(f"could not open {redact_url(cfg.url)} (pyav): {_av_message(e)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise SourceError(f"{redact_url(cfg.url)} has no video stream")
        self._stream = self._container.streams.video[0]
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else None
        self._packets = self._container.demux(self._stream)
        self._pending: deque = deque()
        self._frames = 0
        self._decode_errors = 0
        self._last_decode_error = ""

    def read(self) -> tuple[Picture, float | None]:
        import av

        errors = 0
        while not self._pending:
            t0 = time.monotonic()
            try:
                packet = next(self._packets)
            except StopIteration:
                if self.kind == "file":
                    raise EndOfStream(f"end of video file {self.cfg.url}") from None
                raise SourceError(f"stream ended (camera closed the connection){self.decode_note()}") from None
            except av.FFmpegError as e:
                if time.monotonic() - t0 >= self.cfg.read_timeout_s * 0.9:
                    raise self._silent_error() from None
                raise SourceError(f"read failed: {_av_message(e)}{self.decode_note()}") from None
            if self.kind != "file" and time.monotonic() - t0 >= self.cfg.read_timeout_s * 0.9:
                # A read timeout makes FFmpeg flush the packet it was holding: stale, not live.
                raise self._silent_error()
            try:
                self._pending.extend(packet.decode())
            except av.FFmpegError as e:
                errors += 1
                self._decode_errors += 1
                self._last_decode_error = _av_message(e)
                if errors >= self.MAX_DECODE_ERRORS:
                    raise SourceError(
                        f"undecodable stream: {errors} packets in a row failed ({self._last_decode_error})"
                    ) from None
        self._frames += 1
        frame = self._pending.popleft()
        w, h = _out_size(frame.width, frame.height, self.cfg.width, self.cfg.height)
        # The frame holds its own decoded buffer, so it converts safely on another thread later.
        picture = Picture(w, h, partial(frame.to_ndarray, format="rgb24", width=w, height=h))
        return picture, (float(frame.time) if frame.time is not None else None)

    def decode_note(self) -> str:
        """'; N packets failed to decode, last: ...' or '' when none did."""
        if not self._decode_errors:
            return ""
        return f"; {self._decode_errors} packets failed to decode, last: {self._last_decode_error}"

    def _silent_error(self) -> SourceError:
        t = f"read_timeout_s={self.cfg.read_timeout_s:g}"
        if not self._frames:
            return SourceError(
                f"connected, but no decodable video arrived within {t} (garbage data or unsupported codec?)"
                f"{self.decode_note()}"
            )
        return SourceError(f"no new data within {t} (stream stalled?){self.decode_note()}")

    def close(self) -> None:
        self._container.close()


def _av_message(e: BaseException) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    if "Immediate exit requested" in msg:
        return "timed out (open_timeout_s / read_timeout_s)"
    return f"{type(e).__name__}: {msg}"


def gstreamer_pipeline(
    kind: SourceKind,
    target: str | int,
    *,
    codec: str = "h264",
    decoder: str = "nvv4l2decoder",
    rtsp_transport: str = "tcp",
    latency_ms: int = 200,
    width: int | None = None,
    height: int | None = None,
) -> str:
    """A GStreamer pipeline string ending in an appsink that hands BGR pictures to OpenCV.

    With the default ``nvv4l2decoder`` (Jetson) the stream is decoded in hardware and scaled by
    ``nvvidconv``; any other decoder (``avdec_h264`` with gstreamer1.0-libav) decodes in software,
    which is how the pipeline is exercised off-Jetson. For example, for an RTSP camera on Jetson:

        rtspsrc location="rtsp://cam/stream" protocols=tcp latency=200 drop-on-latency=true
          ! rtph264depay ! h264parse ! nvv4l2decoder ! nvvidconv ! video/x-raw,format=BGRx
          ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false
    """
    if codec not in ("h264", "h265"):
        raise SourceError(f"codec must be 'h264' or 'h265', got {codec!r}")
    size = "".join(f",{k}={v}" for k, v in (("width", width), ("height", height)) if v)
    sink = "appsink drop=true max-buffers=1 sync=false"
    if kind == "v4l2":
        device = f"/dev/video{target}" if isinstance(target, int) else target
        return f"v4l2src device={device} ! videoconvert ! videoscale ! video/x-raw,format=BGR{size} ! {sink}"
    if kind == "rtsp":
        src = (
            f"rtspsrc location={_gst_quote(str(target))} protocols={rtsp_transport} latency={int(latency_ms)} "
            f"drop-on-latency=true ! rtp{codec}depay"
        )
    else:
        path = str(target)
        demux = "matroskademux" if path.lower().endswith((".mkv", ".webm")) else "qtdemux"
        src = f"filesrc location={_gst_quote(path)} ! {demux}"
    if decoder == "nvv4l2decoder":
        # nvvidconv scales in hardware and leaves NVMM memory; videoconvert only drops the alpha byte.
        convert = f"nvv4l2decoder ! nvvidconv ! video/x-raw,format=BGRx{size} ! videoconvert ! video/x-raw,format=BGR"
    else:
        convert = f"{decoder} ! videoconvert ! videoscale ! video/x-raw,format=BGR{size}"
    return f"{src} ! {codec}parse ! {convert} ! {sink}"


def opencv_has_gstreamer() -> bool:
    """Whether this OpenCV can read GStreamer pipelines (JetPack's can, the pip wheels cannot)."""
    import cv2

    return re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()) is not None


def _gst_quote(value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:@%?=&~+-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def open_source(cfg: CaptureConfig) -> Source:
    """Open the camera `cfg` describes with its backend; raises SourceError with what to check."""
    kind, target = classify_url(cfg.url)
    if cfg.backend == "pyav":
        return PyAVSource(cfg, kind, target)
    if cfg.backend == "gstreamer":
        pipeline = cfg.gst_pipeline or gstreamer_pipeline(
            kind,
            target,
            codec=cfg.codec,
            decoder=cfg.gst_decoder,
            rtsp_transport=cfg.rtsp_transport,
            latency_ms=cfg.gst_latency_ms,
            width=cfg.width,
            height=cfg.height,
        )
        log.debug("camera %s: gstreamer pipeline: %s", cfg.id, redact_url(pipeline))
        return OpenCVSource(cfg, kind, target, pipeline=pipeline)
    return OpenCVSource(cfg, kind, target)


__all__ = [
    "EndOfStream",
    "OpenCVSource",
    "Picture",
    "PyAVSource",
    "Source",
    "SourceError",
    "gstreamer_pipeline",
    "open_source",
    "opencv_has_gstreamer",
]
