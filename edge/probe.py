"""`edge check-config --probe`: try what a config points at before the unit runs on it. Each
camera is opened and one frame read (its size says what arrives). With [mqtt]: the unit's account
connects (TLS, credentials) and publishes one probe message on its hits topic, which must be
acknowledged, not refused by the ACL (receivers set it aside as a malformed hit); the watchlist
reader's account connects and must find HQ's retained manifest on [watchlist] topic; and a unit
without `signing_key` fails, since the centre refuses unsigned hits from units it holds a key for.
The site broker binds a client id to its account (deploy/mosquitto/checkpoint.conf), so these
connections would cut a running unit off: the broker is not probed while the unit holds its
outbox. The unit's account resumes the unit's own session without clearing it or acknowledging
what waits there. The known-answer self-test of the face models and the matcher (`unit_selftest`)
runs here too, and at every start of `edge run`."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.camera.config import CaptureConfig
from edge.camera.urls import redact_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found: `ok`, and a line saying what worked or what to check."""

    what: str  # "camera gate", "broker"
    ok: bool
    detail: str


def _in_thread(fn: Any, timeout: float) -> tuple[bool, Any]:
    """Run `fn` with a deadline: (finished, its result or exception). A read that blocks past the
    deadline is left behind (daemon thread), as the capture threads do."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported to the caller, who decides
            out["error"] = exc

    th = threading.Thread(target=call, name="probe", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        return False, None
    return True, out.get("error", out.get("value"))


def probe_camera(camera: Any) -> ProbeResult:
    """Open `camera` (a [[cameras]] entry) with its backend and read one frame."""
    from edge.camera.sources import open_source

    cfg = CaptureConfig.model_validate(camera.model_dump(include=set(CaptureConfig.model_fields)))
    what = f"camera {cfg.id}"

    def one_frame() -> tuple[int, int, str]:
        source = open_source(cfg)
        try:
            picture, _ = source.read()
            image = picture.rgb()
            return image.shape[1], image.shape[0], cfg.backend
        finally:
            source.close()

    limit = cfg.open_timeout_s + cfg.read_timeout_s + 2.0
    done, value = _in_thread(one_frame, limit)
    if not done:
        return ProbeResult(what, False, f"{redact_url(cfg.url)}: no frame within {limit:g} s (open + read timeouts)")
    if isinstance(value, BaseException):
        return ProbeResult(what, False, f"{redact_url(cfg.url)}: {value}")
    w, h, _ = value
    return ProbeResult(what, True, f"{redact_url(cfg.url)}: one frame, {w}x{h}, via {cfg.backend}")


class _Session:
    """One short MQTT connection of the probe: connect, wait for the CONNACK, and record PUBACKs,
    UNSUBACKs and messages."""

    def __init__(self, conn: Any, client_id: str, keep_session: bool) -> None:
        from wire.mqtt import build_client, connect_properties

        self.conn = conn
        self.where = f"{conn.host}:{conn.port}"
        self._cond = threading.Condition()
        self.connack: Any = None
        self.acks: dict[int, Any] = {}
        self.unsubacks: set[int] = set()
        self.messages: list[tuple[str, bytes]] = []
        # manual_ack: what the broker holds for the unit's session is delivered here but never
        # acknowledged, so it stays there for the unit.
        self.client = build_client(conn, client_id, manual_ack=True, clean=not keep_session)
        self._properties = connect_properties(conn, keep_session=keep_session)
        self._keep = keep_session
        self.client.on_connect = lambda _c, _u, _f, reason, _p=None: self._note("connack", reason)
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self._note("ack", (mid, reason))
        self.client.on_unsubscribe = lambda _c, _u, mid, _r, _p: self._note("unsuback", mid)
        self.client.on_message = lambda _c, _u, msg: self._note("message", (msg.topic, bytes(msg.payload)))

    def _note(self, kind: str, value: Any) -> None:
        with self._cond:
            if kind == "connack":
                self.connack = value
            elif kind == "ack":
                self.acks[value[0]] = value[1]
            elif kind == "unsuback":
                self.unsubacks.add(value)
            else:
                self.messages.append(value)
            self._cond.notify_all()

    def wait(self, predicate: Any) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, self.conn.connect_timeout_s)

    def open(self) -> str | None:
        """Connect; None, or what went wrong."""
        from wire.mqtt import _REFUSAL_HINTS, describe_connect_error

        kwargs: dict[str, Any] = {"keepalive": 30}
        if self.conn.protocol == "5":
            kwargs.update(clean_start=not self._keep, properties=self._properties)
        try:
            self.client.connect(self.conn.host, self.conn.port, **kwargs)
        except (OSError, ValueError) as exc:
            return describe_connect_error(exc, self.conn)
        self.client.loop_start()
        if not self.wait(lambda: self.connack is not None):
            return describe_connect_error(TimeoutError(), self.conn)
        if self.connack.is_failure:
            hint = _REFUSAL_HINTS.get(self.connack.value, "")
            return f"{self.where} refused the connection: {self.connack}" + (f" ({hint})" if hint else "")
        return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def unit_running(outbox_path: Path) -> bool:
    """Whether a unit holds the outbox at `outbox_path` (its lock file is locked), i.e. is running."""
    try:
        fd = os.open(f"{outbox_path}.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def probe_broker(mqtt: Any, site: str, unit_id: str) -> ProbeResult:
    """Connect as the unit (TLS, credentials, in its own session) and publish one probe message on its
    hits topic: OK when the broker acknowledges it, FAILED with the reason when it refuses."""
    from wire import topics

    hits = topics.topic(site, unit_id, "hits")
    try:
        session = _Session(mqtt, mqtt.client_id or f"checkpoint-{site}-{unit_id}", keep_session=True)
    except ValueError as exc:
        return ProbeResult("broker", False, f"{mqtt.host}:{mqtt.port}: {exc}")
    try:
        problem = session.open()
        if problem is not None:
            return ProbeResult("broker", False, problem)
        probe = {"probe": "edge check-config --probe", "site": site, "unit_id": unit_id}
        info = session.client.publish(hits, json.dumps(probe).encode(), qos=1)
        if not session.wait(lambda: info.mid in session.acks):
            return ProbeResult("broker", False, f"{session.where} did not acknowledge a message on {hits}")
        reason = session.acks[info.mid]
        if reason.is_failure:
            return ProbeResult(
                "broker",
                False,
                f"{session.where} refused a message on {hits}: {reason} (the broker's ACL must let "
                f"{mqtt.username} publish there: the site's ACL gives account '<site>/<unit>' its own "
                f'topics, so set [mqtt] username = "{site}/{unit_id}")',
            )
        tls = ", TLS" if mqtt.tls is not None else ""
        user = f", as {mqtt.username}" if mqtt.username else ""
        return ProbeResult(
            "broker",
            True,
            f"connected to {session.where} (MQTT {mqtt.protocol}{tls}{user}); {hits} accepted ({reason})",
        )
    finally:
        session.close()


def probe_watchlist(mqtt: Any, prefix: str, unit_id: str) -> ProbeResult:
    """Connect as the watchlist reader and read HQ's retained manifest of the full list under `prefix`
    ([watchlist] topic): OK with its version, FAILED when the login fails or no manifest comes."""
    from watchlist.format.transport import Manifest, manifest_topic

    conn = mqtt.watchlist_connection(unit_id)
    where = f"watchlist {prefix}"
    # Read with the unit's own account (no reader account configured), the probe must not clear the
    # unit's session, which the broker keys by that account.
    own = conn.username == mqtt.username
    client_id = (mqtt.client_id or f"checkpoint-{mqtt.site}-probe") if own else f"{conn.username}-probe"
    try:
        session = _Session(conn, client_id, keep_session=own)
    except ValueError as exc:
        return ProbeResult(where, False, f"{conn.host}:{conn.port}: {exc}")
    try:
        problem = session.open()
        if problem is not None:
            return ProbeResult(where, False, f"as {conn.username}: {problem}")
        topic = manifest_topic(prefix, "full")
        session.client.subscribe(topic, qos=1)
        # A retained message is sent right after its SUBACK, so once the UNSUBACK that follows is
        # here, a manifest on the topic would be here too.
        _rc, mid = session.client.unsubscribe(topic)
        if not session.wait(lambda: mid in session.unsubacks):
            return ProbeResult(where, False, f"{session.where} did not answer the subscription to {topic}")
        if not session.messages:
            return ProbeResult(
                where,
                False,
                f"no manifest on {topic}: either HQ has published no list for this site yet, or the broker's "
                f"ACL does not let {conn.username} read it (the site's ACL serves checkpoint/v1/<site>/watchlist)",
            )
        try:
            manifest = Manifest.from_bytes(session.messages[0][1])
        except ValueError as exc:
            return ProbeResult(where, False, f"the manifest on {topic} does not parse: {exc}")
        return ProbeResult(where, True, f"read as {conn.username}: full list version {manifest.version} on offer")
    finally:
        session.close()


def probe_signing(mqtt: Any) -> ProbeResult:
    """FAILED when [mqtt] has no signing_key: the centre refuses (quarantines as `unsigned`) the hits
    of a unit whose key it holds, and holds the key of every unit make-credentials made."""
    if mqtt.signing_key is None:
        return ProbeResult(
            "signing",
            False,
            "[mqtt] has no signing_key: hits go unsigned and the centre quarantines them as 'unsigned'; "
            'set signing_key = "/etc/checkpoint/signing.key" (make-credentials unit wrote it, with its line in mqtt.toml)',
        )
    return ProbeResult("signing", True, f"hits and status are signed with {mqtt.signing_key}")


def probe_all(cfg: Any) -> list[ProbeResult]:
    """Every enabled camera, then (when [mqtt] is configured) signing, the unit's account and the
    watchlist reader's, unless the unit is running."""
    results = [probe_camera(cam) for cam in cfg.enabled_cameras]
    if cfg.mqtt is None:
        return results
    results.append(probe_signing(cfg.mqtt))
    if unit_running(cfg.outbox.path):
        results.append(
            ProbeResult(
                "broker",
                False,
                f"not probed: the unit is running (it holds {cfg.outbox.path}); the broker binds a client id to "
                "its account, so the probe would cut it off: stop it first (systemctl stop checkpoint-edge)",
            )
        )
        return results
    results.append(probe_broker(cfg.mqtt, cfg.unit.site, cfg.unit.id))
    if cfg.watchlist.topic is not None:
        results.append(probe_watchlist(cfg.mqtt, cfg.watchlist.topic, cfg.unit.id))
    return results


def unit_selftest(engine: Any, threads: int | None = None) -> dict[str, Any]:
    """The known-answer self-test of the unit's engine and matcher (engines.known_answers,
    matching.selftest): its result for the unit's status and heartbeat (passed, what was checked,
    CPU features, duration, the engine's precision fallback). Raises engines' SelfTestError, or
    matching's MatcherSelfTestError, naming the wrong answer and the CPU features."""
    from engines.known_answers import check_engine
    from matching.selftest import check_matcher

    report = check_engine(engine)
    matcher = check_matcher(int(engine.embedding_dim), threads, report.cpu_features)
    fallback = getattr(engine, "precision_fallback", None)
    duration = report.duration_s + matcher.duration_s
    log.info(
        "known-answer self-test passed in %.2f s: %s at %s, matcher top-k on %d worst-case templates%s; CPU features: %s",
        duration,
        ", ".join(report.checks) or "no engine network (no stored answers)",
        report.precision,
        matcher.templates,
        f"; embedder precision fell back: {fallback}" if fallback else "",
        ", ".join(report.cpu_features) or "none read",
    )
    return {
        "passed": True,
        "checks": [*report.checks, "matcher"],
        "unchecked": list(report.unchecked),
        "cpu_features": list(report.cpu_features),
        "duration_s": round(duration, 3),
        "precision_fallback": fallback,
    }


def selftest_result(cfg: Any) -> ProbeResult:
    """Load the config's face models and run `unit_selftest` on them, as a probe result."""
    from engines.errors import EngineError
    from engines.face_engine import FaceEngine
    from matching.selftest import MatcherSelfTestError

    try:
        engine = FaceEngine.load(cfg.engine)
    except EngineError as exc:
        return ProbeResult("self-test", False, f"the face models could not be loaded: {exc}")
    try:
        st = unit_selftest(engine)
    except (EngineError, MatcherSelfTestError) as exc:
        return ProbeResult("self-test", False, str(exc))
    unchecked = f"; no stored answers for: {', '.join(st['unchecked'])}" if st["unchecked"] else ""
    fallback = f"; embedder precision fell back: {st['precision_fallback']}" if st["precision_fallback"] else ""
    return ProbeResult(
        "self-test",
        True,
        f"right answers from {', '.join(st['checks'])} in {st['duration_s']:.2f} s{unchecked}{fallback}; "
        f"CPU features: {', '.join(st['cpu_features']) or 'none read'}",
    )
