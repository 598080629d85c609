"""Live updates over a real Mosquitto broker: chunked retained bundles, deltas, refusals, revocation."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from matching.matcher import Matcher
from testing.synthetic import Authority, make_persons, person_centers, samples_of, unit_rows
from watchlist.format.keys import generate_key, key_id, make_keyset
from watchlist.format.transport import Manifest, manifest_topic
from watchlist.hq.publish import publish_bundle, publish_keyset
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.subscriber import WatchlistSubscriber

MODEL = "synthetic:v1"
TOPIC = "checkpoint/site-7/watchlist"


def wait_for(pred: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _list(n: int, seed: int, prefix: str = "case"):
    centers = person_centers(n, seed=seed)
    return make_persons([f"{prefix}-{i:04d}" for i in range(n)], 2), samples_of(centers, 2, seed=seed + 1), centers


@pytest.fixture
def hq() -> Authority:
    return Authority(model_id=MODEL, threshold=0.5)


@pytest.fixture
def unit(tmp_path: Path, hq: Authority, mosquitto):
    cfg = WatchlistConfig(
        root_key=hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db", topic=TOPIC, max_bundle_bytes=200_000
    )
    wl = Watchlist(cfg, Matcher(), MODEL)
    wl.start()
    subs: list[WatchlistSubscriber] = []

    def connect() -> WatchlistSubscriber:
        sub = WatchlistSubscriber(wl, TOPIC, host=mosquitto.host, port=mosquitto.port, tick_interval_s=0.5)
        sub.start()
        subs.append(sub)
        assert wait_for(lambda: sub.connected)
        return sub

    wl.connect = connect
    yield wl
    for s in subs:
        s.stop()
    wl.close()


def _publish(broker, data: bytes, chunk_bytes: int = 4096) -> Manifest:
    return publish_bundle(data, TOPIC, host=broker.host, port=broker.port, chunk_bytes=chunk_bytes)


def test_full_then_delta_over_mqtt_with_a_unit_that_joins_late(unit: Watchlist, hq: Authority, mosquitto) -> None:
    persons, emb, centers = _list(60, seed=1)
    full = hq.bundle(1, persons, emb)
    m = _publish(mosquitto, full)
    assert m.chunks > 5  # really chunked
    sub = unit.connect()  # joins after the publication: retained messages bring the list
    assert wait_for(lambda: unit.version == 1), unit.status()
    leaver = unit_rows(centers[[9]])
    assert unit.matcher.match(leaver)[0].person_id == "case-0009"

    # While the cameras match continuously, HQ publishes a delta removing a found person.
    stop, errors, calls = threading.Event(), [], [0]
    keeper = unit_rows(centers[[3]])

    def camera() -> None:
        while not stop.is_set():
            try:
                m = unit.matcher.match(keeper)[0]
                if m is None or m.person_id != "case-0003":
                    errors.append(m)
                calls[0] += 1
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

    cam = threading.Thread(target=camera)
    cam.start()
    new_p, new_e, new_c = _list(3, seed=2, prefix="new")
    t0 = time.monotonic()
    _publish(mosquitto, hq.bundle(2, new_p, new_e, kind="delta", base=1, removed=("case-0009",)))
    assert wait_for(lambda: unit.version == 2)
    took = time.monotonic() - t0
    stop.set()
    cam.join()
    assert not errors and calls[0] > 0
    assert unit.matcher.match(leaver) == [None]
    assert unit.matcher.match(unit_rows(new_c[[2]]))[0].person_id == "new-0002"
    assert took < 5.0  # "within seconds of the bundle's arrival"
    assert sub.downloads == 2 and unit.status()["rejections_since_start"] == 0


def test_old_chunks_are_cleared_when_a_new_version_is_published(hq: Authority, mosquitto) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    p1, e1, _ = _list(20, seed=3)
    _publish(mosquitto, hq.bundle(1, p1, e1))
    _publish(mosquitto, hq.bundle(2, p1, e1))
    seen: dict[str, bytes] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    c.on_message = lambda cl, u, msg: seen.__setitem__(msg.topic, msg.payload) if msg.retain else None
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    c.subscribe(f"{TOPIC}/full/#", qos=1)
    time.sleep(1.0)
    c.disconnect()
    c.loop_stop()
    versions = {t.split("/")[-2] for t in seen if not t.endswith("manifest")}
    assert versions == {"2"}
    assert Manifest.from_bytes(seen[manifest_topic(TOPIC, "full")]).version == 2


def test_tampered_and_oversized_bundles_are_refused_once(unit: Watchlist, hq: Authority, mosquitto) -> None:
    persons, emb, _ = _list(10, seed=4)
    data = bytearray(hq.bundle(1, persons, emb))
    data[-300] ^= 1
    unit.connect()
    _publish(mosquitto, bytes(data))
    assert wait_for(lambda: unit.status()["last_rejection"] is not None)
    assert unit.status()["last_rejection"]["reason"] == "bad_signature" and unit.version == 0
    time.sleep(1.5)  # several worker ticks: the same bytes are not fetched and refused again
    assert unit.status()["rejections_since_start"] == 1

    big_p, big_e, _ = _list(500, seed=5)
    _publish(mosquitto, hq.bundle(2, big_p, big_e), chunk_bytes=64 * 1024)
    assert wait_for(lambda: unit.status()["last_rejection"]["reason"] == "oversized")
    assert unit.version == 0

    _publish(mosquitto, hq.bundle(3, persons, emb))
    assert wait_for(lambda: unit.version == 3)


def test_revocation_published_on_the_keyset_topic(unit: Watchlist, hq: Authority, mosquitto) -> None:
    persons, emb, centers = _list(10, seed=6)
    unit.connect()
    _publish(mosquitto, hq.bundle(1, persons, emb))
    assert wait_for(lambda: unit.version == 1)
    stolen = hq.signing
    revoking = make_keyset(hq.root, 2, [generate_key().public_key()], [key_id(stolen.public_key())])
    publish_keyset(revoking, TOPIC, host=mosquitto.host, port=mosquitto.port)
    assert wait_for(lambda: unit.status()["keyset_serial"] == 2)
    # A bundle from whoever holds the stolen key (with the old key set inside) is refused.
    _publish(mosquitto, hq.bundle(2, persons, np.flipud(emb).copy(), kind="full"))
    assert wait_for(lambda: (unit.status()["last_rejection"] or {}).get("reason") == "revoked_key")
    assert unit.version == 1 and unit.matcher.match(unit_rows(centers[[0]]))[0].person_id == "case-0000"
