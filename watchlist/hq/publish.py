"""Publishing bundles: over MQTT (retained, QoS 1, in chunks) and as a file for units without a network path.

Topics under the site's prefix (``[watchlist] topic`` on the unit)::

    <prefix>/full/manifest             retained JSON: the latest full bundle (see Manifest)
    <prefix>/full/<version>/<i>        retained raw chunk i of that bundle
    <prefix>/delta/manifest            the latest delta, same layout
    <prefix>/delta/<version>/<i>
    <prefix>/keyset                    retained: the current key set (rotation, revocation)

Chunks go first and the manifest last, so a unit that sees a manifest finds its chunks; the
previous version's chunks are then cleared (an empty retained message deletes one). The manifest
is not trusted by units beyond deciding what to download: the bundle's signature decides.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from watchlist.format.bundle import peek, sha256_hex
from watchlist.format.errors import PublishError
from watchlist.format.keys import KEYSET_MAGIC

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
MAX_CHUNKS = 100_000
SLOTS = ("full", "delta")


def manifest_topic(prefix: str, slot: str) -> str:
    return f"{prefix}/{slot}/manifest"


def chunk_topic(prefix: str, slot: str, version: int, index: int | str) -> str:
    return f"{prefix}/{slot}/{version}/{index}"


def keyset_topic(prefix: str) -> str:
    return f"{prefix}/keyset"


@dataclass(frozen=True)
class Manifest:
    """Announces a bundle on a slot: what it is, how big, and how it is cut."""

    kind: str
    version: int
    base_version: int | None
    size: int
    sha256: str
    chunk_bytes: int
    chunks: int
    published_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse an (untrusted) manifest; ValueError names what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest of {len(data)} bytes is too large")
        try:
            d = json.loads(data)
            m = cls(
                kind=str(d["kind"]),
                version=int(d["version"]),
                base_version=None if d["base_version"] is None else int(d["base_version"]),
                size=int(d["size"]),
                sha256=str(d["sha256"]),
                chunk_bytes=int(d["chunk_bytes"]),
                chunks=int(d["chunks"]),
                published_at=float(d["published_at"]),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"manifest is not valid: {exc}") from None
        if m.kind not in SLOTS or m.version < 1 or m.size < 1 or m.chunk_bytes < 1 or len(m.sha256) != 64:
            raise ValueError("manifest fields out of range")
        if m.chunks != math.ceil(m.size / m.chunk_bytes) or m.chunks > MAX_CHUNKS:
            raise ValueError(f"manifest says {m.chunks} chunks for {m.size} bytes in chunks of {m.chunk_bytes}")
        return m

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)


def export_file(data: bytes, directory: Path) -> Path:
    """Write a bundle into `directory` for USB or scp, named for its kind and version; atomic."""
    h = peek(data)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = f"-from-{h['base_version']}" if h.get("kind") == "delta" else ""
    out = directory / f"watchlist-v{h['version']}-{h['kind']}{base}.cpwl"
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


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
