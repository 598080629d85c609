"""The outbox on a disk that fills up and on a file that becomes unwritable (issue 20, items 2 and 7),
on real small file systems: a tmpfs of a few MiB, and ext4 in a loop-mounted image for chattr +i.

As root the tests mount their file systems themselves (CI runs as root). Otherwise a tmpfs test runs
itself again inside `unshare --user --map-root-user --mount`, where it is root of its own mounts;
where neither works it is skipped, and under CI=true it fails instead.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from central.receiver import Receiver, ReceiverConfig
from central.store import HitStore
from edge.outbox import JOURNAL_RESERVE, Outbox, OutboxConfig, OutboxError
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, MosquittoBroker, find_mosquitto, wait_for
from testing.hits import make_hit, noise_jpeg
from tests.services import missing_service
from wire import records
from wire.records import Verdict

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("reporter_child.py")
# Set in the copy of a test that runs inside a user namespace, where it is root.
_IN_NAMESPACE = "CHECKPOINT_TEST_IN_USER_NAMESPACE"


def put(box: Outbox, hit) -> int | None:
    return box.put(hit.id, records.encode_record(records.hit_record(hit, "site-a")), hit.crop_jpeg)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, name: str = "filler") -> Path:
    """Write a file on `disk` until the file system refuses another byte (ENOSPC)."""
    path = disk / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, bytes(chunk))
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    assert free_bytes(disk) == 0
    return path


@pytest.fixture
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Callable[[Path], None], int], None]:
    """`small_disk(scenario, mib)` runs `scenario(disk)` with `disk` a fresh tmpfs of `mib` MiB."""

    def run(scenario: Callable[[Path], None], mib: int) -> None:
        if os.geteuid() == 0:
            with _mounted(tmp_path / "disk", ["-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "checkpoint-test"]) as d:
                scenario(d)
            return
        _rerun_in_user_namespace(request, tmp_path)

    return run


class _mounted:
    """Mount (as root) at `where` for the `with` block; unmounted after it, lazily if still busy."""

    def __init__(self, where: Path, args: list[str]) -> None:
        self.where, self.args = where, args

    def __enter__(self) -> Path:
        self.where.mkdir()
        done = subprocess.run(["mount", *self.args, str(self.where)], capture_output=True, text=True)
        if done.returncode != 0:
            missing_service(f"cannot mount {' '.join(self.args)} at {self.where}: {done.stderr.strip()}")
        return self.where

    def __exit__(self, *exc: object) -> None:
        if subprocess.run(["umount", str(self.where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.where)], check=True)


def _rerun_in_user_namespace(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if os.environ.get(_IN_NAMESPACE):
        pytest.fail("inside the user namespace the test should be root and mount the tmpfs itself")
    unshare = shutil.which("unshare")
    if unshare is None:
        missing_service("not root and no `unshare` (util-linux) to mount a small tmpfs in a user namespace")
    userns = [unshare, "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*userns, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing_service(
            f"not root, and `unshare --user --map-root-user --mount` fails ({probe.stderr.strip()}): "
            "run as root or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)"
        )
    # Inside, the user is root: Mosquitto must not try to switch to the outer user's name.
    env = {**os.environ, _IN_NAMESPACE: "1", "USER": "root", "LOGNAME": "root"}
    cmd = [*userns, sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += [f"--basetemp={tmp_path / 'in-namespace'}", request.node.nodeid]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"the test inside the user namespace failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    )


def test_a_full_disk_drops_old_crops_first_then_old_hits_and_counts_every_drop(small_disk):
    def scenario(disk: Path) -> None:
        box = Outbox(OutboxConfig(path=disk / "o.sqlite"))  # max_bytes (512 MiB) is far away: the disk limits
        crop = noise_jpeg(60_000)
        ids = [f"c{i:03d}" for i in range(60)]  # 3.6 MB of crops for a 3 MiB disk
        for hid in ids:
            assert put(box, make_hit(id=hid, crop=crop)) is not None
        rows = box.rows()
        assert [r.hit_id for r in rows] == ids, "no hit is refused while crops can go"
        cropless = sum(r.crop is None for r in rows)
        assert cropless > 0 and free_bytes(disk) < len(crop)
        # The oldest crops went, the newest stayed.
        assert [r.crop_dropped for r in rows] == ["outbox_full"] * cropless + [None] * (len(ids) - cropless)
        assert box.counters()["crops_dropped_full"] == cropless and box.counters()["hits_dropped_full"] == 0
        assert "disk is full" in (box.problem or "")
        assert box.journal_path.stat().st_size == JOURNAL_RESERVE

        # Hits keep coming: once no old crop is left, new hits lose theirs, then the oldest hits go.
        n = 0
        while box.counters()["hits_dropped_full"] == 0:
            assert n < 20_000, "the disk should be full of records long before this"
            ids.append(f"r{n:05d}")
            put(box, make_hit(id=ids[-1], crop=crop))
            n += 1
        rows = box.rows()
        counters = box.counters()
        kept = [r.hit_id for r in rows]
        assert kept == ids[len(ids) - len(kept) :], "the oldest hits go, in order"
        assert rows[-1].crop is None and all(r.crop_dropped == "outbox_full" for r in rows[:-1])
        assert counters["accepted"] == len(ids)
        assert counters["hits_dropped_full"] == len(ids) - len(kept)
        # Every crop that is gone is counted once: those of pending hits, and those of hits dropped
        # whole (a hit goes only once its crop is gone).
        assert counters["crops_dropped_full"] == sum(r.crop is None for r in rows) + counters["hits_dropped_full"]

        # Delivery on the full disk: every acknowledged row awaits its verdict (a change of no row's
        # size), the verdicts delete them, then new hits fit again.
        while box.depth:
            sent = box.take(16)
            assert box.ack([r.seq for r in sent]) == len(sent) > 0
            assert box.apply_verdicts([Verdict(r.hit_id, "stored") for r in sent]).deleted == len(sent)
        assert box.counters()["sent"] == box.counters()["verdicts_stored"] == len(kept)
        assert free_bytes(disk) < len(crop)
        put(box, make_hit(id="after", crop=crop))
        (row,) = box.rows()
        assert row.crop == crop and row.crop_dropped is None
        assert "disk is full" in (box.problem or ""), "the warning stays while the disk itself is full"
        box.close()

    small_disk(scenario, 3)


def test_a_full_disk_drops_context_frames_before_any_crop(small_disk):
    def scenario(disk: Path) -> None:
        box = Outbox(OutboxConfig(path=disk / "o.sqlite"))  # the disk limits, not max_bytes
        crop, frame = noise_jpeg(20_000, seed=1), noise_jpeg(40_000, seed=2)
        ids = [f"f{i:03d}" for i in range(60)]  # 3.6 MB of crops and frames for a 3 MiB disk
        for hid in ids:
            hit = make_hit(id=hid, crop=crop, context_jpeg=frame)
            assert box.put(hid, records.encode_record(records.hit_record(hit, "site-a")), crop, context=frame)
        rows = box.rows()
        assert [r.hit_id for r in rows] == ids and all(r.crop == crop for r in rows), "no crop goes while a frame can"
        dropped = sum(r.context is None for r in rows)
        # The oldest frames went, the newest stayed; each drop counted.
        assert 0 < dropped < len(ids) and free_bytes(disk) < len(frame)
        assert [r.context_dropped for r in rows] == ["outbox_full"] * dropped + [None] * (len(ids) - dropped)
        counts = box.counters()
        assert (counts["contexts_dropped_full"], counts["crops_dropped_full"], counts["hits_dropped_full"]) == (
            dropped,
            0,
            0,
        )
        box.close()

    small_disk(scenario, 3)


def test_on_a_full_disk_hits_awaiting_a_verdict_make_room_first(small_disk):
    def scenario(disk: Path) -> None:
        box = Outbox(OutboxConfig(path=disk / "o.sqlite"))
        crop = noise_jpeg(60_000)
        sent = [f"a{i:02d}" for i in range(20)]  # 1.2 MB the broker acknowledged
        for hid in sent:
            put(box, make_hit(id=hid, crop=crop))
        assert box.ack([r.seq for r in box.take(100)]) == len(sent)
        new: list[str] = []
        while box.counters()["awaiting_dropped"] == 0:
            assert len(new) < 200, "the disk should be full long before this"
            new.append(f"p{len(new):03d}")
            put(box, make_hit(id=new[-1], crop=crop))
        rows = box.rows()
        counters = box.counters()
        pending = [r for r in rows if r.state == "pending"]
        assert [r.hit_id for r in pending] == new and all(r.crop == crop for r in pending), "new hits kept whole"
        assert counters["crops_dropped_full"] == counters["hits_dropped_full"] == 0
        awaiting = [r.hit_id for r in rows if r.state == "awaiting_verdict"]
        assert awaiting == sent[len(sent) - len(awaiting) :], "the oldest hits awaiting a verdict go first"
        assert counters["awaiting_dropped"] == len(sent) - len(awaiting) > 0
        assert box.stats()["awaiting_verdict"] == len(awaiting)
        box.close()

    small_disk(scenario, 3)


def test_an_acknowledged_hit_whose_delete_fails_leaves_the_window_and_is_deleted_later(small_disk):
    def scenario(disk: Path) -> None:
        # Deleted on PUBACK (verdicts = "off"): the delete is what fails here.
        box = Outbox(OutboxConfig(path=disk / "o.sqlite", verdicts="off"))
        for i in range(3):
            put(box, make_hit(id=f"h{i}"))
        first, second = box.take(2)
        # A disk full to the last byte, and no journal room kept: SQLite cannot write the delete.
        box.journal_path.unlink()
        filler = fill(disk)
        with pytest.raises(OutboxError, match="acknowledged"):
            box.ack([first.seq])
        assert "cannot write" in (box.problem or "")
        assert box.depth == 3 and box.counters()["sent"] == 0
        assert box.inflight == 1, "the acknowledged hit is out of the window, the other one still in it"
        assert [r.hit_id for r in box.take(10)] == ["h2"], "an acknowledged hit is not sent again"
        with pytest.raises(OutboxError):  # still no room: still kept
            box.ack([])
        filler.unlink()
        assert box.ack([]) == 1, "the failed delete is retried with the next ack"
        assert [r.hit_id for r in box.rows()] == ["h1", "h2"] and box.counters()["sent"] == 1
        assert box.problem is None and box.journal_path.stat().st_size == JOURNAL_RESERVE
        assert box.ack([second.seq]) == 1
        box.close()

    small_disk(scenario, 1)


class _Spy:
    """Every heartbeat of the site, decoded, in arrival order."""

    def __init__(self, broker: MosquittoBroker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.beats: list[dict] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="heartbeat-spy", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("checkpoint/v1/+/+/heartbeat", qos=0)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg) -> None:
        with self._lock:
            self.beats.append(json.loads(msg.payload))

    def warnings_since(self, start: int) -> list[list[str]]:
        with self._lock:
            return [b["unit"].get("warnings", []) for b in self.beats[start:]]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto on the real disk, not started."""
    if find_mosquitto() is None:
        missing_service("mosquitto is not installed (apt-get install -y mosquitto)")
    b = MosquittoBroker(tmp_path / "broker")
    yield b
    b.stop()


def test_a_unit_on_a_full_disk_keeps_reporting_and_recovers_without_a_restart(small_disk, broker, tmp_path):
    def scenario(disk: Path) -> None:
        other = disk / "other-logs"  # something else on the unit's disk that takes a third of it
        other.write_bytes(bytes(1024 * 1024))
        cfg = MqttConfig(host=broker.host, port=broker.port, site="site-a", **FAST)
        reporter = MqttReporter(cfg, OutboxConfig(path=disk / "outbox.sqlite"), "unit-1")
        store = HitStore(tmp_path / "central.sqlite")
        got: list[dict] = []
        receiver = Receiver(
            ReceiverConfig(
                host=broker.host, port=broker.port, client_id="rx", reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.5
            ),
            store,
            on_hit=got.append,
        )
        spy = None
        try:
            crop = noise_jpeg(60_000)
            ids = [f"h{i:03d}" for i in range(40)]  # 2.4 MB of crops for 2 MiB left
            for hid in ids:
                reporter.submit(make_hit(id=hid, crop=crop))  # broker down: everything waits on the full disk
            counters = reporter.outbox.counters()
            cropless = counters["crops_dropped_full"]
            assert counters["accepted"] == len(ids) and counters["hits_dropped_full"] == 0 and cropless > 0
            assert free_bytes(disk) < len(crop)

            broker.start()
            spy = _Spy(broker)
            receiver.start()
            wait_for(lambda: len(got) >= len(ids), 60, lambda: f"all {len(ids)} hits at the receiver (got {len(got)})")
            # Delivered in order and whole, the oldest ones without their crops.
            assert [h["id"] for h in got] == ids
            assert [h["crop_dropped"] for h in got] == ["outbox_full"] * cropless + [None] * (len(ids) - cropless)
            assert all(h["has_crop"] == (h["crop_dropped"] is None) for h in got)
            # Every hit the receiver stored left the outbox although the disk is still full.
            wait_for(lambda: reporter.outbox.depth == 0, 30, "the outbox emptied by the receiver's verdicts")
            assert reporter.outbox.counters()["sent"] == len(ids) and free_bytes(disk) < len(crop)
            beats = len(spy.beats)
            wait_for(
                lambda: any(any("disk is full" in w for w in ws) for ws in spy.warnings_since(beats)),
                10,
                "a heartbeat with the full disk among the unit's warnings",
            )

            # Space comes back (the other files are cleaned up): new hits go out whole, the warning goes.
            other.unlink()
            reporter.submit(make_hit(id="after", crop=crop))
            wait_for(lambda: got[-1]["id"] == "after", 30, "the new hit at the receiver")
            assert got[-1]["has_crop"] and got[-1]["crop_dropped"] is None
            assert reporter.outbox.problem is None
            beats = len(spy.beats)
            wait_for(lambda: spy.warnings_since(beats) and spy.warnings_since(beats)[-1] == [], 10, "a clean heartbeat")
            assert reporter.outbox.journal_path.stat().st_size == JOURNAL_RESERVE
        finally:
            if spy is not None:
                spy.close()
            reporter.close(2.0)
            receiver.close()
            store.close()

    small_disk(scenario, 3)


def test_an_outbox_made_immutable_under_a_running_unit_is_an_error_not_a_crash(broker, tmp_path):
    # ext4 refuses writes to an immutable file that is already open, and used to answer a write to
    # the WAL's memory-mapped index with SIGBUS (tmpfs lets open files be written): a loop-mounted image.
    if os.geteuid() != 0:
        missing_service("needs root to loop-mount an ext4 image and set the immutable flag (chattr +i)")
    for tool in ("mkfs.ext4", "chattr"):
        if shutil.which(tool) is None:
            missing_service(f"needs {tool} (apt-get install -y e2fsprogs)")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    broker.start()
    spy = _Spy(broker)
    with _mounted(tmp_path / "disk", ["-o", "loop", str(image)]) as disk:
        outbox = disk / "outbox.sqlite"
        log_path = tmp_path / "child.log"
        with open(log_path, "w") as log_file:
            child = subprocess.Popen(
                [sys.executable, str(CHILD), "--port", str(broker.port), "--outbox", str(outbox)]
                + ["--count", "3", "--follow"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        try:
            assert child.stdout.readline().strip() == "submitted 3"

            def submit(n: int) -> dict:
                child.stdin.write(f"{n}\n")
                child.stdin.flush()
                line = child.stdout.readline()
                assert line, f"the unit died (exit status {child.wait(10)}): {log_path.read_text()[-2000:]}"
                return json.loads(line)

            files = [str(p) for p in disk.glob("outbox.sqlite*")]  # the file, its journal, its lock
            subprocess.run(["chattr", "+i", *files], check=True)
            answer = submit(2)
            assert answer["failed"] == 2 and "cannot write" in answer["problem"], answer
            assert child.poll() is None
            assert "ERROR edge.outbox" in log_path.read_text() and str(outbox) in log_path.read_text()
            beats = len(spy.beats)
            wait_for(
                lambda: any(answer["problem"] in ws for ws in spy.warnings_since(beats)),
                10,
                "a heartbeat with the outbox's problem among the unit's warnings",
            )

            subprocess.run(["chattr", "-i", *files], check=True)
            assert submit(1) == {"failed": 0, "problem": None}
        finally:
            subprocess.run(["chattr", "-i", *map(str, disk.glob("outbox.sqlite*"))], capture_output=True)
            child.stdin.close()
            if child.wait(15) != 0:
                raise AssertionError(f"the unit exited with {child.returncode}: {log_path.read_text()[-2000:]}")
            spy.close()
