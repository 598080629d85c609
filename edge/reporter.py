"""Report hits over MQTT without losing any: outbox on disk first, publish from a thread, delete on PUBACK.

`MqttReporter` is the unit's `HitSink` for MQTT. `submit` stores the hit in the SQLite outbox and
returns; a publisher thread sends pending hits in order with QoS 1 and removes each one only when
the broker acknowledges it. paho-mqtt's network thread keeps the connection (persistent session,
capped exponential reconnect backoff, TLS, username/password, Last Will). Connection problems never
raise out of here: they show in `state`, `last_error` and the log, and the reporter keeps retrying.

`MqttConnection`, `TlsConfig` and `MqttLink` are shared with the operators' receiver (central/).
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edge.frame import Hit
from edge.outbox import Outbox, OutboxConfig, OutboxError
from wire import records as protocol

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10


class _PahoNoise(logging.Filter):
    """paho logs an error on every loop pass while it has no socket; MqttLink reports the cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger(__name__ + ".paho")
_paho_log.addFilter(_PahoNoise())


def _existing_file(value: Path | None, key: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{key}: no such file {str(path)!r}")
    return path


class TlsConfig(BaseModel):
    """[mqtt.tls]: TLS to the broker. Without ca_file the system's CA store is used."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = Field(default=None, description="PEM file of the CA that signed the broker's certificate")
    cert_file: Path | None = Field(default=None, description="client certificate (PEM), when the broker asks for one")
    key_file: Path | None = Field(default=None, description="private key of cert_file, if not inside it")
    insecure: bool = Field(
        default=False, description="skip the broker host name check (never in the field: allows impersonation)"
    )

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _file_exists(cls, v: Path | None, info: Any) -> Path | None:
        return _existing_file(v, f"tls.{info.field_name}")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file is set but tls.cert_file is not: give the client certificate too")
        return self


class MqttConnection(BaseModel):
    """How to reach the broker: address, protocol, session, credentials, TLS and reconnect backoff."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="localhost", min_length=1)
    port: int = Field(default=1883, description="1883 plain, 8883 usually for TLS")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description='"5" (default) or "3.1.1" for old brokers')
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    session_expiry_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="how long the broker keeps the session after a disconnect (MQTT 5)"
    )
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(default=None, description="file holding the password (first line)")
    tls: TlsConfig | None = None
    reconnect_min_delay_s: float = Field(default=1.0, gt=0)
    reconnect_max_delay_s: float = Field(default=60.0, gt=0)

    @field_validator("port")
    @classmethod
    def _port_range(cls, v: int) -> int:
        if not 1 <= v <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {v}")
        return v

    @field_validator("password_file")
    @classmethod
    def _password_file_exists(cls, v: Path | None) -> Path | None:
        return _existing_file(v, "password_file")

    @model_validator(mode="after")
    def _consistent(self) -> MqttConnection:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("password/password_file is set but username is not")
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError(
                f"reconnect_max_delay_s ({self.reconnect_max_delay_s}) must be >= "
                f"reconnect_min_delay_s ({self.reconnect_min_delay_s})"
            )
        return self

    def secret(self) -> str | None:
        """The password, from `password` or read from `password_file`."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            text = self.password_file.read_text()
            return text.splitlines()[0] if text else ""
        return None


class MqttConfig(MqttConnection):
    """[mqtt]: the unit's link to the operators' broker. The unit id comes from the unit config."""

    site: str = Field(description="site name, one topic level: checkpoint/v1/<site>/<unit>/...")
    client_id: str | None = Field(default=None, description="defaults to checkpoint-<site>-<unit>; keep it stable")
    heartbeat_interval_s: float = Field(default=30.0, gt=0, le=3600)
    inflight_window: int = Field(
        default=16, ge=1, le=1000, description="hits published and not yet acknowledged (capped by the broker's)"
    )
    require_subscriber: bool = Field(
        default=True,
        description="MQTT 5: keep a hit in the outbox when the broker says nobody subscribes to hits yet",
    )

    @field_validator("site")
    @classmethod
    def _site_is_topic_level(cls, v: str) -> str:
        try:
            return protocol.check_topic_level(v, "site")
        except protocol.ProtocolError as e:
            raise ValueError(str(e)) from None


class ReporterError(RuntimeError):
    """The reporter cannot accept a hit (closed, or the hit belongs to another unit)."""


_REFUSAL_HINTS = {
    0x84: 'the broker does not speak this MQTT version: set protocol = "3.1.1"',
    0x85: "the broker rejected the client id: set client_id",
    0x86: "check username and password (or password_file)",
    0x87: "the broker does not allow this user: check username/password and the broker's ACL",
    0x88: "the broker is up but not taking connections; will retry",
    0x8A: "the broker is banning this client",
}


def describe_connect_error(exc: BaseException | None, conn: MqttConnection) -> str:
    """A message an operator can act on for a failed connection attempt."""
    where = f"{conn.host}:{conn.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the certificate of {where} was not accepted ({exc.verify_message}): check that tls.ca_file "
            f"is the CA that signed the broker's certificate and that host matches its name"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake with {where} failed ({exc.reason or exc}): check that the port speaks TLS and, if the "
            f"broker asks for client certificates, tls.cert_file/tls.key_file"
        )
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}: is the broker running and listening there? (check host and port)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve broker host {conn.host!r}: {exc} (check host)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer from {where} within {conn.connect_timeout_s:g}s (broker down, or a firewall in the way?)"
    if exc is None:
        return f"cannot connect to {where}"
    return f"cannot connect to {where}: {exc}"


def build_client(conn: MqttConnection, client_id: str, *, manual_ack: bool = False, max_inflight: int = 20) -> Any:
    """A paho client for `conn` (callback API v2, persistent session), not yet connected.
    Raises ValueError naming the key when TLS files cannot be loaded."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    if conn.protocol == "5":
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack
        )
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
            manual_ack=manual_ack,
        )
    client.enable_logger(_paho_log)
    # An exception in one of our callbacks must not kill paho's network thread.
    client.suppress_exceptions = True
    client.max_inflight_messages_set(max_inflight)
    client.reconnect_delay_set(conn.reconnect_min_delay_s, conn.reconnect_max_delay_s)  # type: ignore[arg-type]
    client.connect_timeout = conn.connect_timeout_s
    if conn.username:
        client.username_pw_set(conn.username, conn.secret())
    if conn.tls is not None:
        tls = conn.tls
        try:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError) as e:
            raise ValueError(
                f"tls: cannot load ca_file/cert_file/key_file ({e}): check they are PEM files and the key matches"
            ) from None
        if tls.insecure:
            client.tls_insecure_set(True)
    return client


def connect_properties(conn: MqttConnection, receive_maximum: int | None = None) -> Any:
    """MQTT 5 CONNECT properties (session expiry, receive maximum); None for 3.1.1."""
    if conn.protocol != "5":
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = conn.session_expiry_s
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    return props


class MqttLink:
    """One paho client with its connection bookkeeping: state, last error, attempts; errors are
    logged (repeats at most once a minute) and retried by paho with capped backoff."""

    def __init__(
        self,
        conn: MqttConnection,
        client_id: str,
        *,
        name: str,
        will: tuple[str, bytes] | None = None,
        manual_ack: bool = False,
        max_inflight: int = 20,
        receive_maximum: int | None = None,
        on_connected: Callable[[bool, Any], None] | None = None,
        on_message: Callable[[Any], None] | None = None,
        on_publish: Callable[[int, Any], None] | None = None,
        on_subscribe: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.client_id = client_id
        self.state = "idle"
        self.last_error: str | None = None
        self.connect_attempts = 0
        self.connects = 0
        self.receive_maximum: int | None = None
        self._receive_maximum_asked = receive_maximum
        self._on_connected = on_connected
        self._last_logged: tuple[str, float] | None = None
        self._last_paho_error = ""
        self._connected_at = 0.0
        self.client = build_client(conn, client_id, manual_ack=manual_ack, max_inflight=max_inflight)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_pre_connect = self._handle_pre_connect
        self.client.on_connect = self._handle_connect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_log = self._handle_log
        if on_message is not None:
            self.client.on_message = lambda _c, _u, msg: on_message(msg)
        if on_publish is not None:
            self.client.on_publish = lambda _c, _u, mid, rc, _p: on_publish(mid, rc)
        if on_subscribe is not None:
            self.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: on_subscribe(list(rcs))

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def start(self) -> None:
        """Start connecting in paho's network thread; failures are retried, never raised."""
        self.state = "connecting"
        kwargs: dict[str, Any] = {"keepalive": self.conn.keepalive_s}
        if self.conn.protocol == "5":
            kwargs["clean_start"] = False
            kwargs["properties"] = connect_properties(self.conn, self._receive_maximum_asked)
        self.client.connect_async(self.conn.host, self.conn.port, **kwargs)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        self.state = "closed"
        try:
            self.client.disconnect()
        except Exception as e:  # noqa: BLE001 - a failing disconnect must not block shutdown
            log.debug("%s: disconnect: %s", self.name, e)
        self.client.loop_stop()

    def figures(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "connects": self.connects,
            "connect_attempts": self.connect_attempts,
            "last_error": self.last_error,
        }

    def note_error(self, message: str) -> None:
        """Record a problem and log it (the same message at most once a minute)."""
        self.last_error = message
        now = time.monotonic()
        if self._last_logged is None or self._last_logged[0] != message or now - self._last_logged[1] > 60:
            self._last_logged = (message, now)
            log.error(
                "%s: %s; retrying (backoff %g..%gs)",
                self.name,
                message,
                self.conn.reconnect_min_delay_s,
                self.conn.reconnect_max_delay_s,
            )

    def _handle_pre_connect(self, _client: Any, _userdata: Any) -> None:
        self.connect_attempts += 1
        if self.state != "closed":
            self.state = "connecting"

    def _handle_connect(self, _client: Any, _userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            if self.state != "closed":
                self.state = "disconnected"
            hint = _REFUSAL_HINTS.get(reason.value, "")
            self.note_error(
                f"broker {self.conn.host}:{self.conn.port} refused the connection: {reason}"
                + (f" ({hint})" if hint else "")
            )
            return
        self.state = "connected"
        self._connected_at = time.monotonic()
        self.connects += 1
        self.last_error = None
        self._last_logged = None
        self.receive_maximum = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        log.info(
            "%s: connected to %s:%d as %s (MQTT %s, session %s)",
            self.name,
            self.conn.host,
            self.conn.port,
            self.client_id,
            self.conn.protocol,
            "resumed" if flags.session_present else "new",
        )
        if self._on_connected is not None:
            try:
                self._on_connected(bool(flags.session_present), properties)
            except Exception:  # noqa: BLE001 - keep the network thread alive
                log.exception("%s: on-connect handler failed", self.name)

    def _handle_connect_fail(self, _client: Any, _userdata: Any) -> None:
        # paho calls this from inside its `except OSError` block: the exception is still current.
        exc = sys.exc_info()[1]
        if self.state != "closed":
            self.state = "disconnected"
        self.note_error(describe_connect_error(exc, self.conn))

    def _handle_log(self, _client: Any, _userdata: Any, level: int, text: str) -> None:
        import paho.mqtt.client as mqtt

        # Socket and TLS failures after the handshake reach us only through paho's log.
        if level == mqtt.MQTT_LOG_ERR and not text.startswith("Client is not connected"):
            self._last_paho_error = text

    def _handle_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self.state
        if was == "closed":
            return
        self.state = "disconnected"
        if was == "disconnected":
            return  # the CONNACK refusal was already reported
        detail = self._last_paho_error or str(reason)
        self._last_paho_error = ""
        where = f"{self.conn.host}:{self.conn.port}"
        if was == "connected":
            hint = ""
            if time.monotonic() - self._connected_at < 5.0:
                hint = (
                    "; dropped right after connecting: check the broker's log (Mosquitto drops clients whose "
                    "ACL forbids their topics, or when another client takes the same client id)"
                )
            self.note_error(f"lost the connection to {where} ({detail}){hint}")
        elif "certificate" in detail.lower():
            self.note_error(
                f"{where} closed the connection during set-up ({detail}): the broker wants a client certificate "
                f"it trusts; set tls.cert_file and tls.key_file"
            )
        else:
            self.note_error(f"{where} closed the connection before accepting it ({detail}); check the broker's log")


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
        self.unit_id = protocol.check_topic_level(unit_id, "unit id")
        self.site = config.site
        self.hits_topic = protocol.topic(self.site, self.unit_id, "hits")
        self.status_topic = protocol.topic(self.site, self.unit_id, "status")
        self.heartbeat_topic = protocol.topic(self.site, self.unit_id, "heartbeat")
        self._status_provider = status_provider
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
        self._thread: threading.Thread | None = None
        client_id = config.client_id or f"checkpoint-{self.site}-{self.unit_id}"
        try:
            self.link = MqttLink(
                config,
                client_id,
                name=f"mqtt reporter {self.site}/{self.unit_id}",
                will=(
                    self.status_topic,
                    protocol.status_payload(self.site, self.unit_id, "offline", "connection lost"),
                ),
                max_inflight=config.inflight_window + 1,
                on_connected=self._on_connected,
                on_publish=self._on_publish,
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
        record = protocol.encode_record(protocol.hit_record(hit, self.site, queued_at=now))
        self.outbox.put(hit.id, record, hit.crop_jpeg, queued_at=now)
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

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until the outbox is empty; True if it is."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        return self.outbox.depth == 0

    def close(self, timeout: float = 5.0) -> None:
        """Send what can be sent within `timeout` s, publish 'offline', disconnect. Unsent hits stay
        in the outbox for the next start."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        if self.link.connected:
            self.flush(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        if self.link.connected:
            info = self.link.client.publish(
                self.status_topic,
                protocol.status_payload(self.site, self.unit_id, "offline", "shutdown"),
                qos=1,
                retain=True,
            )
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                log.debug("offline status not confirmed: %s", e)
        self.link.stop()
        self._process_acks()
        left = self.outbox.depth
        self.outbox.close()
        if left:
            log.info("mqtt reporter closed with %d hits still in the outbox; they go out on the next start", left)

    # --- paho callbacks (network thread) ------------------------------------------------------

    def _on_connected(self, _session_present: bool, _properties: Any) -> None:
        self.link.client.publish(
            self.status_topic,
            protocol.status_payload(self.site, self.unit_id, "online", "connected"),
            qos=1,
            retain=True,
        )
        self._heartbeat_due = 0.0
        self._hold_until = 0.0
        self._wake.set()

    def _on_publish(self, mid: int, reason: Any) -> None:
        self._acks.append((mid, reason))
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
                self._process_acks()
                if self.link.connected:
                    self._publish_pending()
                    if time.monotonic() >= self._heartbeat_due:
                        self._send_heartbeat()
                        self._heartbeat_due = time.monotonic() + self.config.heartbeat_interval_s
            except OutboxError as e:
                self.link.note_error(str(e))
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - the publisher must outlive any single failure
                log.exception("mqtt reporter %s: publisher step failed; continuing", self.unit_id)
                self._stop.wait(1.0)

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
        if acked:
            self.outbox.ack(acked)
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
        elif acked:
            self._hold_delay = 0.0
            if self.link.last_error and self.link.connected:
                self.link.last_error = None

    def _publish_pending(self) -> None:
        import paho.mqtt.client as mqtt

        if time.monotonic() < self._hold_until:
            return
        rows = self.outbox.take(self._window() - self.outbox.inflight)
        for i, row in enumerate(rows):
            payload = protocol.hit_payload(row.record, row.crop, row.crop_dropped)
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
            except Exception as e:  # noqa: BLE001 - a broken provider must not stop heartbeats
                log.warning("mqtt reporter %s: status provider failed: %s", self.unit_id, e)
                unit = {"error": f"status provider failed: {e}"}
        outbox = self.outbox.stats()
        outbox["inflight"] = self.outbox.inflight
        outbox["refused"] = self._refused
        try:
            payload = protocol.heartbeat_payload(
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
            payload = protocol.heartbeat_payload(
                self.site,
                self.unit_id,
                interval_s=self.config.heartbeat_interval_s,
                uptime_s=time.monotonic() - self._started_at,
                unit={"error": f"figures not JSON-serialisable: {e}"},
                outbox=outbox,
                link=self.link.figures(),
            )
        self.link.client.publish(self.heartbeat_topic, payload, qos=0, retain=True)
