"""The unit's download of a bundle over a real Mosquitto broker, fed hostile manifests and chunks.

The manifest is unsigned: it may lie about the digest or the size. A lie must cost the unit one
download at most, and no memory beyond what actually arrives.
"""

from __future__ import annotations

import hashlib
import math
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from matching.matcher import Matcher
from testing.broker import wait_for
from testing.synthetic import Authority, make_persons, person_centers, samples_of
from watchlist.format.transport import Manifest, chunk_topic, manifest_topic
from watchlist.unit import subscriber as subscriber_module
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.subscriber import WatchlistSubscriber

MODEL = "synthetic:v1"
TOPIC = "checkpoint/site-9/watchlist"


class Publisher:
    """Publishes exactly the retained messages a test gives it (a misbehaving HQ)."""

    def __init__(self, broker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rogue-{uuid.uuid4().hex[:8]}")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def bundle(self, data: bytes, *, chunk_bytes: int = 4096, announce: dict | None = None) -> Manifest:
        version = int(announce.get("version", 0)) if announce else 0
        m = Manifest(
            kind="full",
            version=version or 1,
            base_version=None,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            chunk_bytes=chunk_bytes,
            chunks=math.ceil(len(data) / chunk_bytes),
            published_at=time.time(),
        )
        if announce:
            m = Manifest(**{**m.__dict__, **announce})
        for i in range(m.chunks):
            self.send(TOPIC + chunk_topic("", "full", m.version, i), data[i * chunk_bytes : (i + 1) * chunk_bytes])
        self.send(manifest_topic(TOPIC, "full"), m.to_bytes())
        return m

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def hq() -> Authority:
    return Authority(model_id=MODEL, threshold=0.5)


@pytest.fixture
def rig(tmp_path: Path, hq: Authority, mosquitto):
    cfg = WatchlistConfig(
        root_key=hq.write_root(tmp_path / "root.pub"),
        store=tmp_path / "wl.db",
        topic=TOPIC,
        max_bundle_bytes=4 * 1024**3,
    )
    wl = Watchlist(cfg, Matcher(), MODEL)
    wl.start()
    sub = WatchlistSubscriber(wl, TOPIC, host=mosquitto.host, port=mosquitto.port, tick_interval_s=0.2)
    sub.start()
    wait_for(lambda: sub.connected, what="sub.connected")
    pub = Publisher(mosquitto)
    yield wl, sub, pub
    pub.close()
    sub.stop()
    wl.close()


def _bundle(hq: Authority, version: int, n: int = 10) -> bytes:
    persons = make_persons([f"case-{i}" for i in range(n)], 2)
    return hq.bundle(version, persons, samples_of(person_centers(n, seed=version), 2, seed=version + 1))


def test_a_digest_mismatch_is_fetched_once_until_a_new_manifest(rig, hq: Authority) -> None:
    wl, sub, pub = rig
    real = _bundle(hq, 1)
    # The manifest announces another digest than its chunks give (say, a publish that went wrong).
    pub.bundle(real, announce={"sha256": "ab" * 32})
    wait_for(
        lambda: sub.fetches == 1 and sub.status()["downloading"] is None,
        what='sub.fetches == 1 and sub.status()["downloading"] is None',
    )
    # Many worker ticks and evaluations later, the same chunks were not fetched again.
    for _ in range(10):
        sub._work.put(("evaluate", None))
    assert sub.wait_idle()
    assert sub.fetches == 1 and sub.downloads == 0 and wl.version == 0
    # A new manifest (HQ republishes) is fetched.
    pub.bundle(real)
    wait_for(lambda: wl.version == 1, what="wl.version == 1")
    assert sub.fetches == 2


def test_a_manifest_announcing_the_size_limit_allocates_only_what_arrives(rig, hq: Authority) -> None:
    wl, sub, pub = rig
    size = 3 * 1024**3  # within max_bundle_bytes: the unit will wait for chunks that never come
    announce = {"size": size, "chunk_bytes": 1024**2, "chunks": math.ceil(size / 1024**2), "sha256": "cd" * 32}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        pub.send(
            manifest_topic(TOPIC, "full"),
            Manifest(kind="full", version=1, base_version=None, published_at=time.time(), **announce).to_bytes(),
        )
        wait_for(lambda: sub.status()["downloading"] is not None, what='sub.status()["downloading"] is not None')
        assert sub.wait_idle()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024**2, f"{peak} bytes allocated for an announcement alone"
    assert sub.status()["downloading"]["received"] == 0


def test_the_memory_of_refused_bundles_is_bounded(rig) -> None:
    wl, sub, pub = rig
    limit = subscriber_module.FAILED_KEPT
    # Oversized announcements are refused without a download: each leaves one digest behind.
    wl.config = wl.config.model_copy(update={"max_bundle_bytes": 4096})
    for i in range(limit + 20):
        m = Manifest("full", i + 1, None, 10_000, f"{i:064x}", 4096, 3, time.time())
        pub.send(manifest_topic(TOPIC, "full"), m.to_bytes())
        wait_for(
            lambda i=i: wl.status()["rejections_since_start"] + sub.status()["rejections_not_recorded"] == i + 1,
            what=lambda i=i: (
                f"refusal {i + 1} counted: {wl.status()['rejections_since_start']} recorded, {sub.status()}"
            ),
        )
    assert len(sub._failed) == limit
    assert f"{limit + 19:064x}" in sub._failed and f"{0:064x}" not in sub._failed
    # Each refusal is counted; the store took one write for the reason, not one per announcement.
    assert [e["reason"] for e in wl.store.events(limit=1000) if e["kind"] == "rejected"] == ["oversized"]
    assert sub.status()["rejections_not_recorded"] == limit + 19
