"""A sync that heals itself (issue 19, item 4), over a real Mosquitto broker and real SQLite.

A unit that missed deltas, or faces a delta it cannot download or apply, must reach the list HQ
announces from the full snapshot, and say while it cannot; HQ must never publish so that it leaves
the retained snapshot behind.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import paho.mqtt.publish as single
import pytest
from click.testing import CliRunner

from matching.matcher import Matcher
from testing.broker import wait_for
from testing.synthetic import Authority, make_persons, person_centers, samples_of, unit_rows
from watchlist.cli import main
from watchlist.format.errors import PublishError
from watchlist.format.transport import Manifest, manifest_topic
from watchlist.hq.publish import publish_bundle
from watchlist.hq.register import Register
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.subscriber import WatchlistSubscriber

MODEL = "synthetic:v1"
TOPIC = "checkpoint/v1/site-4/watchlist"


def _cli(*args: object, code: int = 0) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def _announce(broker, slot: str, version: int, base: int | None, size: int = 10_000) -> None:
    """A retained manifest whose chunks were never published (lost by the broker, or a publish cut short)."""
    m = Manifest(slot, version, base, size, hashlib.sha256(b"%d" % version).hexdigest(), 4096, -(-size // 4096), 1.0)
    single.single(manifest_topic(TOPIC, slot), m.to_bytes(), qos=1, retain=True, hostname=broker.host, port=broker.port)


class Unit:
    """A unit's list and its MQTT reader, which can be stopped and started again on the same store."""

    def __init__(self, tmp_path: Path, root_pub: Path, broker, **sub_options: float) -> None:
        self.cfg = WatchlistConfig(root_key=root_pub, store=tmp_path / "unit.db", topic=TOPIC)
        self.broker, self.options = broker, {"tick_interval_s": 0.2, **sub_options}
        self.wl: Watchlist | None = None
        self.sub: WatchlistSubscriber | None = None

    def start(self) -> WatchlistSubscriber:
        self.wl = Watchlist(self.cfg, Matcher(), MODEL)
        self.wl.start()
        self.sub = WatchlistSubscriber(self.wl, TOPIC, host=self.broker.host, port=self.broker.port, **self.options)
        self.sub.start()
        return self.sub

    def stop(self) -> None:
        if self.sub is not None:
            self.sub.stop()
        if self.wl is not None:
            self.wl.close()
        self.sub = self.wl = None

    @property
    def version(self) -> int:
        return self.wl.version if self.wl is not None else -1


@pytest.fixture
def hq_keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    _cli("keygen", "--dir", keys)
    return keys


def test_a_unit_offline_across_two_deltas_converges_from_the_snapshot(tmp_path: Path, hq_keys: Path, mosquitto) -> None:
    """The issue's measurement: a unit stopped on v2 while HQ removes a found person (delta v3) and
    enrols a new one (delta v4) stayed on v2 for good. Now each delta carries the full snapshot of
    its version, and the restarted unit is on v4 within 10 s, the found person gone."""
    reg = tmp_path / "hq.db"
    centers = person_centers(8, seed=31)
    Register(reg).add_persons(
        make_persons([f"case-{i}" for i in range(6)], 2), samples_of(centers[:6], 2), model_id=MODEL
    )
    build = ("build", "--register", reg, "--keys", hq_keys, "--threshold", "0.5", "--no-canary")
    publish = ("--register", reg, "--topic", TOPIC, "--host", mosquitto.host, "--port", mosquitto.port)
    publish += ("--chunk-bytes", 4096, "--keys", hq_keys)
    unit = Unit(tmp_path, hq_keys / "root.pub", mosquitto)
    try:
        _cli(*build, "--out", tmp_path / "v1.cpwl")
        _cli("publish", tmp_path / "v1.cpwl", *publish)
        unit.start()
        wait_for(lambda: unit.version == 1, what=lambda: f"v1 on the unit: {unit.sub.status()}")
        _cli("remove", "case-5", "--register", reg)
        _cli(*build, "--out", tmp_path / "v2.cpwl", "--delta")
        out = _cli("publish", tmp_path / "v2.cpwl", *publish)
        assert "delta bundle version 2 published" in out and "full snapshot of version 2 published" in out
        wait_for(lambda: unit.version == 2, what=lambda: f"v2 on the unit: {unit.sub.status()}")
        unit.stop()

        # While the unit is off: case-2 is found (delta v3), case-6 and case-7 enrolled (delta v4).
        _cli("remove", "case-2", "--register", reg)
        _cli(*build, "--out", tmp_path / "v3.cpwl", "--delta")
        _cli("publish", tmp_path / "v3.cpwl", *publish)
        Register(reg).add_persons(make_persons(["case-6", "case-7"], 2), samples_of(centers[6:], 2), model_id=MODEL)
        _cli(*build, "--out", tmp_path / "v4.cpwl", "--delta")
        _cli("publish", tmp_path / "v4.cpwl", *publish)

        t0 = time.monotonic()
        sub = unit.start()
        assert unit.version == 2
        wait_for(lambda: unit.version == 4, timeout=10, what=lambda: f"v4 within 10 s: {sub.status()}")
        assert time.monotonic() - t0 < 10
        index = unit.wl.current_index
        assert "case-2" not in index and "case-5" not in index and "case-7" in index
        assert unit.wl.matcher.match(unit_rows(centers[[2]])) == [None]
        assert unit.wl.matcher.match(unit_rows(centers[[7]]))[0].person_id == "case-7"
        assert sub.wait_idle() and sub.status()["behind"] is None
        assert unit.wl.status()["kind"] == "full" and unit.wl.status()["rejections_since_start"] == 0
    finally:
        unit.stop()


def test_publishing_a_delta_needs_its_snapshot_from_an_unchanged_register(
    tmp_path: Path, hq_keys: Path, mosquitto
) -> None:
    reg = tmp_path / "hq.db"
    Register(reg).add_persons(make_persons(["a", "b", "c"], 2), samples_of(person_centers(3), 2), model_id=MODEL)
    build = ("build", "--register", reg, "--keys", hq_keys, "--threshold", "0.5", "--no-canary")
    publish = ("--register", reg, "--topic", TOPIC, "--host", mosquitto.host, "--port", mosquitto.port)
    _cli(*build, "--out", tmp_path / "v1.cpwl")
    _cli("publish", tmp_path / "v1.cpwl", *publish)
    _cli("remove", "c", "--register", reg)
    _cli(*build, "--out", tmp_path / "v2.cpwl", "--delta")
    out = _cli("publish", tmp_path / "v2.cpwl", *publish, code=2)
    assert "give --keys" in out and "full snapshot" in out
    # A person removed after the delta was built: the register no longer holds version 2's list.
    _cli("remove", "b", "--register", reg)
    out = _cli("publish", tmp_path / "v2.cpwl", *publish, "--keys", hq_keys, code=2)
    assert "the register changed since version 2 was built" in out and ": b)" in out, out
    assert Register(reg).latest_published_version() == 1


def _bundle(hq: Authority, version: int, n: int = 6, **kw) -> bytes:
    persons = make_persons([f"case-{i}" for i in range(n)], 2)
    return hq.bundle(version, persons, samples_of(person_centers(n, seed=version), 2, seed=version + 1), **kw)


def _retained_manifest(broker, slot: str) -> Manifest | None:
    import paho.mqtt.subscribe as sub

    msg = sub.simple(manifest_topic(TOPIC, slot), hostname=broker.host, port=broker.port, retained=True, msg_count=1)
    return Manifest.from_bytes(msg.payload) if msg.payload else None


def test_publish_refuses_to_leave_the_full_snapshot_behind(hq: Authority, mosquitto) -> None:
    """Before, `publish` sent a delta alone (the retained full snapshot stayed at v1 for good) and an
    older full bundle over a newer one; both now fail before anything is sent."""
    at = {"host": mosquitto.host, "port": mosquitto.port, "chunk_bytes": 4096}
    publish_bundle(_bundle(hq, 3), TOPIC, **at)
    delta = hq.bundle(4, (), np.zeros((0, 128), np.float32), kind="delta", base=3)
    with pytest.raises(PublishError, match="needs the full snapshot of version 4"):
        publish_bundle(delta, TOPIC, **at)
    with pytest.raises(PublishError, match="not the full bundle of version 4"):
        publish_bundle(delta, TOPIC, snapshot=_bundle(hq, 5), **at)
    with pytest.raises(PublishError, match="already announces version 3, newer than this version 2"):
        publish_bundle(_bundle(hq, 2), TOPIC, **at)
    assert _retained_manifest(mosquitto, "full").version == 3
    publish_bundle(delta, TOPIC, snapshot=_bundle(hq, 4), **at)
    assert _retained_manifest(mosquitto, "full").version == 4
    assert _retained_manifest(mosquitto, "delta").version == 4


@pytest.fixture
def hq() -> Authority:
    return Authority(model_id=MODEL, threshold=0.5)


def test_a_newer_full_bundle_wins_over_a_delta_whose_chunks_never_come(
    tmp_path: Path, hq: Authority, mosquitto
) -> None:
    """Before, a retained delta manifest on the applied base with no chunks kept the unit waiting
    for them, and a full version published after it was ignored for as long as it stayed."""
    unit = Unit(tmp_path, hq.write_root(tmp_path / "root.pub"), mosquitto)
    at = {"host": mosquitto.host, "port": mosquitto.port, "chunk_bytes": 4096}
    try:
        publish_bundle(_bundle(hq, 1), TOPIC, **at)
        sub = unit.start()
        wait_for(lambda: unit.version == 1, what=lambda: f"v1: {sub.status()}")
        _announce(mosquitto, "delta", 2, 1)
        wait_for(lambda: sub.status()["downloading"] is not None, what=lambda: f"the delta fetched: {sub.status()}")
        publish_bundle(_bundle(hq, 3), TOPIC, **at)
        wait_for(lambda: unit.version == 3, what=lambda: f"the newer full version taken: {sub.status()}")
    finally:
        unit.stop()


def test_a_stalled_delta_is_given_up_for_the_snapshot_in_bounded_time(
    tmp_path: Path, hq: Authority, mosquitto, caplog
) -> None:
    """The delta and the snapshot of one version: the unit tries the delta (smaller) first; its
    chunks never come, so after download_stall_s it takes the snapshot instead of waiting for ever."""
    unit = Unit(tmp_path, hq.write_root(tmp_path / "root.pub"), mosquitto, download_stall_s=1.0)
    at = {"host": mosquitto.host, "port": mosquitto.port, "chunk_bytes": 4096}
    try:
        publish_bundle(_bundle(hq, 1), TOPIC, **at)
        sub = unit.start()
        wait_for(lambda: unit.version == 1, what=lambda: f"v1: {sub.status()}")
        sub.stop()
        publish_bundle(_bundle(hq, 2), TOPIC, **at)
        _announce(mosquitto, "delta", 2, 1)
        with caplog.at_level(logging.WARNING, logger="watchlist.unit.subscriber"):
            unit.sub = WatchlistSubscriber(unit.wl, TOPIC, host=mosquitto.host, port=mosquitto.port, **unit.options)
            unit.sub.start()
            wait_for(lambda: unit.version == 2, what=lambda: f"v2 from the snapshot: {unit.sub.status()}")
        assert "the download of delta bundle version 2 stalled: 0 of 3 chunks came" in caplog.text
        assert unit.sub.fetches == 2 and unit.wl.status()["kind"] == "full"
    finally:
        unit.stop()


def test_the_unit_says_when_and_why_it_is_behind(tmp_path: Path, hq: Authority, mosquitto, caplog) -> None:
    """The issue's broker state, as the old `publish` left it: the full snapshot at v1, the delta
    v4 on base 3, the unit on v2. Before, log and status said nothing; now status()["behind"] names
    the versions, the reason and since when, the log warns once, and a current snapshot heals it."""
    unit = Unit(tmp_path, hq.write_root(tmp_path / "root.pub"), mosquitto)
    at = {"host": mosquitto.host, "port": mosquitto.port, "chunk_bytes": 4096}
    try:
        publish_bundle(_bundle(hq, 1), TOPIC, **at)
        _announce(mosquitto, "delta", 4, 3)
        unit.wl = Watchlist(unit.cfg, Matcher(), MODEL)
        unit.wl.start()
        unit.wl.offer(_bundle(hq, 2), source="test")
        unit.wl.close()
        t0 = time.time()
        with caplog.at_level(logging.INFO, logger="watchlist.unit.subscriber"):
            sub = unit.start()
            behind = wait_for(lambda: sub.status()["behind"], what=lambda: f"behind: {sub.status()}")
            assert sub.wait_idle()
            behind = sub.status()["behind"]
            assert behind["version"] == 2 and behind["announced"] == 4 and behind["since"] >= t0 - 1
            assert behind["stuck"]  # nothing on its way: the daemon puts this in its warnings
            assert "the delta version 4 applies to version 3, not to this one" in behind["reason"]
            assert "the full bundle announced is version 1, not newer" in behind["reason"]
            assert sub.status()["connected"]
            # Warned once per reason: the delta's manifest may come first, with no full one seen yet.
            warned = [r for r in caplog.records if "behind: holding version 2 while version 4" in r.message]
            assert 1 <= len(warned) <= 2 and {r.levelno for r in warned} == {logging.WARNING}
            assert warned[-1].getMessage().endswith(behind["reason"])

            publish_bundle(_bundle(hq, 4), TOPIC, **at)
            wait_for(lambda: unit.version == 4, what=lambda: f"v4: {sub.status()}")
            assert sub.wait_idle() and sub.status()["behind"] is None
            assert "caught up: version 4" in caplog.text
    finally:
        unit.stop()
