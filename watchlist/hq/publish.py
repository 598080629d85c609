"""Publishing bundles: over MQTT (retained, QoS 1, in chunks; topics and manifest in
watchlist.format.transport) and as a file for units without a network path.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common.files import atomic_write
from watchlist.format.bundle import peek, sha256_hex
from watchlist.format.errors import PublishError
from watchlist.format.keys import KEYSET_MAGIC
from watchlist.format.transport import (
    DEFAULT_CHUNK_BYTES,
    SLOTS,
    Manifest,
    chunk_topic,
    keyset_topic,
    manifest_topic,
)

log = logging.getLogger(__name__)


def export_file(data: bytes, directory: Path) -> Path:
    """Write a bundle into `directory` for USB or scp, named for its kind and version; atomic."""
    h = peek(data)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = f"-from-{h['base_version']}" if h.get("kind") == "delta" else ""
    out = directory / f"watchlist-v{h['version']}-{h['kind']}{base}.cpwl"
    return atomic_write(out, data)


class _Connection:
    """A short-lived publishing client: connect, publish with QoS 1 and wait, disconnect."""

    def __init__(self, host: str, port: int, client: Any | None, timeout: float) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.timeout = timeout
        self.client = client or mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watchlist-publish-{uuid.uuid4().hex[:8]}"
        )
        self._connected = threading.Event()
        self._retained: dict[str, bytes] = {}
        self._suback = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: self._connected.set() if not rc.is_failure else None
        self.client.on_message = lambda c, u, msg: (
            self._retained.__setitem__(msg.topic, msg.payload) if msg.retain else None
        )
        self.client.on_subscribe = lambda c, u, mid, rcs, p=None: self._suback.set()
        try:
            self.client.connect(host, port)
        except OSError as exc:
            raise PublishError(f"cannot connect to the broker at {host}:{port}: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise PublishError(f"the broker at {host}:{port} did not accept the connection within {timeout:g}s")

    def retained(self, topic: str, grace: float = 0.5) -> bytes | None:
        """The retained message on `topic`, if any (retained messages follow the SUBACK at once)."""
        self._suback.clear()
        self.client.subscribe(topic, qos=1)
        self._suback.wait(self.timeout)
        time.sleep(grace)
        self.client.unsubscribe(topic)
        return self._retained.get(topic)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise PublishError(f"the broker did not acknowledge {topic} within {self.timeout:g}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_bundle(
    data: bytes,
    prefix: str,
    *,
    host: str = "localhost",
    port: int = 1883,
    client: Any | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout: float = 30.0,
) -> Manifest:
    """Publish a bundle (retained, QoS 1, in chunks) under `prefix`; returns the manifest sent.

    `client`: a configured, unconnected paho client (TLS, credentials); default a plain one.
    """
    if data[:8] == KEYSET_MAGIC:
        raise PublishError("that is a key set, not a bundle: publish it with publish_keyset")
    h = peek(data)
    slot = h["kind"]
    if slot not in SLOTS:
        raise PublishError(f"bundle kind {slot!r} is neither full nor delta")
    chunks = math.ceil(len(data) / chunk_bytes)
    manifest = Manifest(
        kind=slot,
        version=int(h["version"]),
        base_version=h.get("base_version"),
        size=len(data),
        sha256=sha256_hex(data),
        chunk_bytes=chunk_bytes,
        chunks=chunks,
        published_at=time.time(),
    )
    conn = _Connection(host, port, client, timeout)
    try:
        previous = None
        raw = conn.retained(manifest_topic(prefix, slot))
        if raw:
            try:
                previous = Manifest.from_bytes(raw)
            except ValueError:
                log.warning("the retained manifest on %s is not valid; replacing it", manifest_topic(prefix, slot))
        mv = memoryview(data)
        for i in range(chunks):
            conn.publish(
                chunk_topic(prefix, slot, manifest.version, i), bytes(mv[i * chunk_bytes : (i + 1) * chunk_bytes])
            )
        conn.publish(manifest_topic(prefix, slot), manifest.to_bytes())
        if previous is not None and previous.version != manifest.version:
            for i in range(previous.chunks):
                conn.publish(chunk_topic(prefix, slot, previous.version, i), b"")
    finally:
        conn.close()
    log.info(
        "published %s bundle version %d (%d bytes, %d chunks) under %s",
        slot,
        manifest.version,
        len(data),
        chunks,
        prefix,
    )
    return manifest


def publish_keyset(
    envelope: bytes,
    prefix: str,
    *,
    host: str = "localhost",
    port: int = 1883,
    client: Any | None = None,
    timeout: float = 30.0,
) -> None:
    """Publish a key set on its own (retained), e.g. to revoke a signing key without a new list."""
    if envelope[:8] != KEYSET_MAGIC:
        raise PublishError("not a key set (it does not start with CPWLKEY1)")
    conn = _Connection(host, port, client, timeout)
    try:
        conn.publish(keyset_topic(prefix), envelope)
    finally:
        conn.close()
