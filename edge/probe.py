"""`edge check-config --probe`: try what a config points at before the unit runs on it. Each
camera is opened and one frame read (its size says what arrives); the broker is connected to
with the unit's credentials and TLS, under a client id of its own so that a running unit's
session is left alone. The known-answer self-test of the face models and the matcher
(`unit_selftest`) runs here too, and at every start of `edge run`."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
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


def probe_broker(mqtt: Any, site: str, unit_id: str) -> ProbeResult:
    """Connect to the [mqtt] broker as the unit would (TLS, credentials), then disconnect."""
    from wire.mqtt import _REFUSAL_HINTS, build_client, describe_connect_error

    where = f"{mqtt.host}:{mqtt.port}"
    try:
        client = build_client(mqtt, f"checkpoint-{site}-{unit_id}-probe-{uuid.uuid4().hex[:6]}")
    except ValueError as exc:
        return ProbeResult("broker", False, f"{where}: {exc}")
    answered = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        result["reason"] = reason
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=30)
    except (OSError, ValueError) as exc:
        return ProbeResult("broker", False, describe_connect_error(exc, mqtt))
    client.loop_start()
    try:
        if not answered.wait(mqtt.connect_timeout_s):
            return ProbeResult("broker", False, describe_connect_error(TimeoutError(), mqtt))
        reason = result["reason"]
        if reason.is_failure:
            hint = _REFUSAL_HINTS.get(reason.value, "")
            return ProbeResult(
                "broker", False, f"{where} refused the connection: {reason}" + (f" ({hint})" if hint else "")
            )
        tls = ", TLS" if mqtt.tls is not None else ""
        user = f", as {mqtt.username}" if mqtt.username else ""
        return ProbeResult("broker", True, f"connected to {where} (MQTT {mqtt.protocol}{tls}{user})")
    finally:
        client.disconnect()
        client.loop_stop()


def probe_all(cfg: Any) -> list[ProbeResult]:
    """Every enabled camera, then the broker (when [mqtt] is configured)."""
    results = [probe_camera(cam) for cam in cfg.enabled_cameras]
    if cfg.mqtt is not None:
        results.append(probe_broker(cfg.mqtt, cfg.unit.site, cfg.unit.id))
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
