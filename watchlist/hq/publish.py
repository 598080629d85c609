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

    def retained(self, topics: list[str], grace: float = 0.5) -> dict[str, bytes]:
        """The retained messages on `topics` that have one (retained messages follow the SUBACK at once)."""
        _rc, mid = self.link.client.subscribe([(t, 1) for t in topics])
        reasons = self._wait(self._subacks, mid, f"the subscription to {', '.join(topics)}")
        refused = [t for t, r in zip(topics, reasons) if getattr(r, "is_failure", False)]
        if refused:
            raise PublishError(
                f"the broker refused the subscription to {', '.join(refused)} ({reasons[0]}): not authorised to read "
                f"it; the broker's ACL must let {self.conn.username or 'this user'} read the watchlist topics"
            )
        time.sleep(grace)
        self.link.client.unsubscribe(topics)
        return {t: self._retained[t] for t in topics if self._retained.get(t)}

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


def _manifest(data: bytes, chunk_bytes: int) -> Manifest:
    if data[:8] == KEYSET_MAGIC:
        raise PublishError("that is a key set, not a bundle: publish it with publish_keyset")
    h = peek(data)
    if h["kind"] not in SLOTS:
        raise PublishError(f"bundle kind {h['kind']!r} is neither full nor delta")
    return Manifest(
        kind=h["kind"],
        version=int(h["version"]),
        base_version=h.get("base_version"),
        size=len(data),
        sha256=sha256_hex(data),
        chunk_bytes=chunk_bytes,
        chunks=math.ceil(len(data) / chunk_bytes),
        published_at=time.time(),
    )


def publish_bundle(
    data: bytes,
    prefix: str,
    *,
    snapshot: bytes | None = None,
    host: str = "localhost",
    port: int = 1883,
    connection: MqttConnection | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout: float = 30.0,
) -> Manifest:
    """Publish a bundle (retained, QoS 1, in chunks) under `prefix`; returns its manifest.

    A delta goes with `snapshot`, the full bundle of the same version (``watchlist publish --keys``
    signs it), published right after it on the full slot: a unit that missed a delta, or cannot
    apply one, then catches up from the snapshot. A delta alone, or a bundle older than the one
    retained on its slot, raises PublishError before anything is sent: either would leave units
    behind with no way forward.

    `connection`: the broker, credentials and TLS (default: plain MQTT to `host`:`port`). A broker
    that refuses the connection or a topic raises PublishError at once, naming the cause.

    Example::

        publish_bundle(Path("v12.cpwl").read_bytes(), "checkpoint/v1/site-1/watchlist",
                       snapshot=Path("v12-full.cpwl").read_bytes(), host="broker.hq")
    """
    manifest = _manifest(data, chunk_bytes)
    bundles = [(manifest, data)]
    if manifest.kind == "delta":
        if snapshot is None:
            raise PublishError(
                f"delta version {manifest.version} needs the full snapshot of version {manifest.version} with it: "
                "published alone it leaves the retained full snapshot behind, and a unit that missed a delta "
                "stays on its old list (`watchlist publish --keys DIR` signs the snapshot from the register)"
            )
        full = _manifest(snapshot, chunk_bytes)
        if full.kind != "full" or full.version != manifest.version:
            raise PublishError(
                f"the snapshot given is a {full.kind} bundle version {full.version}, not the full bundle of "
                f"version {manifest.version}"
            )
        # The delta first: units in step see its manifest before the (much larger) snapshot's and
        # take the delta; once applied, the snapshot of the same version is not newer and is skipped.
        bundles.append((full, snapshot))
    elif snapshot is not None:
        raise PublishError("a snapshot goes with a delta only; a full bundle is its own snapshot")
    conn = _Connection(_connection(connection, host, port), timeout)
    try:
        retained = conn.retained([manifest_topic(prefix, m.kind) for m, _ in bundles])
        previous: dict[str, Manifest] = {}
        for topic, raw in retained.items():
            try:
                previous[topic] = Manifest.from_bytes(raw)
            except (ValueError, ArithmeticError):  # a size of 10**400 overflows the chunk arithmetic
                log.warning("the retained manifest on %s is not valid; replacing it", topic)
        for m, _ in bundles:
            old = previous.get(manifest_topic(prefix, m.kind))
            if old is not None and old.version > m.version:
                raise PublishError(
                    f"{manifest_topic(prefix, m.kind)} already announces version {old.version}, newer than "
                    f"this version {m.version}: units would ignore it (publish the latest release instead)"
                )
        for m, payload in bundles:
            _send(conn, prefix, m, payload, previous.get(manifest_topic(prefix, m.kind)))
    finally:
        conn.close()
    return manifest


def _send(conn: _Connection, prefix: str, m: Manifest, data: bytes, previous: Manifest | None) -> None:
    """Chunks first, the manifest last (a unit that sees it finds its chunks); then clear the
    previous version's chunks."""
    mv = memoryview(data)
    for i in range(m.chunks):
        conn.publish(chunk_topic(prefix, m.kind, m.version, i), bytes(mv[i * m.chunk_bytes : (i + 1) * m.chunk_bytes]))
    conn.publish(manifest_topic(prefix, m.kind), m.to_bytes())
    if previous is not None and previous.version != m.version:
        for i in range(previous.chunks):
            conn.publish(chunk_topic(prefix, m.kind, previous.version, i), b"")
    log.info(
        "published %s bundle version %d (%d bytes, %d chunks) under %s", m.kind, m.version, m.size, m.chunks, prefix
    )


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
