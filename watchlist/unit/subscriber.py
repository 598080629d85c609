"""The unit's MQTT side of the watchlist: watch the manifests, fetch chunks, hand the bundle to `Watchlist`.

paho's network thread only files messages away; verification and applying run on this module's
own worker thread, so a large bundle never stalls the MQTT keepalive. The manifest (unsigned)
only decides what to download; `Watchlist.offer` verifies the assembled bytes.

The connection is wire.mqtt's `MqttLink`, as for every role: the same options, reconnects and
error messages. A refused subscription (SUBACK failure) is reported with its topic; a broker that
grants the subscription but delivers nothing (Mosquitto does that when its ACL forbids reading)
is reported after `silence_warning_s` without a manifest. No message, however malformed, stops
paho's network thread.

What arrives is bounded whatever the publisher sends: a key set over MAX_KEYSET_BYTES is dropped
before it is queued, and only the newest key set waits for the worker (one that arrives while
another waits replaces it); a burst of manifests queues one re-evaluation. What is dropped or
refused is counted in `status()` (the unit's heartbeat carries it) and logged and recorded at a
bounded rate (watchlist/unit/refusals.py).

The unit never waits for ever on one announcement: a download that gets no chunk for
`download_stall_s` while connected is given up (and tried again after a reconnect, or when a new
manifest comes), a full bundle newer than the delta on offer is taken instead of the delta, and a
delta that cannot be applied leaves the full snapshot to bring the unit forward. While the unit
holds an older version than announced, `status()["behind"]` says which, why, and since when, and
the log says so once per reason.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from typing import Any

from watchlist.format.errors import BundleRejected
from watchlist.format.keys import MAX_KEYSET_BYTES, parse_keyset
from watchlist.format.transport import SLOTS, Manifest, chunk_topic, keyset_topic, manifest_topic
from watchlist.unit.apply import Watchlist
from watchlist.unit.download import FAILED_KEPT, Assembly, FailedDigests, GivenUp, bundle_to_fetch, why_behind
from watchlist.unit.refusals import Refusals
from wire.mqtt import MqttConnection, MqttLink

log = logging.getLogger(__name__)


class WatchlistSubscriber:
    """Keeps a unit's watchlist in step with what HQ publishes under `topic`.

    Example::

        conn = MqttConnection(host="broker.local", port=8883, username="site-1/watchlist",
                              password_file="/etc/checkpoint/watchlist.pw", tls={"ca_file": "/etc/checkpoint/ca.pem"})
        sub = WatchlistSubscriber(watchlist, "checkpoint/v1/site-1/watchlist", connection=conn)
        sub.start()
        ...
        sub.stop()

    `connection`: the broker, credentials and TLS (wire.mqtt); without it, plain MQTT to `host`:`port`.
    """

    def __init__(
        self,
        watchlist: Watchlist,
        topic: str,
        *,
        connection: MqttConnection | None = None,
        host: str = "localhost",
        port: int = 1883,
        client_id: str | None = None,
        tick_interval_s: float = 30.0,
        silence_warning_s: float = 60.0,
        rejection_record_interval_s: float = 600.0,
        download_stall_s: float = 30.0,
    ) -> None:
        self.watchlist = watchlist
        self.prefix = topic
        self.connection = connection if connection is not None else MqttConnection(host=host, port=port)
        self.host, self.port = self.connection.host, self.connection.port
        self.tick_interval_s = tick_interval_s
        self.silence_warning_s = silence_warning_s
        # Retained chunks follow the subscription at once, and 30 s is 30 one-MiB chunks even at
        # 1 MB/s: a download idle that long while connected is waiting for chunks that are not there.
        self.download_stall_s = download_stall_s
        # A clean session: everything this reader needs is retained, and a kept session would make the
        # broker queue every chunk of every publication while the unit is off.
        self.link = MqttLink(
            self.connection,
            client_id or f"watchlist-{uuid.uuid4().hex[:12]}",
            name=f"watchlist {topic}",
            clean_start=True,
            on_connected=self._on_connect,
            on_message=self._on_message,
            on_suback=self._on_suback,
        )
        self.client = self.link.client
        self._lock = threading.Lock()
        self._manifests: dict[str, Manifest] = {}
        self._assembly: Assembly | None = None
        self._failed = FailedDigests(FAILED_KEPT)  # sha256 of bundles already refused: not fetched again
        # Per slot, the announcement given up and why: chunks that assembled to another digest, a
        # refusal, an oversized announcement (not fetched again until a new manifest comes), or a
        # stalled download (retry_on_reconnect: a new connection brings the retained chunks again).
        self._given_up: dict[str, GivenUp] = {}
        self._behind: dict[str, Any] | None = None
        # Unbounded as a container; bounded by what goes in: one pending key set and one pending
        # re-evaluation at most (see _dispatch), one finished download, wait_idle's markers.
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._pending_keyset: bytes | None = None
        self._evaluate_queued = False
        self.queue_max_seen = 0
        self.received = {"keyset": 0, "manifest": 0, "chunk": 0}
        self.refusals = Refusals(topic, watchlist.record_rejection, record_interval_s=rejection_record_interval_s)
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._pending_subs: dict[int, list[str]] = {}
        self._connected_at = 0.0
        self._heard_at = 0.0
        self._silence_reported = False
        self.refused: set[str] = set()
        self.last_error: str | None = None
        self.downloads = 0
        self.fetches = 0  # downloads started (a bundle fetched again and again shows here)

    @property
    def connected(self) -> bool:
        """True while the link to the broker is up (it follows disconnects and reconnects)."""
        return self.link.connected

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (retrying in the background if the broker is down) and start the worker."""
        self._worker = threading.Thread(target=self._run, name="watchlist-sync", daemon=True)
        self._worker.start()
        self.link.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._work.put(("stop", None))
        self.link.stop()
        if self._worker is not None:
            self._worker.join(timeout)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the worker has handled everything queued before this call (manifests,
        chunks, re-evaluations); False if it has not within `timeout` seconds."""
        done = threading.Event()
        self._work.put(("caught_up", done))
        return done.wait(timeout)

    def status(self) -> dict[str, Any]:
        dropped, not_recorded = self.refusals.counts()
        with self._lock:
            a = self._assembly
            return {
                "connected": self.connected,
                "state": self.link.state,
                "last_error": self.last_error or self.link.last_error,
                "refused": sorted(self.refused),
                "downloading": None
                if a is None
                else {
                    "kind": a.slot,
                    "version": a.manifest.version,
                    "chunks": a.manifest.chunks,
                    "received": a.have,
                },
                "behind": None if self._behind is None else dict(self._behind),
                "downloads": self.downloads,
                "fetches": self.fetches,
                "received": dict(self.received),
                "dropped": dropped,
                "rejections_not_recorded": not_recorded,
                "queue_max_seen": self.queue_max_seen,
            }

    # ---- MQTT callbacks (paho's thread) -------------------------------------------------------

    def _on_connect(self, _session_present: bool, _properties: Any) -> None:
        self._connected_at = time.monotonic()
        self._silence_reported = False
        # The delta's manifest first: the broker sends retained messages in the order subscribed, so a
        # unit in step sees the delta before the full snapshot of the same version and never starts
        # downloading the (much larger) snapshot.
        topics = [manifest_topic(self.prefix, s) for s in ("delta", "full")] + [keyset_topic(self.prefix)]
        with self._lock:
            if self._assembly is not None:
                topics.append(self.prefix + self._assembly.topic)
                self._assembly.progress_at = time.monotonic()  # no chunk could come while the link was down
            for slot, g in list(self._given_up.items()):
                if g.retry_on_reconnect:
                    del self._given_up[slot]
        self._subscribe(topics)
        log.info("watchlist: listening on %s/# at %s:%d", self.prefix, self.host, self.port)

    def _subscribe(self, topics: list[str]) -> None:
        _rc, mid = self.client.subscribe([(t, 1) for t in topics])
        with self._lock:
            self._pending_subs[mid] = topics

    def _on_suback(self, mid: int, reasons: list[Any]) -> None:
        with self._lock:
            topics = self._pending_subs.pop(mid, None)
        refused = []
        for i, reason in enumerate(reasons):
            if getattr(reason, "is_failure", False):
                topic = topics[i] if topics is not None and i < len(topics) else f"a topic under {self.prefix}"
                refused.append(f"{topic} ({reason})")
                self.refused.add(topic)
        if refused:
            self.last_error = (
                f"the broker refused the subscription to {', '.join(refused)}: not authorised to read it; the "
                f"broker's ACL must let {self.connection.username or 'this user'} read {self.prefix}/# "
                f"(deploy/mosquitto/acl: the site's watchlist account <site>/watchlist)"
            )
            log.error("watchlist: %s", self.last_error)

    def _check_silence(self) -> None:
        """Mosquitto grants a subscription its ACL forbids and then delivers nothing: say so."""
        if not self.connected or self._silence_reported or self._heard_at >= self._connected_at:
            return
        if time.monotonic() - self._connected_at < self.silence_warning_s:
            return
        self._silence_reported = True
        self.last_error = (
            f"no manifest or key set on {self.prefix}/# for {self.silence_warning_s:g}s after subscribing: either "
            f"HQ has published nothing for this site yet, or the broker's ACL does not let "
            f"{self.connection.username or 'this user'} read {self.prefix}/# (Mosquitto then grants the "
            f"subscription and delivers nothing)"
        )
        log.warning("watchlist: %s", self.last_error)

    def _on_message(self, msg: Any) -> None:
        try:
            self._dispatch(msg)
        except Exception as exc:  # one bad message must not stop the network thread
            log.warning("watchlist: ignoring a message on %s: %s: %s", msg.topic, type(exc).__name__, exc)

    def _dispatch(self, msg: Any) -> None:
        topic = msg.topic
        rest = topic[len(self.prefix) + 1 :] if topic.startswith(self.prefix + "/") else ""
        parts = rest.split("/")
        if rest == "keyset":
            self._heard_at = time.monotonic()
            self.received["keyset"] += 1
            if msg.payload:
                self._on_keyset(msg.payload)
        elif len(parts) == 2 and parts[0] in SLOTS and parts[1] == "manifest":
            self._heard_at = time.monotonic()
            self.received["manifest"] += 1
            self._on_manifest(parts[0], bytes(msg.payload))
        elif len(parts) == 3 and parts[0] in SLOTS:
            self.received["chunk"] += 1
            self._on_chunk(parts[0], parts[1], parts[2], bytes(msg.payload))

    def _on_keyset(self, payload: bytes) -> None:
        if len(payload) > MAX_KEYSET_BYTES:
            self.refusals.drop("keyset_oversized", f"a key set of {len(payload)} bytes, over {MAX_KEYSET_BYTES}")
            return
        with self._lock:
            replaced = self._pending_keyset is not None
            self._pending_keyset = bytes(payload)
        if replaced:
            self.refusals.drop("keyset_superseded", "a key set replaced by a newer one before it was checked")
        else:
            self._put(("keyset", None))

    def _put(self, item: tuple[str, Any]) -> None:
        self._work.put(item)
        self.queue_max_seen = max(self.queue_max_seen, self._work.qsize())

    def _queue_evaluate(self) -> None:
        with self._lock:
            if self._evaluate_queued:
                return
            self._evaluate_queued = True
        self._put(("evaluate", None))

    def _on_manifest(self, slot: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            m = Manifest.from_bytes(payload)
        except (ValueError, ArithmeticError) as exc:  # 10**400 bytes: OverflowError in the chunk arithmetic
            self.refusals.drop("bad_manifest", f"the {slot} manifest ({type(exc).__name__}: {exc})")
            return
        if m.kind != slot:
            self.refusals.drop("bad_manifest", f"the {slot} manifest, which announces a {m.kind} bundle")
            return
        with self._lock:
            self._manifests[slot] = m
        self._queue_evaluate()

    def _on_chunk(self, slot: str, version: str, index: str, payload: bytes) -> None:
        done: Assembly | None = None
        with self._lock:
            a = self._assembly
            if a is None or a.slot != slot or str(a.manifest.version) != version or not index.isdigit():
                return
            i = int(index)
            expected = a.manifest.chunk_len(i) if i < a.manifest.chunks else None
            if expected is None or len(payload) != expected:
                bad = f"chunk {index} of {slot} bundle {version} of {len(payload)} bytes, expected {expected}"
            else:
                bad = None
                a.chunks[i] = payload
                a.progress_at = time.monotonic()
                if a.have == a.manifest.chunks:
                    done, self._assembly = a, None
        if bad is not None:
            self.refusals.drop("bad_chunk", f"{bad} (waiting for a republish)")
        if done is not None:
            self.client.unsubscribe(self.prefix + done.topic)
            self._put(("bundle", done))

    # ---- decisions and work (worker thread) ---------------------------------------------------

    def _evaluate(self) -> None:
        """Start fetching the bundle that moves this unit forward, if one is announced (bundle_to_fetch)."""
        applied = self.watchlist.version
        limit = self.watchlist.config.max_bundle_bytes
        with self._lock:
            want = bundle_to_fetch(applied, self._manifests, self._given_up, self._failed)
            a = self._assembly
            if want is None or (a is not None and a.manifest == want):
                return
            if want.size > limit:
                self._failed.add(want.sha256)
                self._given_up[want.kind] = GivenUp(want, f"is {want.size} bytes, over max_bundle_bytes ({limit})")
                oversized = want
            else:
                oversized = None
                if a is not None:
                    self.client.unsubscribe(self.prefix + a.topic)
                self._assembly = Assembly(want.kind, want)
                self.fetches += 1
                self.client.subscribe(self.prefix + self._assembly.topic, qos=1)
        if oversized is not None:
            self.refusals.reject(
                BundleRejected(
                    "oversized",
                    f"the {oversized.kind} bundle version {oversized.version} announced is "
                    f"{oversized.size} bytes, over max_bundle_bytes ({limit}); not downloaded",
                ),
                f"mqtt:{manifest_topic(self.prefix, oversized.kind)}",
            )
        else:
            log.info(
                "watchlist: fetching %s bundle version %d (%d bytes, %d chunks)",
                want.kind,
                want.version,
                want.size,
                want.chunks,
            )

    def _check_stall(self) -> None:
        """Give up a download that got no chunk for download_stall_s while connected (its chunks
        are not on the broker: lost, or never published), so that another bundle can move the unit."""
        with self._lock:
            a = self._assembly
            if a is None or not self.connected or time.monotonic() - a.progress_at < self.download_stall_s:
                return
            self._assembly = None
            why = (
                f"stalled: {a.have} of {a.manifest.chunks} chunks came, then none for {self.download_stall_s:g}s "
                "(they are not on the broker; HQ must publish it again)"
            )
            self._given_up[a.slot] = GivenUp(a.manifest, why, retry_on_reconnect=True)
        self.client.unsubscribe(self.prefix + a.topic)
        log.warning("watchlist: the download of %s bundle version %d %s", a.slot, a.manifest.version, why)
        self._evaluate()

    def _apply(self, a: Assembly) -> None:
        m = a.manifest
        source = f"mqtt:{chunk_topic(self.prefix, a.slot, m.version, '*')}"
        data = a.assembled()
        if hashlib.sha256(data).hexdigest() != m.sha256:
            # The chunks on the broker belong to another upload than the manifest (a publish in
            # progress, or a bad publisher). Fetching again would give the same bytes: wait for the
            # next manifest, which replaces this one.
            with self._lock:
                self._given_up[m.kind] = GivenUp(m, "assembled to another digest than its manifest announces")
            log.warning(
                "watchlist: %s bundle %d assembled with another digest than its manifest announces; "
                "not fetching it again until a new manifest is published",
                a.slot,
                m.version,
            )
            return
        self.downloads += 1
        try:
            self.watchlist.offer(data, source=source)
        except BundleRejected as exc:
            self._failed.add(m.sha256)  # already logged and recorded by Watchlist
            with self._lock:
                self._given_up[m.kind] = GivenUp(m, f"was refused ({exc.reason}): {exc.message}")
        except Exception as exc:
            log.exception("watchlist: applying %s bundle %d failed; keeping the current list", a.slot, m.version)
            self._failed.add(m.sha256)
            with self._lock:
                self._given_up[m.kind] = GivenUp(m, f"failed to apply: {type(exc).__name__}: {exc}")

    def _update_behind(self) -> None:
        """Keep status()["behind"] true: the version held, the newest announced, why the unit is
        not on it and since when; log a WARNING when the unit is stuck (once per reason), INFO when
        it has caught up."""
        applied = self.watchlist.version
        with self._lock:
            announced = max((m.version for m in self._manifests.values()), default=0)
        before = self._behind
        if announced <= applied:
            if before is not None:
                log.info("watchlist: caught up: version %d, the newest announced", applied)
            with self._lock:
                self._behind = None
            return
        with self._lock:
            reason, stuck = why_behind(applied, self._assembly, self._manifests, self._given_up, self._failed)
        changed = before is None or before["reason"] != reason or before["version"] != applied
        with self._lock:
            self._behind = {
                "version": applied,
                "announced": announced,
                "reason": reason,
                "since": before["since"] if before is not None else round(time.time(), 3),
                # False while the newer version is on its way (downloading): not yet worth a warning.
                "stuck": stuck,
            }
        if changed and stuck:
            log.warning(
                "watchlist: behind: holding version %d while version %d is announced: %s", applied, announced, reason
            )

    def _keyset(self) -> None:
        with self._lock:
            data, self._pending_keyset = self._pending_keyset, None
        if data is None:
            return
        source = f"mqtt:{keyset_topic(self.prefix)}"
        try:
            ks = parse_keyset(data, self.watchlist.root_key)
        except BundleRejected as exc:
            self.refusals.reject(exc, source)
            return
        held = self.watchlist.status()["keyset_serial"]
        if held is not None and ks.serial <= held:
            return  # the retained key set is one this unit already holds
        try:
            self.watchlist.offer_keyset(data, source=source)
        except BundleRejected:
            pass  # logged and recorded by Watchlist

    def _run(self) -> None:
        # Wake often enough to notice a stalled download in time; the list's own checks keep their pace.
        poll = min(self.tick_interval_s, self.download_stall_s / 4)
        next_tick = time.monotonic() + self.tick_interval_s
        while not self._stop.is_set():
            try:
                kind, item = self._work.get(timeout=poll)
            except queue.Empty:
                kind, item = "idle", None
            try:
                if kind == "stop":
                    return
                if kind == "caught_up":
                    self._update_behind()
                    item.set()
                    continue
                if kind == "evaluate":
                    with self._lock:
                        self._evaluate_queued = False
                    self._evaluate()
                elif kind == "bundle":
                    self._apply(item)
                    self._evaluate()
                elif kind == "keyset":
                    self._keyset()
                else:  # idle: a list applied from a file meanwhile may make an announced delta fit
                    self._evaluate()
                self._check_stall()
                self._check_silence()
                if kind != "idle" or time.monotonic() >= next_tick:
                    self.watchlist.tick()
                    next_tick = time.monotonic() + self.tick_interval_s
                self._update_behind()
            except Exception:
                log.exception("watchlist: the sync worker hit an error handling %s; continuing", kind)
