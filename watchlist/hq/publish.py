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
from wire.mqtt import MqttConnection, MqttLink

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
    """A short-lived publishing link (wire.mqtt, the one every role uses): connect, failing fast
    with the link's message ("not authorised", "certificate", "unreachable"); publish with QoS 1 and
    wait for each PUBACK, refusals included; disconnect."""

    def __init__(self, conn: MqttConnection, timeout: float) -> None:
        self.timeout = timeout
        self.conn = conn
        self._retained: dict[str, bytes] = {}
        self._acks: dict[int, Any] = {}
        self._subacks: dict[int, list[Any]] = {}
        self._cond = threading.Condition()
        try:
            self.link = MqttLink(
                conn,
                f"watchlist-publish-{uuid.uuid4().hex[:8]}",
                name="watchlist publish",
                clean_start=True,
                on_message=self._on_message,
                on_publish=self._on_publish,
                on_suback=self._on_suback,
            )
        except ValueError as exc:  # TLS files that do not load
            raise PublishError(str(exc)) from None
        self.link.start()
        problem = self.link.wait_connected(timeout)
        if problem is not None:
            self.close()
            raise PublishError(f"cannot publish: {problem}")

    def _on_message(self, msg: Any) -> None:
        if msg.retain:
            self._retained[msg.topic] = bytes(msg.payload)

    def _on_publish(self, mid: int, reason: Any) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def _on_suback(self, mid: int, reasons: list[Any]) -> None:
        with self._cond:
            self._subacks[mid] = reasons
            self._cond.notify_all()

    def _wait(self, table: dict[int, Any], mid: int, what: str) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in table or not self.link.connected, self.timeout):
                raise PublishError(f"the broker did not acknowledge {what} within {self.timeout:g}s")
            if mid not in table:
                raise PublishError(f"lost the connection while publishing {what}: {self.link.last_error}")
            return table.pop(mid)

    def retained(self, topic: str, grace: float = 0.5) -> bytes | None:
        """The retained message on `topic`, if any (retained messages follow the SUBACK at once)."""
        _rc, mid = self.link.client.subscribe(topic, qos=1)
        reasons = self._wait(self._subacks, mid, f"the subscription to {topic}")
        if any(getattr(r, "is_failure", False) for r in reasons):
            raise PublishError(
                f"the broker refused the subscription to {topic} ({reasons[0]}): not authorised to read it; "
                f"the broker's ACL must let {self.conn.username or 'this user'} read the watchlist topics"
            )
        time.sleep(grace)
        self.link.client.unsubscribe(topic)
        return self._retained.get(topic)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.link.client.publish(topic, payload, qos=1, retain=True)
        reason = self._wait(self._acks, info.mid, topic)
        if getattr(reason, "is_failure", False):
            raise PublishError(
                f"the broker refused {topic}: {reason} (not authorised: the broker's ACL must let "
                f"{self.conn.username or 'this user'} write the watchlist topics)"
            )

    def close(self) -> None:
        self.link.stop()


def _connection(connection: MqttConnection | None, host: str, port: int) -> MqttConnection:
    return connection if connection is not None else MqttConnection(host=host, port=port)


def publish_bundle(
    data: bytes,
    prefix: str,
    *,
    host: str = "localhost",
    port: int = 1883,
    connection: MqttConnection | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout: float = 30.0,
) -> Manifest:
    """Publish a bundle (retained, QoS 1, in chunks) under `prefix`; returns the manifest sent.

    `connection`: the broker, credentials and TLS (default: plain MQTT to `host`:`port`). A broker
    that refuses the connection or a topic raises PublishError at once, naming the cause.
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
    conn = _Connection(_connection(connection, host, port), timeout)
    try:
        previous = None
        raw = conn.retained(manifest_topic(prefix, slot))
        if raw:
            try:
                previous = Manifest.from_bytes(raw)
            except (ValueError, ArithmeticError):  # a size of 10**400 overflows the chunk arithmetic
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
    connection: MqttConnection | None = None,
    timeout: float = 30.0,
) -> None:
    """Publish a key set on its own (retained), e.g. to revoke a signing key without a new list."""
    if envelope[:8] != KEYSET_MAGIC:
        raise PublishError("not a key set (it does not start with CPWLKEY1)")
    conn = _Connection(_connection(connection, host, port), timeout)
    try:
        conn.publish(keyset_topic(prefix), envelope)
    finally:
        conn.close()
