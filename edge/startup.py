"""The unit's checks at start: the face models load, their known-answer self-test passes on this CPU,
the unit's own threshold suits the model that loaded, and the canary has its pictures.

A check that fails raises DaemonError with what to fix; SelfTestFailed when the CPU computes wrong
answers, on which the unit must not run at all (`edge run` exits with SELFTEST_FAILED, and systemd does
not restart it).
"""

from __future__ import annotations

import logging
from typing import Any

from edge.config import UnitConfig

log = logging.getLogger(__name__)


class DaemonError(RuntimeError):
    """The unit could not start (models, watchlist, sinks or cameras); the message says what to fix."""


class SelfTestFailed(DaemonError):
    """The known-answer self-test gave a wrong answer: the unit must not run on this machine as it is."""


def load_engine(cfg: UnitConfig) -> Any:
    """The face engine `cfg` names, loaded (DaemonError when it cannot be)."""
    from engines.errors import EngineError
    from engines.face_engine import FaceEngine

    try:
        return FaceEngine.load(cfg.engine)
    except EngineError as exc:
        raise DaemonError(f"face models could not be loaded: {exc}") from exc


def selftest(engine: Any) -> dict[str, Any]:
    """The known-answer self-test of the engine and the matcher (edge.probe.unit_selftest): its result,
    or SelfTestFailed."""
    from edge.probe import unit_selftest
    from engines.errors import EngineError
    from matching.selftest import MatcherSelfTestError

    try:
        return unit_selftest(engine)
    except (EngineError, MatcherSelfTestError) as exc:
        raise SelfTestFailed(f"the unit refuses to start: {exc}") from exc


def threshold_range(cfg: UnitConfig, engine: Any) -> tuple[float, float]:
    """The thresholds a list may set for the engine that loaded (its calibration's range; (0, 1) for a
    model without one). DaemonError when the unit's own [matching] threshold is outside the range."""
    from engines.calibration import Calibration, CalibrationError
    from watchlist.format.verify import MODEL_INDEPENDENT_THRESHOLD_RANGE

    threshold = cfg.matching.threshold
    try:
        # A threshold at or below the strangers' median would make most passers-by alerts: the list's
        # are checked as bundles arrive, the unit's own here (the config check made it for the model
        # the config names; this is the calibration of the engine that actually loaded).
        cal = Calibration.for_engine(engine)
        found = cal.threshold_range
    except CalibrationError as exc:
        log.warning("thresholds are checked against (0, 1) only: %s", exc)
        return MODEL_INDEPENDENT_THRESHOLD_RANGE
    problem = None if threshold is None else cal.threshold_problem(threshold)
    if problem is not None:
        raise DaemonError(f"[matching] threshold {problem}; or remove it to use the watchlist's threshold")
    return found


def canary_frames(cfg: UnitConfig) -> tuple[list[Any], str | None]:
    """The canary's frames, made from the cached picture; without the picture, no frames and why."""
    from engines.cache import default_cache_dir
    from engines.canary_media import CanaryPictureError, ensure_canary_picture, load_canary_picture
    from engines.canary_media import canary_frames as make_frames

    try:
        path = ensure_canary_picture(cfg.engine.cache_dir or default_cache_dir(), fetch=False)
        return make_frames(load_canary_picture(path), cfg.canary.frames), None
    except (CanaryPictureError, OSError) as exc:
        return [], f"no canary pictures: {exc}"
