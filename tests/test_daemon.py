"""The unit end to end: a real RTSP server, the real engine, a signed watchlist, `edge run` under a
systemd-style notify socket, SIGTERM; cameras failing and coming back while the others run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from common.version import software_version
from testing.broker import wait_for
from testing.media import make_face_clip
from tests.edge_support import People, signed_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loop_clip(tmp_path_factory: pytest.TempPathFactory, people: People) -> Path:
    """4 s, looped by the server: the enrolled person 0.5-2.5 s, the other person 0.5-3.5 s."""
    return make_face_clip(
        tmp_path_factory.mktemp("clips") / "loop.mp4",
        [(people.enrolled_face, 0.5, 2.5, 40, 60, 180), (people.other_face, 0.5, 3.5, 380, 60, 180)],
        size=(640, 360),
        fps=10,
        seconds=4.0,
    )


def unit_toml(tmp: Path, root_pub: Path, store: Path, cameras: dict[str, str], cooldown_s: float = 1.0) -> Path:
    cams = "".join(
        f"""
[[cameras]]
id = "{cid}"
url = "{url}"
analysis_fps = 5
open_timeout_s = 3
read_timeout_s = 2
stall_timeout_s = 2
reconnect_min_s = 0.2
reconnect_max_s = 1
"""
        for cid, url in cameras.items()
    )
    text = f"""
[unit]
id = "unit-e2e"
site = "test-site"
{cams}
[matching]
cooldown_s = {cooldown_s}

[watchlist]
root_key = "{root_pub}"
store = "{store}"

[sinks.jsonl]
path = "hits.jsonl"

[logging]
stats_interval_s = 1
"""
    path = tmp / "unit.toml"
    path.write_text(text)
    return path


def read_hits(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    # The sink may be midway through a line: only whole lines (ending in a newline) are records.
    return [json.loads(x) for x in path.read_text().splitlines(keepends=True) if x.endswith("\n") and x.strip()]


class NotifyListener:
    """A unix datagram socket standing in for systemd's notify socket; keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def has(self, key: str) -> list[dict[str, str]]:
        return [m for m in self.messages if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture()
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_edge_run_under_systemd_notify_then_sigterm(
    rtsp_server_factory: Any, loop_clip: Path, people: People, tmp_path: Path, notify_socket: NotifyListener
) -> None:
    srv = rtsp_server_factory({"gate": loop_clip})
    root_pub, store = signed_store(tmp_path, people)
    config = unit_toml(tmp_path, root_pub, store, {"gate": srv.url("gate")})
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="2000000", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "edge.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = wait_for(lambda: notify_socket.has("READY"), 40, "READY=1 from edge run")
        assert "cameras up" in ready[0].get("STATUS", "") or "cameras up" in json.dumps(notify_socket.messages)
        hits = wait_for(lambda: read_hits(tmp_path / "hits.jsonl"), 20, "a hit in hits.jsonl")
        wait_for(lambda: notify_socket.has("WATCHDOG"), 5, "a WATCHDOG=1 ping")
        wait_for(lambda: "fps analysed" in log_path.read_text(), 5, "a per-camera figures line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log_text = log_path.read_text()
    assert notify_socket.has("STOPPING"), notify_socket.messages
    hits = read_hits(tmp_path / "hits.jsonl")
    assert hits and all(h["person_id"] == people.enrolled_id for h in hits), hits
    assert all(h["unit_id"] == "unit-e2e" and h["camera_id"] == "gate" for h in hits)
    # One hit per appearance: the face shows once per 4 s loop, so at most one hit per loop (and a spare).
    ran_s = max(h["captured_at"] for h in hits) - min(h["captured_at"] for h in hits)
    assert len(hits) <= ran_s / 4.0 + 2, hits
    assert "received SIGTERM" in log_text and "stopped;" in log_text
    assert "camera gate: up" in log_text and "fps analysed" in log_text


def test_cameras_fail_and_recover_while_others_run(
    rtsp_server_factory: Any, loop_clip: Path, people: People, engine: Any, tmp_path: Path
) -> None:
    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier

    srv = rtsp_server_factory({"gate": loop_clip, "noise": "garbage"})
    root_pub, store = signed_store(tmp_path, people)
    config = unit_toml(tmp_path, root_pub, store, {"gate": srv.url("gate"), "noise": srv.url("noise")})
    daemon = Daemon(load_config(config), engine=engine, notifier=Notifier(environ={}))
    hits_file = tmp_path / "hits.jsonl"

    def cam(cid: str) -> dict[str, Any]:
        return next(c for c in daemon.status()["cameras"] if c["id"] == cid)

    daemon.start()
    try:
        # The garbage stream is marked down with a reason; the good camera runs and hits.
        wait_for(lambda: read_hits(hits_file), 20, "a first hit")
        wait_for(lambda: not cam("noise")["up"] and cam("noise")["last_error"], 15, "the garbage camera marked down")
        assert cam("gate")["up"]
        status = daemon.status()
        assert status["watchlist"]["version"] == 1 and status["watchlist"]["persons"] == 1
        assert status["cameras_total"] == 2 and status["cameras_up"] == 1
        json.dumps(status)  # the heartbeat carries it as JSON

        # A stream that stalls without closing is detected.
        srv.stall("gate")
        wait_for(lambda: not cam("gate")["up"], 10, "the stalled camera marked down")
        assert "stall" in (cam("gate")["last_error"] or ""), cam("gate")
        srv.resume("gate")
        wait_for(lambda: cam("gate")["up"], 15, "the camera back after the stall")
        # Up again: the error is no longer current, but kept (with its time) for whoever looks.
        back = cam("gate")
        assert back["last_error"] is None and "stall" in back["previous_error"], back
        assert back["previous_error_at"] <= time.time() and status["warnings"] == []
        assert status["software_version"] == software_version()

        # The server dies and comes back: the camera reconnects and hits resume.
        srv.kill()
        wait_for(lambda: not cam("gate")["up"], 10, "the camera marked down after the server died")
        restarted = time.time()
        srv.restart()
        wait_for(lambda: cam("gate")["up"], 20, "the camera up after the server restart")
        wait_for(
            lambda: [h for h in read_hits(hits_file) if h["captured_at"] > restarted], 20, "a hit after the restart"
        )
        assert cam("gate")["reconnects"] >= 2
    finally:
        daemon.stop()
    hits = read_hits(hits_file)
    assert hits and {h["person_id"] for h in hits} == {people.enrolled_id}
    assert {h["camera_id"] for h in hits} == {"gate"}
    assert not [t for t in threading.enumerate() if t.name.startswith(("sample-", "detect-", "embed"))]


def test_the_unit_warns_while_it_has_no_list_or_an_expired_one(
    rtsp_server_factory: Any, loop_clip: Path, people: People, engine: Any, tmp_path: Path, caplog: Any
) -> None:
    import logging

    from edge.cli import main as edge_cli
    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier

    srv = rtsp_server_factory({"gate": loop_clip})
    root_pub, filled = signed_store(tmp_path / "hq", people)
    empty = tmp_path / "unit-state" / "empty.db"
    empty.parent.mkdir()
    config = unit_toml(tmp_path, root_pub, empty, {"gate": srv.url("gate")})
    daemon = Daemon(load_config(config), engine=engine, notifier=Notifier(environ={}))
    caplog.set_level(logging.INFO, logger="edge.daemon")
    daemon.start()
    try:
        (warning,) = daemon.status()["warnings"]
        assert warning.startswith("running with no watchlist: no face can match")
        assert [r for r in caplog.records if r.levelno == logging.WARNING and "no watchlist" in r.getMessage()]
        # The list arrives (here from a file, as `edge watchlist apply` does): the warning clears.
        bundle = tmp_path / "hq" / "watchlist-v1.cpwl"
        applied = CliRunner().invoke(
            edge_cli,
            [
                "watchlist",
                "apply",
                str(bundle),
                "--store",
                str(empty),
                "--root-key",
                str(root_pub),
                "--model-id",
                engine.model_id,
            ],
        )
        assert applied.exit_code == 0, applied.output
        daemon._tick_watchlist()
        daemon._log_warnings()
        assert daemon.status()["warnings"] == [] and daemon.status()["watchlist"]["version"] == 1
        assert any("resolved: running with no watchlist" in r.getMessage() for r in caplog.records)
        # A month later the list has expired: warned again, in the status the heartbeat carries.
        daemon.watchlist.clock = lambda: time.time() + 30 * 86400
        (expired,) = daemon.warnings()
        assert expired.startswith("watchlist version 1 expired at 20") and "still matching it" in expired
        daemon._log_warnings()
        assert [r for r in caplog.records if r.levelno == logging.WARNING and "expired at" in r.getMessage()]
    finally:
        daemon.stop()
    assert filled.exists()


def test_run_with_bad_config_exits_2_with_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "unit.toml"
    bad.write_text('[unit]\nid = "u"\nsite = "s"\n[[cameras]]\nid = "c"\nurl = "ftp://x/y"\n')
    out = subprocess.run(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"{bad}: cameras[0].url: camera url scheme 'ftp' is not supported" in out.stderr
    assert f"{bad}: watchlist: required key is missing" in out.stderr


def mqtt_unit_toml(tmp: Path, people: People, clip: Path, unit_id: str, host: str, port: int) -> Path:
    """A unit with one looped camera, a signed list holding the enrolled person, and an MQTT outbox."""
    root_pub, store = signed_store(tmp, people)
    path = tmp / "unit.toml"
    path.write_text(f"""
[unit]
id = "{unit_id}"
site = "test-site"
timezone = "Asia/Tokyo"

[[cameras]]
id = "lobby"
name = "Lobby"
location = "main entrance, looking in"
url = "{clip}"
loop = true
analysis_fps = 5

[matching.crop]
context_frame = true
context_max_px = 320

[watchlist]
root_key = "{root_pub}"
store = "{store}"

[mqtt]
host = "{host}"
port = {port}
heartbeat_interval_s = 1
reconnect_min_delay_s = 0.1
reconnect_max_delay_s = 0.5

[outbox]
path = "outbox.sqlite"
""")
    return path


def test_hits_and_heartbeat_reach_a_real_broker(
    mosquitto: Any, loop_clip: Path, people: People, engine: Any, tmp_path: Path
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier
    from wire import records

    config = mqtt_unit_toml(tmp_path, people, loop_clip, "unit-mq", mosquitto.host, mosquitto.port)
    got: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-operator", protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, msg: got.append((msg.topic, bytes(msg.payload)))
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("checkpoint/v1/test-site/unit-mq/#", qos=1)
    sub.loop_start()
    daemon = Daemon(load_config(config), engine=engine, notifier=Notifier(environ={}))
    try:
        # Subscribed before the unit starts, so `got` holds everything it sends, from its first status.
        assert subscribed.wait(10), "the broker did not confirm the test's subscription"
        daemon.start()
        wait_for(lambda: [p for t, p in got if t.endswith("/hits")], 20, "a hit over MQTT")
        # The first heartbeat goes out with the link, before the cameras are opened: wait for one after.
        wait_for(
            lambda: [p for t, p in got if t.endswith("/heartbeat") and records.decode_heartbeat(p)["unit"]["cameras"]],
            5,
            "a heartbeat with the camera",
        )
    finally:
        daemon.stop()
    try:
        # The unit's last message: the 'offline' status its clean shutdown publishes.
        wait_for(
            lambda: [
                p for t, p in list(got) if t.endswith("/status") and records.decode_status(p)["state"] == "offline"
            ],
            10,
            "the offline status",
        )
    finally:
        sub.loop_stop()
        sub.disconnect()
    hit, crop = records.decode_hit(next(p for t, p in got if t.endswith("/hits")))
    assert hit["person_id"] == people.enrolled_id and hit["camera_id"] == "lobby" and hit["site"] == "test-site"
    assert crop is not None and crop[:3] == b"\xff\xd8\xff"
    # The context frame the config turned on: the whole 640x360 clip frame at 320 px, with the face's box.
    import cv2
    import numpy as np

    frame = cv2.imdecode(np.frombuffer(hit["context_jpeg"], np.uint8), cv2.IMREAD_COLOR)
    assert frame.shape == (180, 320, 3) and hit["context_dropped"] is None
    beats = [records.decode_heartbeat(p) for t, p in got if t.endswith("/heartbeat")]
    beats = [b for b in beats if b["unit"]["cameras"]]
    unit = beats[-1]["unit"]
    assert unit["cameras"][0]["id"] == "lobby" and unit["watchlist"]["version"] == 1
    # Name and place, for the operators (central.store_reads.camera_names).
    assert (unit["cameras"][0]["name"], unit["cameras"][0]["location"]) == ("Lobby", "main entrance, looking in")
    assert unit["timezone"] == "Asia/Tokyo"  # the site's zone, for the operators' local time
    assert {"up", "since", "last_error", "fps_analysed", "lag_s"} <= set(unit["cameras"][0])
    states = [records.decode_status(p)["state"] for t, p in got if t.endswith("/status")]
    assert states[0] == "online" and states[-1] == "offline"
    # Which software the unit runs: in every status and heartbeat.
    assert beats[-1]["software_version"] == unit["software_version"] == software_version()
    assert {records.decode_status(p)["software_version"] for t, p in got if t.endswith("/status")} == {
        software_version()
    }


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the test
def test_a_dead_pipeline_thread_stops_the_unit_and_says_why(
    mosquitto: Any, loop_clip: Path, people: People, engine: Any, tmp_path: Path
) -> None:
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier
    from wire import records

    config = mqtt_unit_toml(tmp_path, people, loop_clip, "unit-dead", mosquitto.host, mosquitto.port)
    got: list[tuple[str, bytes]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-fleet", protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, msg: got.append((msg.topic, bytes(msg.payload)))
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("checkpoint/v1/test-site/unit-dead/#", qos=1)
    sub.loop_start()

    def beats() -> list[dict[str, Any]]:
        return [records.decode_heartbeat(p)["unit"] for t, p in list(got) if t.endswith("/heartbeat")]

    daemon = Daemon(load_config(config), engine=engine, notifier=Notifier(environ={}))
    runner = threading.Thread(target=daemon.run, daemon=True)
    try:
        daemon.start()
        # Heartbeats start with the link, before the threads: the first may say not healthy yet.
        wait_for(lambda: [b for b in beats() if b["pipeline"] == {"healthy": True, "problems": []}], 10, "healthy")

        def broken(batch: Any) -> None:
            raise RuntimeError("injected fault")

        # A bug no guard inside the embedder's loop covers: its thread dies while the camera runs on.
        daemon.pipeline.process_batch = broken
        wait_for(lambda: daemon.pipeline.problems(), 20, "the embedder thread dying on a face")
        died = "pipeline thread embed died: RuntimeError: injected fault"
        assert daemon.status()["pipeline"] == {"healthy": False, "problems": [died]}
        assert died in daemon.warnings()
        wait_for(lambda: any(died in b["warnings"] for b in beats()), 10, "the heartbeat naming the dead thread")
        runner.start()  # no systemd here: the daemon's own check stops it
        runner.join(timeout=30)
        assert not runner.is_alive(), "the unit ran on with a dead embedder thread"
        assert daemon.failure == died
    finally:
        daemon.request_stop()
        daemon.stop()

    def offline_reason() -> str | None:
        statuses = [records.decode_status(p) for t, p in list(got) if t.endswith("/status")]
        return statuses[-1]["reason"] if statuses and statuses[-1]["state"] == "offline" else None

    try:
        wait_for(offline_reason, 10, "the offline status")
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert offline_reason() == died


def test_demo_command_runs_the_whole_loop(engine: Any, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "testing.demo", "--out", str(tmp_path / "demo"), "--seconds", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 of 2 appearances of 'astronaut' found, 0 wrong" in out.stdout
    assert out.stdout.count("HIT at") == 2
    hits = read_hits(tmp_path / "demo" / "hits.jsonl")
    assert [h["person_id"] for h in hits] == ["astronaut", "astronaut"]
    assert all(h["crop_jpeg_b64"] for h in hits)


def test_tune_malloc_where_glibc_is() -> None:
    import platform

    from edge.process import tune_malloc

    result = tune_malloc()
    assert isinstance(result, bool)
    if platform.libc_ver()[0] == "glibc":
        assert result, "glibc has mallopt; the unit relies on it to keep RSS flat"


def test_unit_stops_when_its_outbox_is_deleted_under_it(
    loop_clip: Path, people: People, engine: Any, tmp_path: Path
) -> None:
    import threading

    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier
    from testing.broker import free_port

    # Nobody listens on the broker port: hits wait in the outbox, which is what matters here.
    config = mqtt_unit_toml(tmp_path, people, loop_clip, "unit-ob", "127.0.0.1", free_port())
    daemon = Daemon(load_config(config), engine=engine, notifier=Notifier(environ={}))
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    try:
        runner.start()
        (tmp_path / "outbox.sqlite").unlink()
        runner.join(timeout=30)
        assert not runner.is_alive(), "the unit kept running on a deleted outbox"
        assert daemon.failure is not None and "outbox" in daemon.failure
    finally:
        daemon.request_stop()
        daemon.stop()


def test_a_held_list_of_another_size_is_a_warning_and_a_full_bundle_replaces_it(
    engine: Any, loop_clip: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 20, item 4: a signed list of the wrong size in the store made every face fail, and the
    correct list was then refused as wrong_dimension. The unit now names it (log and heartbeat
    warnings), matches nothing meanwhile without failing a face, and a full bundle replaces it."""
    import logging

    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier
    from matching.matcher import Matcher
    from testing.synthetic import Authority, make_persons, person_centers, samples_of
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    hq = Authority(model_id=engine.model_id, dim=64, threshold=0.99)
    root, store = hq.write_root(tmp_path / "root.pub"), tmp_path / "wl.db"
    persons = make_persons(["case-1"], 1)
    held = Watchlist(WatchlistConfig(root_key=root, store=store), Matcher(dim=64), engine.model_id)  # size unknown
    held.start()
    held.offer(hq.bundle(1, persons, samples_of(person_centers(1, dim=64), 1), canary=True))
    held.close()

    daemon = Daemon(
        load_config(unit_toml(tmp_path, root, store, {"gate": str(loop_clip)})),
        engine=engine,
        notifier=Notifier(environ={}),
    )
    with caplog.at_level(logging.WARNING):
        daemon.start()
    try:
        size = f"holds 64-d embeddings, this unit's engine makes {engine.embedding_dim}-d ones"
        assert any(size in w and "full bundle" in w for w in daemon.status()["warnings"])
        assert any(size in r.getMessage() for r in caplog.records)
        wait_for(lambda: daemon.pipeline.stats()["gate"]["embedded"] > 0, 30, "a face embedded")
        assert daemon.pipeline.stats()["gate"]["errors"] == 0  # no face fails against the held list

        hq.dim = int(engine.embedding_dim)
        assert (
            daemon.watchlist.offer(hq.bundle(2, persons, samples_of(person_centers(1, dim=hq.dim), 1), canary=True))
            == 2
        )
        assert not [w for w in daemon.status()["warnings"] if "-d embeddings" in w]
        assert daemon.status()["watchlist"]["version"] == 2
    finally:
        daemon.stop()


def test_the_unit_refuses_its_own_threshold_below_the_engines_calibrated_level(
    engine: Any, people: People, tmp_path: Path
) -> None:
    """Issue 20, item 3: the daemon checks `[matching] threshold` against the calibration of the engine
    it loaded, also for a config made without the file check (a config object built in code)."""
    from edge.config import load_config
    from edge.daemon import Daemon, DaemonError
    from edge.notify import Notifier

    root_pub, store = signed_store(tmp_path, people)
    cfg = load_config(unit_toml(tmp_path, root_pub, store, {"gate": "rtsp://127.0.0.1:1/none"}))
    cfg.matching = cfg.matching.model_copy(update={"threshold": 0.5})
    daemon = Daemon(cfg, engine=engine, notifier=Notifier(environ={}))
    with pytest.raises(DaemonError, match=r"\[matching\] threshold 0\.5 is at or below the strangers' median"):
        daemon.start()
    assert daemon.pipeline is None  # refused before any camera was opened
