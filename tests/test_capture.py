"""Camera readers against a real RTSP server (GStreamer) serving clips composed from real faces."""

from __future__ import annotations

import pathlib
import subprocess
import time

import numpy as np
import pytest
from pydantic import ValidationError

from edge.camera.capture import CameraReader, CameraState
from edge.camera.config import CaptureConfig
from edge.camera.sources import gstreamer_pipeline, opencv_has_gstreamer
from edge.camera.urls import classify_url, redact_url
from testing.broker import wait_for
from testing.media import background
from testing.rtsp import SYSTEM_PYTHON, gst_rtsp_problem
from tests.services import missing_service

BACKENDS = ["pyav", "opencv"]

# Short timeouts keep the suite quick; production defaults are longer (docs/capture.md).
FAST = dict(open_timeout_s=3.0, read_timeout_s=2.0, stall_timeout_s=2.0, reconnect_min_s=0.2, reconnect_max_s=1.0)


@pytest.fixture
def readers():
    """Build readers that are stopped when the test ends, whatever happens."""
    made: list[CameraReader] = []

    def make(on_state=None, **cfg) -> CameraReader:
        reader = CameraReader(CaptureConfig(**{**FAST, **cfg}), on_state=on_state)
        made.append(reader)
        reader.start()
        return reader

    yield make
    for r in made:
        r.stop(timeout=3)


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, key, words",
    [
        ({"url": "http://cam/stream"}, "url", "scheme 'http' is not supported"),
        ({"url": "rtsp:///nohost"}, "url", "has no host"),
        ({"url": "/nonexistent/clip.mp4"}, "url", "does not exist"),
        ({"url": "/dev/sda"}, "url", "/dev/videoN"),
        ({"url": ""}, "url", "empty"),
        ({"url": -1}, "url", "index must be >= 0"),
        ({"id": "gate 1"}, "id", "pattern"),
        ({"read_timeout_s": 0}, "read_timeout_s", "greater than 0"),
        ({"stall_timeout_s": -5}, "stall_timeout_s", "greater than 0"),
        ({"backend": "vlc"}, "backend", "'opencv', 'pyav' or 'gstreamer'"),
        ({"width": 0}, "width", "greater than or equal to 16"),
        ({"rtsp_transport": "http"}, "rtsp_transport", "'tcp' or 'udp'"),
        ({"reconnect_min_s": 10, "reconnect_max_s": 5}, "reconnect_min_s", "must not exceed reconnect_max_s"),
        ({"gst_pipeline": "videotestsrc ! appsink"}, "gst_pipeline", 'backend = "gstreamer"'),
        ({"fps_limit": 5}, "fps_limit", "Extra inputs are not permitted"),
    ],
)
def test_bad_config_values_name_the_key(values, key, words):
    with pytest.raises(ValidationError) as err:
        CaptureConfig(**{"id": "gate-1", "url": "rtsp://127.0.0.1:8554/cam1", **values})
    text = str(err.value)
    assert key in text and words in text, text


def test_accepted_sources_are_classified(face_clip: pathlib.Path):
    assert classify_url("rtsp://user:pw@10.0.0.5:554/Streaming/101") == (
        "rtsp",
        "rtsp://user:pw@10.0.0.5:554/Streaming/101",
    )
    assert classify_url("rtsps://cam.local/s")[0] == "rtsp"
    assert classify_url(str(face_clip)) == ("file", str(face_clip))
    assert classify_url(f"file://{face_clip}") == ("file", str(face_clip))
    assert classify_url("/dev/video2") == ("v4l2", "/dev/video2")
    assert classify_url("0") == ("v4l2", 0)
    assert CaptureConfig(id="usb", url=1).url == 1
    assert CaptureConfig(id="c", url="rtsp://h/s").backend == "pyav"


def test_passwords_never_reach_state_or_logs(readers, caplog):
    url = "rtsp://admin:hunter2@127.0.0.1:9/stream"  # port 9 (discard): refused at once
    assert redact_url(url) == "rtsp://admin:***@127.0.0.1:9/stream"
    reader = readers(id="locked", url=url)
    wait_for(lambda: reader.state.last_error is not None, 5, what="reader.state.last_error is not None")
    reader.stop()
    assert "hunter2" not in reader.state.last_error
    assert "hunter2" not in caplog.text
    assert "admin:***@" in caplog.text


# -- RTSP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_arrive_newest_first_without_backlog(backend, rtsp_server, readers):
    reader = readers(id="cam1", url=rtsp_server.url("cam1"), backend=backend)
    first = reader.latest(timeout=10)
    assert first is not None, reader.state
    assert first.camera_id == "cam1" and first.image.shape == (360, 640, 3) and first.image.dtype == np.uint8
    # RGB, not OpenCV's BGR: the clip's top-left background pixel is known.
    corner = first.image[4:12, 4:12].reshape(-1, 3).mean(axis=0)
    assert np.abs(corner - background((640, 360))[8, 8]).max() < 20, corner

    seqs = [first.seq]
    for _ in range(5):
        f = reader.latest(after_seq=seqs[-1], timeout=3)
        assert f is not None, reader.state
        seqs.append(f.seq)
    assert seqs == sorted(set(seqs))

    # A consumer that falls ten frames behind gets the present frame, not the next one in a queue.
    before = reader.latest(after_seq=-1, timeout=1)
    wait_for(lambda: reader.state.frames >= before.seq + 11, 10, what=lambda: f"ten more frames: {reader.state}")
    decoded = reader.state.frames
    after = reader.latest(after_seq=before.seq, timeout=1)
    assert after.seq >= decoded - 1 and after.seq - before.seq >= 10, (before.seq, after.seq, decoded)
    assert reader.latest(after_seq=after.seq + 1000, timeout=0.2) is None

    state = reader.state
    assert state.up and state.camera_id == "cam1" and state.frames >= after.seq + 1 and state.fps > 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_killed_then_restarted_reader_reconnects(backend, rtsp_server, readers):
    seen: list[CameraState] = []
    reader = readers(on_state=seen.append, id="cam1", url=rtsp_server.url("cam1"), backend=backend)
    before = reader.latest(timeout=10)
    assert before is not None and reader.state.up

    rtsp_server.kill()
    wait_for(lambda: not reader.state.up, 4, what=lambda: f"not reader.state.up: {reader.state}")
    down = reader.state
    assert down.last_error and down.since >= before.captured_at
    # Several refused reconnects while the server is away, and the camera stays down through them.
    wait_for(lambda: reader.state.reconnects >= 2, 10, what=lambda: f"two reconnects: {reader.state}")
    assert not reader.state.up

    last = reader.latest(timeout=0).seq
    rtsp_server.restart()
    after = reader.latest(after_seq=last, timeout=10)
    assert after is not None, reader.state
    wait_for(lambda: reader.state.up, 2, what="reader.state.up")
    assert reader.latest(after_seq=after.seq, timeout=3) is not None  # frames keep coming
    ups = [s.up for s in seen]
    assert ups[:2] == [True, False] and True in ups[2:], ups


@pytest.mark.parametrize("backend", BACKENDS)
def test_stalled_stream_is_detected_by_the_watchdog(backend, rtsp_server, readers):
    # The backend's read timeout is set far beyond the stall timeout: only the watchdog can notice.
    reader = readers(id="cam1", url=rtsp_server.url("cam1"), backend=backend, read_timeout_s=30, stall_timeout_s=1.5)
    assert reader.latest(timeout=10) is not None, reader.state
    rtsp_server.stall("cam1")
    t0 = time.monotonic()
    wait_for(lambda: not reader.state.up, 1.5 + 1.0, what=lambda: f"not reader.state.up: {reader.state}")
    assert time.monotonic() - t0 <= 2.5
    assert "stall_timeout_s=1.5" in reader.state.last_error
    last = reader.latest(timeout=0).seq

    rtsp_server.resume("cam1")
    assert reader.latest(after_seq=last, timeout=10) is not None, reader.state
    assert reader.state.up and reader.state.reconnects >= 1
    # The abandoned connection is closed once its blocked read returns: no leaked sessions.
    wait_for(
        lambda: rtsp_server.clients("cam1") == 1, 15, what=lambda: f"one client, has {rtsp_server.clients('cam1')}"
    )
    reader.stop()
    wait_for(lambda: rtsp_server.clients("cam1") == 0, 15, what=lambda: f"no client, has {rtsp_server.clients('cam1')}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_stream_marks_that_camera_down_and_others_keep_running(backend, rtsp_server, readers):
    bad = readers(id="bad", url=rtsp_server.url("bad"), backend=backend)
    good = readers(id="cam2", url=rtsp_server.url("cam2"), backend=backend)
    first = good.latest(timeout=10)
    assert first is not None, good.state
    wait_for(lambda: bad.state.reconnects >= 1, 10, what=lambda: f"bad.state.reconnects >= 1: {bad.state}")

    seq = first.seq
    for _ in range(10):  # the healthy camera keeps delivering while the bad one fails and retries
        f = good.latest(after_seq=seq, timeout=2)
        assert f is not None, good.state
        seq = f.seq
    state = bad.state
    assert not state.up and state.frames == 0 and state.reconnects >= 1
    assert "decod" in state.last_error or "open" in state.last_error, state.last_error
    assert good.state.up


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hung_camera_does_not_hold_up_the_others_opening(backend, rtsp_server, readers):
    """OpenCV serialises FFmpeg opens process-wide unless told FFmpeg is thread-safe: one camera
    whose open hangs would keep every other camera of the unit dark for its whole open timeout."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            accepted.set()

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        hung = readers(id="hung", url=f"rtsp://127.0.0.1:{port}/cam", backend=backend, open_timeout_s=60.0)
        assert accepted.wait(10), hung.state
        good = readers(id="cam2", url=rtsp_server.url("cam2"), backend=backend)
        first = good.latest(timeout=20)
        assert first is not None, good.state
        state = hung.state
        assert not state.up and state.reconnects == 0 and state.last_error is None, state  # still opening
    finally:
        listener.close()
        for conn in held:
            conn.close()


# -- files --------------------------------------------------------------------------------------


def test_file_plays_at_native_rate_and_loops(face_clip: pathlib.Path, readers):
    reader = readers(id="demo", url=str(face_clip), loop=True)
    # A 10 fps clip paced as it plays: ten frames take at least 0.9 s of the clip's time, where a
    # flat-out read would hand over all 60 at once. A slow machine only makes them further apart.
    frames = [reader.latest(timeout=10)]
    while len(frames) < 11:
        frames.append(reader.latest(after_seq=frames[-1].seq, timeout=10))
        assert frames[-1] is not None, reader.state
    assert frames[-1].seq - frames[0].seq <= 12, [f.seq for f in frames]  # read as they come, none queued
    assert frames[-1].captured_at - frames[0].captured_at >= 0.8, [f.captured_at for f in frames]
    reader.stop()

    fast = readers(id="fast", url=str(face_clip), realtime=False, width=320)
    wait_for(lambda: fast.finished, 10, what=lambda: f"fast.finished: {fast.state}")
    assert fast.state.frames == 60 and not fast.state.up and "end of file" in fast.state.last_error
    assert fast.latest(timeout=0).image.shape == (180, 320, 3)
    assert fast.latest(after_seq=59, timeout=0.5) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_frames_asked_for_are_converted_each_once(backend, face_clip: pathlib.Path, readers):
    reader = readers(id="lazy", url=str(face_clip), realtime=False, backend=backend)
    wait_for(lambda: reader.finished, 10, what=lambda: f"reader.finished: {reader.state}")
    assert reader.state.frames == 60 and reader.state.converted == 0
    first = reader.latest(timeout=0)
    assert first is not None and first.seq == 59 and first.image.shape == (360, 640, 3)
    assert reader.latest(after_seq=58, timeout=0) is first  # a second consumer gets the same conversion
    assert reader.state.converted == 1


def test_a_picture_that_cannot_be_converted_is_skipped_for_the_next(
    face_clip: pathlib.Path, readers, monkeypatch, caplog
):
    import threading

    import edge.camera.capture as capture
    from edge.camera.sources import Picture

    real_open = capture.open_source
    go_on = threading.Event()

    def open_damaging(cfg):
        # The real source, with its 11th picture damaged and its 12th held back until the test lets it come.
        source = real_open(cfg)
        real_read, count = source.read, [0]

        def read():
            count[0] += 1
            if count[0] == 12:
                go_on.wait(10)
            picture, pts = real_read()
            if count[0] == 11:

                def broken():
                    raise ValueError("bad chroma plane")

                picture = Picture(picture.width, picture.height, broken)
            return picture, pts

        source.read = read
        return source

    monkeypatch.setattr(capture, "open_source", open_damaging)
    reader = readers(id="dmg", url=str(face_clip), realtime=False)
    wait_for(lambda: reader.state.frames == 11, 10, what=lambda: f"11 frames: {reader.state}")
    with caplog.at_level("WARNING", logger="edge.camera.capture"):
        assert reader.latest(after_seq=9, timeout=0.3) is None
    assert "camera dmg: picture 10 could not be converted to RGB (1 so far): bad chroma plane" in caplog.text
    go_on.set()
    # The reader keeps only the newest picture and reads a file as fast as it can once let go, so
    # the next good frame is the 11th or a later one, never the damaged 10th.
    after = reader.latest(after_seq=9, timeout=5)
    assert after is not None and after.seq >= 11 and after.image.shape == (360, 640, 3)
    assert reader.state.up


def test_looping_file_goes_past_its_end(tmp_path: pathlib.Path, readers):
    from testing.media import astronaut_face, make_face_clip

    clip = make_face_clip(
        tmp_path / "short.mkv", [(astronaut_face(), 0, 1, 10, 10, 100)], size=(320, 240), fps=20, seconds=1
    )
    reader = readers(id="loop", url=str(clip), loop=True, realtime=False, backend="opencv")
    assert reader.latest(after_seq=60, timeout=10) is not None, reader.state
    assert reader.state.up and reader.state.reconnects == 0


# -- GStreamer (Jetson) -------------------------------------------------------------------------


def test_gstreamer_pipeline_for_jetson_names_the_hardware_decoder():
    p = gstreamer_pipeline("rtsp", "rtsp://u:p@cam/s", width=1280, height=720)
    assert p.startswith("rtspsrc location=rtsp://u:p@cam/s protocols=tcp latency=200")
    assert "rtph264depay ! h264parse ! nvv4l2decoder ! nvvidconv ! video/x-raw,format=BGRx,width=1280,height=720" in p
    assert p.endswith("video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")
    assert "rtph265depay ! h265parse" in gstreamer_pipeline("rtsp", "rtsp://cam/s", codec="h265")
    assert gstreamer_pipeline("file", "/v/a b.mkv").startswith('filesrc location="/v/a b.mkv" ! matroskademux')


_PULL = """
import sys, gi
gi.require_version("Gst", "1.0")
from gi.repository import Gst
Gst.init(None)
pipe = Gst.parse_launch(sys.argv[1])
ok, sink = pipe.iterate_sinks().next()
pipe.set_state(Gst.State.PLAYING)
got = [sink.emit("try-pull-sample", 10 * Gst.SECOND) for _ in range(3)]
err = pipe.get_bus().pop_filtered(Gst.MessageType.ERROR)
pipe.set_state(Gst.State.NULL)
caps = got[-1].get_caps().get_structure(0) if got[-1] else None
print(sum(s is not None for s in got), caps.get_value("format") if caps else None,
      caps.get_value("width") if caps else None, err.parse_error()[0].message if err else "")
"""


def test_gstreamer_pipeline_runs_with_a_software_decoder(rtsp_server):
    """The same pipeline with avdec_h264 in place of nvv4l2decoder, run by GStreamer itself."""
    problem = gst_rtsp_problem("rtspsrc", "avdec_h264")
    if problem:
        missing_service(problem)
    pipe = gstreamer_pipeline("rtsp", rtsp_server.url("cam1"), decoder="avdec_h264", width=320, height=180)
    out = subprocess.run([SYSTEM_PYTHON, "-c", _PULL, pipe], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["3", "BGR", "320"], out.stdout + out.stderr


def test_gstreamer_backend_reports_an_opencv_without_gstreamer(rtsp_server, readers):
    reader = readers(id="jetson", url=rtsp_server.url("cam1"), backend="gstreamer", gst_decoder="avdec_h264")
    if opencv_has_gstreamer():
        assert reader.latest(timeout=10) is not None, reader.state
    else:
        wait_for(lambda: reader.state.last_error is not None, 5, what="reader.state.last_error is not None")
        assert "OpenCV built with GStreamer" in reader.state.last_error and not reader.state.up


# -- the clip helper other tests build on -------------------------------------------------------


def _decoded_frames(path: pathlib.Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _placed(face: np.ndarray, height: int) -> np.ndarray:
    import cv2

    width = round(face.shape[1] * height / face.shape[0])
    return cv2.resize(face, (width, height), interpolation=cv2.INTER_AREA).astype(np.int16)


def test_face_clip_shows_each_face_only_in_its_time_window(tmp_path: pathlib.Path):
    from testing.media import astronaut_face, make_face_clip

    face = astronaut_face()
    clip = make_face_clip(
        tmp_path / "two.mp4",
        [(face, 1.0, 2.0, 40, 30, 120), (face, 1.5, 3.0, 400, 100, 90)],
        size=(640, 360),
        fps=10,
        seconds=3,
    )
    frames = _decoded_frames(clip)
    assert len(frames) == 30 and frames[0].shape == (360, 640, 3)
    a, b = _placed(face, 120), _placed(face, 90)

    def shows(frame, want, x, y):
        region = frame[y : y + want.shape[0], x : x + want.shape[1]].astype(np.int16)
        return float(np.abs(region - want).mean()) < 12

    visible = [(shows(f, a, 40, 30), shows(f, b, 400, 100)) for f in frames]
    assert [v[0] for v in visible] == [10 <= i < 20 for i in range(30)]
    assert [v[1] for v in visible] == [15 <= i < 30 for i in range(30)]


@pytest.mark.data
def test_face_clip_from_the_cross_age_set(lag_dir, tmp_path: pathlib.Path):
    from testing.media import lag_people, load_rgb, make_face_clip, with_margin

    people = lag_people(2, seed=1, lag_dir=lag_dir)
    assert len(people) == 2 and people[0].name != people[1].name and people[0].young and people[0].adult
    adult = with_margin(load_rgb(people[0].adult[0]))
    assert adult.shape[0] > 100
    clip = make_face_clip(tmp_path / "lag.mp4", [(adult, 0.0, 1.0, 100, 50, 200)], size=(640, 360), seconds=1)
    frames = _decoded_frames(clip)
    want = _placed(adult, 200)
    region = frames[5][50 : 50 + want.shape[0], 100 : 100 + want.shape[1]].astype(np.int16)
    assert float(np.abs(region - want).mean()) < 12
