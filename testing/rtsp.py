"""A real RTSP server for tests: GStreamer's gst-rtsp-server in a subprocess (testing/rtsp_server.py).

    def test_x(rtsp_server_factory, face_clip):
        srv = rtsp_server_factory({"cam1": face_clip, "bad": "garbage", "pat": "pattern:320x240@10"})
        url = srv.url("cam1")          # rtsp://127.0.0.1:PORT/cam1
        srv.stall("cam1"); srv.resume("cam1")   # connected, no frames, no end-of-stream
        srv.kill(); srv.restart()      # crash and come back on the same port

The server runs under Debian's /usr/bin/python3 (python3-gi, gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-{base,good,bad,ugly}); tests skip with a message naming what is missing.
"""

from __future__ import annotations

import functools
import os
import pathlib
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping

SYSTEM_PYTHON = os.environ.get("CHECKPOINT_GST_PYTHON", "/usr/bin/python3")
SERVER_SCRIPT = pathlib.Path(__file__).resolve().parent / "rtsp_server.py"
DEBIAN_PACKAGES = (
    "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)
_NEEDED_ELEMENTS = (
    "appsrc",
    "appsink",
    "filesrc",
    "parsebin",
    "h264parse",
    "rtph264pay",
    "videotestsrc",
    "x264enc",
    "valve",
)

_PROBE = """
import sys, gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in sys.argv[1:] if Gst.ElementFactory.find(e) is None]
print("missing GStreamer elements: " + " ".join(missing) if missing else "ok")
"""


class RtspServerError(RuntimeError):
    """The test RTSP server did not start or did not answer a command."""


@functools.lru_cache(maxsize=8)
def gst_rtsp_problem(*extra_elements: str) -> str | None:
    """Why the GStreamer RTSP server (and any `extra_elements`) cannot run here, or None when it can."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"needs {SYSTEM_PYTHON} with GStreamer's RTSP server (apt-get install {DEBIAN_PACKAGES})"
    try:
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", _PROBE, *_NEEDED_ELEMENTS, *extra_elements],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "probing GStreamer timed out"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"needs python3-gi and gir1.2-gst-rtsp-server-1.0 for {SYSTEM_PYTHON} ({last}); apt-get install {DEBIAN_PACKAGES}"
    if out.stdout.strip() != "ok":
        return f"{out.stdout.strip()}; apt-get install {DEBIAN_PACKAGES}"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _mount_arg(name: str, spec: str | os.PathLike) -> str:
    if isinstance(spec, os.PathLike) or not str(spec).startswith(("pattern", "garbage", "file:")):
        path = pathlib.Path(spec)
        if not path.is_file():
            raise RtspServerError(f"mount {name!r}: video file {path} does not exist")
        return f"{name}=file:{path}"
    return f"{name}={spec}"


class RtspServer:
    """One gst-rtsp-server process on a fixed loopback port, with kill/restart and stall/resume."""

    def __init__(self, mounts: Mapping[str, str | os.PathLike], log_dir: pathlib.Path, port: int | None = None) -> None:
        if not mounts:
            raise RtspServerError("give at least one mount")
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.mounts = dict(mounts)
        self._args = [a for name, spec in self.mounts.items() for a in ("--mount", _mount_arg(name, spec))]
        self.log_path = log_dir / f"rtsp_server_{self.port}.log"
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def url(self, mount: str) -> str:
        """The rtsp:// URL of a mount."""
        if mount not in self.mounts:
            raise RtspServerError(f"no mount {mount!r}; mounts: {sorted(self.mounts)}")
        return f"rtsp://{self.host}:{self.port}/{mount}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> RtspServer:
        """Start the server and wait until it listens; retries while the port is still being released."""
        if self.running:
            raise RtspServerError("server already running")
        deadline = time.monotonic() + timeout
        while True:
            self._spawn()
            line = self._next_line(max(0.5, deadline - time.monotonic()))
            if line is not None and line.startswith("READY"):
                return self
            self._reap()
            if time.monotonic() >= deadline:
                raise RtspServerError(f"RTSP server did not start on port {self.port}: {self._log_tail()}")
            time.sleep(0.2)

    def _spawn(self) -> None:
        self._lines = queue.Queue()
        log = open(self.log_path, "ab")  # the child owns it from here
        self._proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--host", self.host, "--port", str(self.port), *self._args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
        )
        log.close()
        threading.Thread(target=self._pump, args=(self._proc, self._lines), daemon=True).start()

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line.strip())
        lines.put(None)

    def _next_line(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:] or "(no output)"
        except OSError:
            return "(no log)"

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send one control command (stall/resume/clients MOUNT) and return the server's answer."""
        if not self.running:
            raise RtspServerError(f"server is not running; cannot send {line!r}")
        self._proc.stdin.write(line + "\n")  # type: ignore[union-attr]
        self._proc.stdin.flush()  # type: ignore[union-attr]
        answer = self._next_line(timeout)
        if answer is None or not answer.startswith("OK"):
            raise RtspServerError(f"server answered {answer!r} to {line!r}: {self._log_tail()}")
        return answer

    def stall(self, mount: str) -> None:
        """Stop sending frames on `mount`: clients stay connected and get no end-of-stream."""
        self.url(mount)
        self.command(f"stall {mount}")

    def resume(self, mount: str) -> None:
        """Send frames on `mount` again."""
        self.url(mount)
        self.command(f"resume {mount}")

    def clients(self, mount: str) -> int:
        """How many client pipelines are serving `mount` now."""
        self.url(mount)
        return int(self.command(f"clients {mount}").split()[-1])

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), like a camera losing power."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._reap()

    def restart(self, timeout: float = 20.0) -> RtspServer:
        """Start again on the same port (after kill or stop)."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Stop the server cleanly (SIGTERM), killing it if it does not go within 5 s."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except (OSError, ValueError):
                    pass
        self._proc = None

    def __enter__(self) -> RtspServer:
        return self if self.running else self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
