"""A real RTSP server for the tests, built on GStreamer's gst-rtsp-server.

It runs under Debian's /usr/bin/python3 (python3-gi and gir1.2-gst-rtsp-server-1.0 live there,
not in the project's venv); tests/fixtures/rtsp.py starts it as a subprocess.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 \\
        --mount cam1=file:/tmp/clip.mp4 --mount pat=pattern:320x240@10 --mount bad=garbage

Mount kinds:
  file:PATH            an H.264 video file (mp4, mkv, ...), looped forever; the file's H.264 access
                       units are read once at start and re-sent with fresh timestamps, so looping needs
                       no re-encode and each client starts at the file's first key frame.
  pattern[:WxH@FPS]    a live videotestsrc encoded with x264 (costs CPU: keep it small).
  garbage[:FPS]        RTSP/RTP that works but carries random bytes as H.264: nothing decodes.

Control, one command per line on stdin, answered on stdout:
  stall MOUNT          stop sending frames on MOUNT; clients stay connected, no end-of-stream
  resume MOUNT         send frames again
  clients MOUNT        print how many media (client pipelines) are running for MOUNT
Prints "READY <port>" once it listens. Exits on SIGTERM/SIGINT or when stdin closes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def load_access_units(path: str) -> tuple[list[tuple[bytes, bool]], float, str]:
    """Read the H.264 access units of a video file: ([(bytes, is_keyframe)], fps, caps string)."""
    pipe = Gst.parse_launch(
        f'filesrc location="{path}" ! parsebin ! h264parse config-interval=-1 '
        "! video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=out sync=false"
    )
    sink = pipe.get_by_name("out")
    pipe.set_state(Gst.State.PLAYING)
    units: list[tuple[bytes, bool]] = []
    caps = None
    while True:
        sample = sink.emit("try-pull-sample", 10 * Gst.SECOND)
        if sample is None:
            break
        caps = caps or sample.get_caps()
        buf = sample.get_buffer()
        ok, info = buf.map(Gst.MapFlags.READ)
        if ok:
            units.append((bytes(info.data), not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)))
            buf.unmap(info)
    bus = pipe.get_bus()
    err = bus.pop_filtered(Gst.MessageType.ERROR)
    pipe.set_state(Gst.State.NULL)
    if err is not None:
        raise SystemExit(f"rtsp_server: cannot read {path}: {err.parse_error()[0].message}")
    if not units or caps is None:
        raise SystemExit(f"rtsp_server: no H.264 video found in {path}")
    st = caps.get_structure(0)
    ok, num, den = st.get_fraction("framerate")
    fps = num / den if ok and num > 0 and den > 0 else 10.0
    st = st.copy()
    st.remove_field("framerate")
    return units, fps, st.to_string()


class _Pusher(threading.Thread):
    """Feeds one client's appsrc at the mount's frame rate; pausing it is how a mount stalls."""

    def __init__(self, mount: _AppsrcMount, appsrc: Gst.Element) -> None:
        super().__init__(daemon=True)
        self.mount = mount
        self.appsrc = appsrc
        self.done = threading.Event()

    def run(self) -> None:
        i = 0
        period = 1.0 / self.mount.fps
        next_t = time.monotonic()
        while not self.done.is_set():
            if self.mount.stalled.is_set():
                self.done.wait(0.02)  # a stalled mount still stops at once
                next_t = time.monotonic()
                continue
            data = self.mount.unit(i)
            i += 1
            buf = Gst.Buffer.new_wrapped(data)
            buf.duration = int(Gst.SECOND * period)
            if self.appsrc.emit("push-buffer", buf) != Gst.FlowReturn.OK:
                return
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()


class _AppsrcMount(GstRtspServer.RTSPMediaFactory):
    """A mount whose H.264 access units come from Python: a looped file or random bytes."""

    def __init__(self, name: str, fps: float, caps: str) -> None:
        super().__init__()
        self.name = name
        self.fps = fps
        self.stalled = threading.Event()
        self.pushers: list[_Pusher] = []
        # Live appsrc timestamped on push: after a stall the stream simply continues.
        self.set_launch(
            f'( appsrc name=src is-live=true do-timestamp=true format=time caps="{caps}" ! rtph264pay name=pay0 pt=96 )'
        )
        self.set_shared(False)
        self.connect("media-configure", self._on_configure)

    def unit(self, i: int) -> bytes:
        raise NotImplementedError

    def stall(self, on: bool) -> None:
        if on:
            self.stalled.set()
        else:
            self.stalled.clear()

    def _on_configure(self, _factory, media: GstRtspServer.RTSPMedia) -> None:
        appsrc = media.get_element().get_by_name("src")
        pusher = _Pusher(self, appsrc)
        self.pushers = [p for p in self.pushers if not p.done.is_set()] + [pusher]
        media.connect("unprepared", lambda _m: pusher.done.set())
        pusher.start()

    def live_clients(self) -> int:
        return sum(1 for p in self.pushers if not p.done.is_set())


class FileMount(_AppsrcMount):
    def __init__(self, name: str, path: str) -> None:
        self.units, fps, caps = load_access_units(path)
        super().__init__(name, fps, caps)

    def unit(self, i: int) -> bytes:
        return self.units[i % len(self.units)][0]


class GarbageMount(_AppsrcMount):
    def __init__(self, name: str, fps: float) -> None:
        super().__init__(name, fps, "video/x-h264,stream-format=byte-stream,alignment=au")

    def unit(self, i: int) -> bytes:
        # A start code then a random NAL: well-formed RTP, undecodable picture data.
        return b"\x00\x00\x00\x01" + os.urandom(1200)


class PatternMount(GstRtspServer.RTSPMediaFactory):
    """Live test pattern; a valve dropping buffers stalls it without end-of-stream."""

    def __init__(self, name: str, width: int, height: int, fps: int) -> None:
        super().__init__()
        self.name = name
        self.valves: list[Gst.Element] = []
        self.set_launch(
            f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
            f"framerate={fps}/1 ! valve name=stall drop=false ! x264enc tune=zerolatency "
            f"speed-preset=ultrafast key-int-max={fps} ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
        )
        self.set_shared(False)
        self.connect("media-configure", self._on_configure)
        self._stalled = False

    def _on_configure(self, _factory, media: GstRtspServer.RTSPMedia) -> None:
        valve = media.get_element().get_by_name("stall")
        valve.set_property("drop", self._stalled)
        self.valves.append(valve)
        media.connect("unprepared", lambda _m: self.valves.remove(valve))

    def stall(self, on: bool) -> None:
        self._stalled = on
        for v in self.valves:
            v.set_property("drop", on)

    def live_clients(self) -> int:
        return len(self.valves)


def parse_mount(spec: str):
    name, sep, kind = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"rtsp_server: --mount must be NAME=KIND[:ARGS], got {spec!r}")
    if kind.startswith("file:"):
        return FileMount(name, kind[5:])
    if kind.startswith("pattern"):
        size, fps = "320x240", "10"
        if ":" in kind:
            size, _, fps = kind.split(":", 1)[1].partition("@")
        w, _, h = size.partition("x")
        return PatternMount(name, int(w), int(h), int(fps or 10))
    if kind.startswith("garbage"):
        rate = float(kind.split(":", 1)[1]) if ":" in kind else 10.0
        return GarbageMount(name, rate)
    raise SystemExit(f"rtsp_server: unknown mount kind in {spec!r} (file:PATH, pattern[:WxH@FPS], garbage[:FPS])")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mount", action="append", default=[], help="NAME=KIND[:ARGS], repeatable")
    args = ap.parse_args()

    Gst.init(None)
    mounts = {m.name: m for m in (parse_mount(s) for s in args.mount)}
    if not mounts:
        raise SystemExit("rtsp_server: give at least one --mount")

    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    points = server.get_mount_points()
    for name, factory in mounts.items():
        points.add_factory(f"/{name}", factory)
    if server.attach(None) == 0:
        raise SystemExit(f"rtsp_server: cannot listen on {args.host}:{args.port}")

    loop = GLib.MainLoop()

    def on_command(_fd, _cond) -> bool:
        line = sys.stdin.readline()
        if not line:
            loop.quit()
            return False
        cmd, _, name = line.strip().partition(" ")
        mount = mounts.get(name)
        if mount is None or cmd not in ("stall", "resume", "clients"):
            _say(f"ERR {line.strip()!r}: commands are stall|resume|clients MOUNT; mounts: {sorted(mounts)}")
        elif cmd == "stall":
            mount.stall(True)
            _say(f"OK stall {name}")
        elif cmd == "resume":
            mount.stall(False)
            _say(f"OK resume {name}")
        else:
            _say(f"OK clients {name} {mount.live_clients()}")
        return True

    # Periodic server housekeeping closes sessions of clients that vanished without TEARDOWN.
    GLib.timeout_add_seconds(2, lambda: (server.get_session_pool().cleanup(), True)[1])
    GLib.io_add_watch(sys.stdin.fileno(), GLib.IO_IN | GLib.IO_HUP, on_command)
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    _say(f"READY {args.port}")
    loop.run()


if __name__ == "__main__":
    main()
