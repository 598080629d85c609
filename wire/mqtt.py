"""The one MQTT link every role uses: connection settings, TLS, credentials, reconnects, and error
messages an operator can act on ("not authorised", "certificate", "unreachable").

`MqttConnection` is the config table (host, port, TLS, credentials, backoff); `MqttLink` wraps one
paho client with its state and last error; `build_client` makes a bare client for short-lived tools.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from common.config import StrictModel

log = logging.getLogger(__name__)


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


class TlsConfig(StrictModel):
    """[mqtt.tls]: TLS to the broker. Without ca_file the system's CA store is used."""

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


class MqttConnection(StrictModel):
    """How to reach the broker: address, protocol, session, credentials, TLS and reconnect backoff."""

    host: str = Field(default="localhost", min_length=1)
    port: int = Field(default=1883, strict=True, description="1883 plain, 8883 usually for TLS")
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
    reconnect_min_delay_s: float = Field(default=1.0, gt=0, le=3600)
    reconnect_max_delay_s: float = Field(default=60.0, gt=0, le=3600)

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


_REFUSAL_HINTS = {
    0x84: 'the broker does not speak this MQTT version: set protocol = "3.1.1"',
    0x85: "the broker rejected the client id: set client_id",
    0x86: "not authorised: check username and password (or password_file)",
    0x87: "not authorised: the broker does not allow this user: check username/password and the broker's ACL",
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
        return (
            f"broker unreachable: connection refused by {where}: is the broker running and listening there? "
            f"(check host and port)"
        )
    if isinstance(exc, socket.gaierror):
        return f"broker unreachable: cannot resolve broker host {conn.host!r}: {exc} (check host)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return (
            f"broker unreachable: no answer from {where} within {conn.connect_timeout_s:g}s "
            f"(broker down, or a firewall in the way?)"
        )
    if isinstance(exc, OSError):
        return f"broker unreachable: cannot connect to {where}: {exc}"
    if exc is None:
        return f"cannot connect to {where}"
    return f"cannot connect to {where}: {exc}"


def build_client(
    conn: MqttConnection, client_id: str, *, manual_ack: bool = False, max_inflight: int = 20, clean: bool = False
) -> Any:
    """A paho client for `conn` (callback API v2; a persistent session unless `clean`), not yet
    connected. Raises ValueError naming the key when TLS files cannot be loaded."""
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
            clean_session=clean,
            manual_ack=manual_ack,
        )
    client.enable_logger(_paho_log)
    # An exception in one of our callbacks must not kill paho's network thread.
    client.suppress_exceptions = True
    client.max_inflight_messages_set(max_inflight)
    # paho annotates the delays as int but only doubles, caps and adds them to a clock: fractions work.
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


def connect_properties(conn: MqttConnection, receive_maximum: int | None = None, keep_session: bool = True) -> Any:
    """MQTT 5 CONNECT properties (session expiry, receive maximum); None for 3.1.1. Without
    `keep_session` the broker forgets the session at disconnect (short-lived tools, retained-only readers)."""
    if conn.protocol != "5":
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    # paho's Properties.__init__ has no annotations.
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = conn.session_expiry_s if keep_session else 0
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
        on_suback: Callable[[int, list[Any]], None] | None = None,
        clean_start: bool = False,
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
        self.clean_start = clean_start
        self.client = build_client(conn, client_id, manual_ack=manual_ack, max_inflight=max_inflight, clean=clean_start)
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
        elif on_suback is not None:
            self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: on_suback(mid, list(rcs))

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def wait_connected(self, timeout: float) -> str | None:
        """Wait until the link is connected (None) or its first attempt failed (the error message);
        for short-lived tools that must fail fast instead of retrying. Times out with a message too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state == "connected":
                return None
            if self.last_error is not None:
                return self.last_error
            time.sleep(0.01)
        return (
            f"broker unreachable: no connection to {self.conn.host}:{self.conn.port} within {timeout:g}s "
            f"(broker down, or a firewall in the way?)"
        )

    def start(self) -> None:
        """Start connecting in paho's network thread; failures are retried, never raised."""
        self.state = "connecting"
        kwargs: dict[str, Any] = {"keepalive": self.conn.keepalive_s}
        if self.conn.protocol == "5":
            kwargs["clean_start"] = self.clean_start
            kwargs["properties"] = connect_properties(
                self.conn, self._receive_maximum_asked, keep_session=not self.clean_start
            )
        self.client.connect_async(self.conn.host, self.conn.port, **kwargs)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        self.state = "closed"
        try:
            self.client.disconnect()
        except Exception as e:  # a failing disconnect must not block shutdown
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
            except Exception:  # keep the network thread alive
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
