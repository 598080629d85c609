"""Report hits over MQTT without losing any: outbox on disk first, publish from a thread, delete on
the centre's verdict.

`MqttReporter` is the unit's `HitSink` for MQTT. `submit` stores the hit in the SQLite outbox and
returns; a publisher thread sends pending hits in order with QoS 1; the broker's PUBACK makes a hit
await its verdict, and the receiver's verdict on ``checkpoint/v1/<site>/<unit>/verdicts`` removes it
('stored', 'duplicate') or keeps it with the centre's reason ('refused': logged at ERROR, counted in
the heartbeat, named in its warnings). Verdict messages come in through edge/verdict_inbox.py, which
checks them like anything from outside; a verdict about a hit the outbox does not hold is ignored
(counted). edge/outbox/verdicts.py says when a hit without a verdict is sent again, and how a unit
behaves with receivers older than verdicts. paho-mqtt's network thread keeps the connection
(persistent session, capped exponential reconnect backoff, TLS, username/password, Last Will).
Connection problems never raise out of here: they show in `state`, `last_error` and the log, and the
reporter keeps retrying.

The connection itself is wire.mqtt's `MqttLink`, the same one the receiver and the watchlist tools use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from edge.outbox import Outbox, OutboxConfig, OutboxError
from edge.verdict_inbox import VerdictInbox
from wire import records, topics
from wire.mqtt import MqttConnection, MqttLink
from wire.records import Hit
from wire.signing import SigningError, UnitSigner, load_unit_key
from wire.topics import TopicLevel

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10


class MqttConfig(MqttConnection):
    """[mqtt]: the unit's link to the operators' broker. The unit id comes from the unit config."""

    site: TopicLevel = Field(description="site name, one topic level: checkpoint/v1/<site>/<unit>/...")
    client_id: str | None = Field(default=None, description="defaults to checkpoint-<site>-<unit>; keep it stable")
    heartbeat_interval_s: float = Field(default=30.0, gt=0, le=3600)
    inflight_window: int = Field(
        default=16, ge=1, le=1000, description="hits published and not yet acknowledged (capped by the broker's)"
    )
    require_subscriber: bool = Field(
        default=True,
        description="MQTT 5: keep a hit in the outbox when the broker says nobody subscribes to hits yet",
    )
    signing_key: Path | None = Field(
        default=None,
        description="this unit's Ed25519 private key (PEM, made by deploy/make-credentials); hits and status "
        "messages are signed with it so the centre knows they come from this unit",
    )

    watchlist_username: str | None = Field(
        default=None,
        description="broker account the watchlist link uses; default '<site>/<unit>/watchlist' when "
        "watchlist_password_file is set (deploy/make-credentials unit makes it: one read-only account per unit, "
        "since the broker binds each client id to its account)",
    )
    watchlist_password_file: Path | None = Field(
        default=None,
        description="password of the site's watchlist account; unset: the watchlist link uses username/password",
    )

    @field_validator("watchlist_password_file")
    @classmethod
    def _watchlist_password_file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"watchlist_password_file: no such file {str(v)!r}")
        return None if v is None else Path(v).expanduser()

    def watchlist_connection(self, unit_id: str) -> MqttConnection:
        """The connection for unit `unit_id`'s watchlist subscriber: this one, with the unit's
        watchlist reader account when watchlist_password_file is set."""
        fields = self.model_dump(include=set(MqttConnection.model_fields))
        if self.watchlist_password_file is not None:
            fields.update(
                username=self.watchlist_username or f"{self.site}/{unit_id}/watchlist",
                password=None,
                password_file=self.watchlist_password_file,
            )
        elif self.watchlist_username is not None:
            fields["username"] = self.watchlist_username
        return MqttConnection.model_validate(fields)

    @field_validator("signing_key")
    @classmethod
    def _signing_key_loads(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        try:
            load_unit_key(Path(v).expanduser())
        except SigningError as e:
            raise ValueError(str(e)) from None
        return Path(v).expanduser()

    def signer(self) -> UnitSigner | None:
        """The unit's signing key, or None when hits go unsigned."""
        return load_unit_key(self.signing_key) if self.signing_key is not None else None


class ReporterError(RuntimeError):
    """The reporter cannot accept a hit (closed, or the hit belongs to another unit)."""


class MqttReporter:
    """HitSink that publishes hits to ``checkpoint/v1/<site>/<unit>/hits`` from a durable outbox.

    Also keeps ``.../status`` (retained 'online' on connect, 'offline' as Last Will and on close)
    and sends ``.../heartbeat`` every `heartbeat_interval_s` with `status_provider()`'s figures,
    the outbox depth and the drop counters.
    """

    name = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        outbox: OutboxConfig | Outbox,
        unit_id: str,
        status_provider: Callable[[], dict[str, Any]] | None = None,
        *,
        start: bool = True,
    ) -> None:
        self.config = config
        self.unit_id = topics.check_topic_level(unit_id, "unit id")
        self.site = config.site
        self.hits_topic = topics.topic(self.site, self.unit_id, "hits")
        self.status_topic = topics.topic(self.site, self.unit_id, "status")
        self.heartbeat_topic = topics.topic(self.site, self.unit_id, "heartbeat")
        self.verdict_topic = topics.verdict_topic(self.site, self.unit_id)
        self._status_provider = status_provider
        # Called with each batch of this unit's verdicts after the outbox applied them (the canary
        # learns there whether the centre stored its hit); in the publisher thread, so it must be quick.
        self.on_verdicts: Callable[[list[records.Verdict]], None] | None = None
        self.signer = config.signer()
        self.outbox = outbox if isinstance(outbox, Outbox) else Outbox(outbox)
        self._started_at = time.monotonic()
        self._acks: deque[tuple[int, Any]] = deque()
        self._mid_to_seq: dict[int, int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._heartbeat_due = 0.0
        self._hold_until = 0.0
        self._hold_delay = 0.0
        self._refused = 0
        self._inbox = VerdictInbox(self.site, self.unit_id, self.verdict_topic)
        self._thread: threading.Thread | None = None
        client_id = config.client_id or f"checkpoint-{self.site}-{self.unit_id}"
        try:
            self.link = MqttLink(
                config,
                client_id,
                name=f"mqtt reporter {self.site}/{self.unit_id}",
                will=(
                    self.status_topic,
                    records.status_payload(self.site, self.unit_id, "offline", "connection lost", signer=self.signer),
                ),
                max_inflight=config.inflight_window + 1,
                on_connected=self._on_connected,
                on_publish=self._on_publish,
                on_message=self._on_message,
                on_subscribe=self._on_subscribe,
            )
        except Exception:
            self.outbox.close()
            raise
        if start:
            self.start()

    # --- HitSink ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting and publishing (the constructor does this unless start=False)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"mqtt-publisher-{self.unit_id}", daemon=True)
        self._thread.start()
        self.link.start()

    def submit(self, hit: Hit) -> None:
        """Store the hit in the outbox (durably) and wake the publisher; never waits on the network."""
        if self._closed:
            raise ReporterError(f"hit {hit.id}: the MQTT reporter is closed")
        if hit.unit_id != self.unit_id:
            raise ReporterError(
                f"hit {hit.id} is from unit {hit.unit_id!r} but this reporter publishes for {self.unit_id!r}"
            )
        now = time.time()
        record = records.encode_record(records.hit_record(hit, self.site, queued_at=now))
        self.outbox.put(hit.id, record, hit.crop_jpeg, queued_at=now, context=hit.context_jpeg)
        self._wake.set()

    def stats(self) -> dict[str, int | float | str]:
        """Outbox depth and counters plus the link's state, for logs and the heartbeat."""
        out: dict[str, int | float | str] = dict(self.outbox.stats())
        out["inflight"] = self.outbox.inflight
        out["refused"] = self._refused
        out["state"] = self.link.state
        out["connects"] = self.link.connects
        out["connect_attempts"] = self.link.connect_attempts
        out["last_error"] = self.link.last_error or ""
        return out

    @property
    def state(self) -> str:
        """'connecting', 'connected', 'disconnected', 'closed' (or 'idle' before start)."""
        return self.link.state

    @property
    def last_error(self) -> str | None:
        """The latest connection or delivery problem, None while all is well."""
        return self.link.last_error

    def flush(self, timeout: float, *, verdicts: bool | None = None) -> bool:
        """Wait up to `timeout` s until every hit is delivered: acknowledged by the broker and, when
        `verdicts` (default: whenever the outbox expects them), answered by the centre. Hits the
        centre refused are kept and do not count. True once delivered."""
        wait_verdicts = self.outbox.expects_verdicts if verdicts is None else verdicts
        deadline = time.monotonic() + timeout

        def left() -> int:
            return self.outbox.unsent + (self.outbox.awaiting if wait_verdicts else 0)

        while left() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        return left() == 0

    def close(self, timeout: float = 5.0, reason: str = "shutdown") -> None:
        """Send what can be sent within `timeout` s, publish 'offline' with `reason`, disconnect.
        Unsent hits stay in the outbox for the next start. A link still making its first
        connection (a unit that refuses to start right after opening its sinks) is given the time
        left to finish it, so the centre learns why the unit is offline."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        if not self.link.connected:
            self.link.wait_connected(max(0.0, deadline - time.monotonic()))
        if self.link.connected:
            self.flush(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        if self.link.connected:
            info = self.link.client.publish(
                self.status_topic,
                records.status_payload(self.site, self.unit_id, "offline", reason, signer=self.signer),
                qos=1,
                retain=True,
            )
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                log.debug("offline status not confirmed: %s", e)
        self.link.stop()
        try:
            self._process_acks()
            self._process_verdicts()
        except OutboxError as e:
            log.warning("mqtt reporter %s: %s; those hits go out again at the next start", self.unit_id, e)
        left = self.outbox.depth
        self.outbox.close()
        if left:
            log.info("mqtt reporter closed with %d hits still in the outbox; they go out on the next start", left)

    # --- paho callbacks (network thread) ------------------------------------------------------

    def _on_connected(self, _session_present: bool, _properties: Any) -> None:
        # Again on every connect: the broker keeps the session's subscription, and queues verdicts
        # sent while the unit was away, but a new or expired session has none.
        self.link.client.subscribe(self.verdict_topic, qos=1)
        self.link.client.publish(
            self.status_topic,
            records.status_payload(self.site, self.unit_id, "online", "connected", signer=self.signer),
            qos=1,
            retain=True,
        )
        self._heartbeat_due = 0.0
        self._hold_until = 0.0
        self._wake.set()

    def _on_publish(self, mid: int, reason: Any) -> None:
        self._acks.append((mid, reason))
        self._wake.set()

    def _on_subscribe(self, reasons: list[Any]) -> None:
        refused = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            self.link.note_error(
                f"the broker refused the subscription to {self.verdict_topic} ({', '.join(refused)}): no verdict "
                "can reach this unit, so its hits are sent again when overdue; the broker's ACL must let this "
                "unit's account read checkpoint/v1/<site>/<unit>/# (deploy/mosquitto/acl)"
            )

    def _on_message(self, msg: Any) -> None:
        # paho's thread: no parsing, no disk. Only this unit's verdict topic is subscribed to; anything
        # else, or an oversized payload, is dropped by the inbox and counted by the publisher thread.
        if self._inbox.offer(msg):
            self._wake.set()

    # --- publisher thread ---------------------------------------------------------------------

    def _window(self) -> int:
        window = self.config.inflight_window
        if self.link.receive_maximum:
            # Leave room for the status message: exceeding the broker's limit gets us disconnected.
            window = min(window, max(1, self.link.receive_maximum - 1))
        return window

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = 1.0
            if self.link.connected:
                timeout = min(timeout, max(0.0, self._heartbeat_due - now))
            if self._hold_until > now:
                timeout = min(timeout, self._hold_until - now)
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._step()
            except OutboxError as e:
                self.link.note_error(str(e))
                self._stop.wait(1.0)
            except Exception:  # the publisher must outlive any single failure
                log.exception("mqtt reporter %s: publisher step failed; continuing", self.unit_id)
                self._stop.wait(1.0)

    def _step(self) -> None:
        ack_error = None
        try:
            self._process_acks()
            self._process_verdicts()
            self.outbox.expire()
        except OutboxError as e:
            # The acknowledged rows are out of the window already and the outbox writes them on a
            # later round; publishing the next ones need not wait for that.
            ack_error = e
        if self.link.connected:
            self._publish_pending()
            if time.monotonic() >= self._heartbeat_due:
                self._send_heartbeat()
                self._heartbeat_due = time.monotonic() + self.config.heartbeat_interval_s
        if ack_error is not None:
            raise ack_error

    def _process_acks(self) -> None:
        acked: list[int] = []
        refused: list[tuple[int, Any]] = []
        while self._acks:
            mid, reason = self._acks.popleft()
            seq = self._mid_to_seq.pop(mid, None)
            if seq is None:
                continue
            value = getattr(reason, "value", 0)
            if getattr(reason, "is_failure", False) or (
                value == NO_MATCHING_SUBSCRIBERS and self.config.require_subscriber
            ):
                refused.append((seq, reason))
            else:
                acked.append(seq)
        if refused:
            self._refused += len(refused)
            self.outbox.release([seq for seq, _ in refused])
            reason = refused[-1][1]
            self._hold_delay = min(
                max(self.config.reconnect_min_delay_s, self._hold_delay * 2), self.config.reconnect_max_delay_s
            )
            self._hold_until = time.monotonic() + self._hold_delay
            if reason.value == NO_MATCHING_SUBSCRIBERS:
                msg = (
                    f"the broker has no subscriber for {self.hits_topic}; keeping {self.outbox.depth} hits in the "
                    f"outbox until a receiver subscribes"
                )
            else:
                msg = (
                    f"the broker refused hits on {self.hits_topic}: {reason} "
                    f"(check that the broker's ACL lets this user publish there)"
                )
            self.link.note_error(msg)
        # Every round, with new acknowledgements or none: the outbox also retries deletes that failed.
        self.outbox.ack(acked)
        if acked and not refused:
            self._hold_delay = 0.0
            if self.link.last_error and self.link.connected:
                self.link.last_error = None

    def _process_verdicts(self) -> None:
        """Apply the verdict messages that arrived: each must decode and name this unit; the outbox
        ignores verdicts about hits it does not hold."""
        verdicts = self._inbox.take(self.outbox.count_ignored)
        outcome = self.outbox.apply_verdicts(verdicts)
        if self.on_verdicts is not None and verdicts:
            self.on_verdicts(verdicts)
        if outcome.ignored:
            log.debug(
                "mqtt reporter %s: %d verdicts about hits not held (answered before)", self.unit_id, outcome.ignored
            )

    def _publish_pending(self) -> None:
        import paho.mqtt.client as mqtt

        if time.monotonic() < self._hold_until:
            return
        rows = self.outbox.take(self._window() - self.outbox.inflight)
        for i, row in enumerate(rows):
            payload = records.hit_payload(
                row.record,
                row.crop,
                row.crop_dropped,
                signer=self.signer,
                context=row.context,
                context_dropped=row.context_dropped,
            )
            info = self.link.client.publish(self.hits_topic, payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # paho did not take it (queue full): give this row and the rest back, try again later.
                self.outbox.release([r.seq for r in rows[i:]])
                log.warning("mqtt reporter %s: publish of hit %s not queued: %s", self.unit_id, row.hit_id, info.rc)
                break
            # NO_CONN still queues the message inside paho; it goes out after the reconnect.
            self._mid_to_seq[info.mid] = row.seq

    def _send_heartbeat(self) -> None:
        unit: dict[str, Any] = {}
        if self._status_provider is not None:
            try:
                unit = dict(self._status_provider())
            except Exception as e:  # a broken provider must not stop heartbeats
                log.warning("mqtt reporter %s: status provider failed: %s", self.unit_id, e)
                unit = {"error": f"status provider failed: {e}"}
        warnings = list(unit.get("warnings") or [])
        for trouble in (self.outbox.problem, self.outbox.refusal):
            if trouble and trouble not in warnings:
                # The outbox's trouble is the unit's: it shows with the unit's warnings at the centre (a
                # daemon's own warnings already name a write problem; a bare reporter's status provider may not).
                warnings.append(trouble)
        if warnings:
            unit["warnings"] = warnings
        outbox = self.outbox.stats()
        outbox["inflight"] = self.outbox.inflight
        outbox["refused"] = self._refused
        try:
            payload = records.heartbeat_payload(
                self.site,
                self.unit_id,
                interval_s=self.config.heartbeat_interval_s,
                uptime_s=time.monotonic() - self._started_at,
                unit=unit,
                outbox=outbox,
                link=self.link.figures(),
            )
        except (TypeError, ValueError) as e:
            log.warning("mqtt reporter %s: status provider gave figures that are not JSON: %s", self.unit_id, e)
            payload = records.heartbeat_payload(
                self.site,
                self.unit_id,
                interval_s=self.config.heartbeat_interval_s,
                uptime_s=time.monotonic() - self._started_at,
                unit={"error": f"figures not JSON-serialisable: {e}"},
                outbox=outbox,
                link=self.link.figures(),
            )
        self.link.client.publish(self.heartbeat_topic, payload, qos=0, retain=True)
