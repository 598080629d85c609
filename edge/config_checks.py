"""The unit config's raw values around pydantic's validation: relative paths made relative to the
file's folder, the site [mqtt] takes from [unit], and the problems the field models do not find:
numbers that are not finite or are quoted, values no unit can work with (a threshold of 0, timings
too short or too long), files the config names that cannot be used, and a threshold its model's
calibration rules out.

Each check reads the raw values, so its problems are reported alongside pydantic's own; each
returns (key, message) pairs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from edge.config_keys import default_of, dotted, expand, finite_number, model_of, raw_value
from engines.calibration import Calibration, CalibrationError
from engines.config import EngineConfig


def value_problems(raw: dict[str, Any], root: type[BaseModel]) -> list[tuple[str, str]]:
    """Non-finite numbers anywhere, and quoted numbers where the key takes a number (pydantic would take "1883");
    `raw` is validated as `root`."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), raw)]
    while stack:  # iterative: a deeply nested file must not overflow the stack here
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((loc + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((loc + (i,), v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            key = dotted(loc)
            out.append((key, f"{key}: {value} is not a usable value; give a finite number"))
    _quoted_numbers(root, raw, (), out)
    return sorted(out)


def _quoted_numbers(model: type[BaseModel], raw: Any, loc: tuple[Any, ...], out: list[tuple[str, str]]) -> None:
    if not isinstance(raw, dict):
        return
    for fname, field in model.model_fields.items():
        if fname not in raw:
            continue
        value, here = raw[fname], loc + (fname,)
        if isinstance(value, str) and _number_only(field.annotation):
            key = dotted(here)
            out.append((key, f"{key}: must be a number, got the text {value!r}; remove the quotes"))
            continue
        sub = model_of(field.annotation)
        if sub is None:
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            _quoted_numbers(sub, item, here if i is None else here + (i,), out)


def _number_only(annotation: Any) -> bool:
    args = [a for a in (getattr(annotation, "__args__", None) or (annotation,)) if a is not type(None)]
    return bool(args) and all(a in (int, float) for a in args)


# Sane ranges of the timing keys, where the field models leave them wider: (shortest, longest) in
# seconds, None where the model's own bound holds. Below the shortest the unit would do little but
# this (heartbeat_interval_s = 1e-9 sent 4,493 heartbeats in 5 s; a track ending after 1e-9 s makes
# every face a new track, embedded each frame); beyond the longest it would in effect never act again.
# "*" stands for every item of a list ([[cameras]]).
_TIMINGS: dict[tuple[str, ...], tuple[float | None, float | None]] = {
    ("cameras", "*", "open_timeout_s"): (0.5, None),
    ("cameras", "*", "read_timeout_s"): (0.1, None),
    ("cameras", "*", "stall_timeout_s"): (0.1, None),
    ("cameras", "*", "reconnect_min_s"): (0.1, None),
    ("cameras", "*", "reconnect_max_s"): (0.1, None),
    ("analysis", "tracker", "max_age_s"): (0.05, 60.0),
    ("analysis", "tracker", "change_gap_s"): (0.01, 60.0),
    ("analysis", "gating", "full_frame_interval_s"): (0.01, None),
    ("analysis", "gating", "max_gap_s"): (0.01, None),
    ("matching", "cooldown_s"): (None, 86400.0),  # 0 is a choice: every match a hit
    ("matching", "reembed_interval_s"): (None, 3600.0),  # 0 is a choice: any better face at once
    ("matching", "recheck_interval_s"): (0.1, 3600.0),
    ("mqtt", "connect_timeout_s"): (0.5, None),
    ("mqtt", "reconnect_min_delay_s"): (0.1, 3600.0),
    ("mqtt", "reconnect_max_delay_s"): (0.1, 3600.0),
    ("mqtt", "heartbeat_interval_s"): (1.0, None),
    ("logging", "stats_interval_s"): (None, 86400.0),
}
# Frames analysed per second, at least: fewer leaves a camera in effect unwatched.
_LEAST_ANALYSIS_FPS = 0.1


def _seconds(s: float) -> str:
    """A duration in words for messages: "a day", "an hour", "a minute", else seconds."""
    return {86400.0: "a day", 3600.0: "an hour", 60.0: "a minute"}.get(s, f"{s:g} s")


def _timing_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for pattern, (shortest, longest) in _TIMINGS.items():
        for loc in expand(raw, pattern):
            v = finite_number(raw, loc)
            key = dotted(loc)
            if v is None:
                continue
            if shortest is not None and v < shortest:
                out.append(
                    (
                        key,
                        f"{key}: {v:g} s is shorter than {shortest:g} s: the unit would do little but this; give at least {shortest:g}",
                    )
                )
            elif longest is not None and v > longest:
                out.append(
                    (
                        key,
                        f"{key}: {v:g} s is longer than {_seconds(longest)} ({longest:g} s); give at most {longest:g}",
                    )
                )
    for loc in expand(raw, ("cameras", "*", "analysis_fps")):
        v = finite_number(raw, loc)
        if v is not None and 0 < v < _LEAST_ANALYSIS_FPS:
            key = dotted(loc)
            out.append(
                (
                    key,
                    f"{key}: {v:g} frames per second leaves the camera in effect unwatched; give at least "
                    f"{_LEAST_ANALYSIS_FPS:g} (or enabled = false to keep the camera off)",
                )
            )
    return out


def range_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Values the field models allow but no unit can work with; read from the raw values, so they are
    reported alongside any other problem."""
    out: list[tuple[str, str]] = []
    t = finite_number(raw, ("matching", "threshold"))
    if t is not None and t <= 0.0:
        out.append(
            (
                "matching.threshold",
                f"matching.threshold: {t:g} would let strangers match (unrelated faces score about 0); give a "
                "value in (0, 1), or remove the key to use the watchlist's calibrated default",
            )
        )
    q = finite_number(raw, ("matching", "min_quality"))
    if q is not None and q > 1.0:
        out.append(
            (
                "matching.min_quality",
                f"matching.min_quality: {q:g} is above 1, the best quality score: no face would ever be embedded; "
                "give a value in [0, 1] (0 keeps the engine's own checks only)",
            )
        )
    return out + _timing_problems(raw)


def resolve_paths(model: type[BaseModel], raw: Any, base_dir: Path) -> None:
    """Make relative paths in `raw` (for fields typed Path) relative to `base_dir`, in place."""
    if not isinstance(raw, dict):
        return
    for fname, field in model.model_fields.items():
        if fname not in raw:
            continue
        value = raw[fname]
        if _is_path_type(field.annotation):
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                raw[fname] = str(base_dir / value)
            continue
        sub = model_of(field.annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for item in value:
                resolve_paths(sub, item, base_dir)
        else:
            resolve_paths(sub, value, base_dir)


def _is_path_type(annotation: Any) -> bool:
    if annotation is Path:
        return True
    return any(a is Path for a in getattr(annotation, "__args__", ()) or ())


def resolve_camera_files(raw: dict[str, Any], base_dir: Path) -> None:
    """Make a camera url that is a plain relative path, a video file, relative to `base_dir`, in place."""
    cams = raw.get("cameras")
    if not isinstance(cams, list):
        return
    for cam in cams:
        url = cam.get("url") if isinstance(cam, dict) else None
        if isinstance(url, str) and url.strip() and "://" not in url and not url.strip().isdigit():
            if not url.startswith(("/", "~")):
                cam["url"] = str(base_dir / url.strip())


def inherit_site(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Give [mqtt] the site of [unit], in place; a problem if [mqtt] names another one."""
    # The site is said once, in [unit]; [mqtt] may repeat it but must then agree.
    unit, mqtt = raw.get("unit"), raw.get("mqtt")
    if not isinstance(unit, dict) or not isinstance(mqtt, dict):
        return []
    if "site" not in mqtt:
        if "site" in unit:
            mqtt["site"] = unit["site"]
    elif "site" in unit and mqtt["site"] != unit["site"]:
        return [
            (
                "mqtt.site",
                f"mqtt.site: {mqtt['site']!r} differs from unit.site {unit['site']!r}; "
                "remove mqtt.site (it defaults to unit.site) or make them equal",
            )
        ]
    return []


# File systems the kernel makes up: nothing written there survives, or writing there is harmful.
_VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
MAX_ROOT_KEY_BYTES = 64 * 1024


def file_problems(raw: dict[str, Any], root: type[BaseModel]) -> list[tuple[str, str]]:
    """Problems with the files the config names, read from the raw values (so they are found even when
    other keys are wrong); a file left out is `root`'s default where its table is given."""
    out: list[tuple[str, str]] = []
    spec = raw_value(raw, ("engine", "embedder"))
    if isinstance(spec, dict):
        onnx = spec.get("onnx")
        if onnx is None:
            out.append(
                (
                    "engine.embedder.onnx",
                    "engine.embedder.onnx: a custom embedder needs the path of its ONNX model file",
                )
            )
        elif isinstance(onnx, str) and not Path(onnx).is_file():
            out.append(
                (
                    "engine.embedder.onnx",
                    f"engine.embedder.onnx: model file {onnx} not found; copy the model there or correct the path "
                    "(relative paths start at the config file's folder)",
                )
            )
    root_key = raw_value(raw, ("watchlist", "root_key"))
    if isinstance(root_key, str):
        problem = _root_key_problem(Path(root_key))
        if problem:
            out.append(("watchlist.root_key", f"watchlist.root_key: {problem}"))
    cache_dir = raw_value(raw, ("engine", "cache_dir"))
    if isinstance(cache_dir, str) and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        out.append(("engine.cache_dir", f"engine.cache_dir: {cache_dir} exists and is not a folder; give a folder"))
    places = [("watchlist", "store"), ("sinks", "jsonl", "path")]
    if isinstance(raw.get("mqtt"), dict):
        places.append(("outbox", "path"))
    for loc in places:
        value = raw_value(raw, loc)
        if value is None and raw_value(raw, loc[:-1]) is not None:
            value = default_of(root, loc)
        if isinstance(value, (str, Path)) and str(value):
            problem = _data_file_problem(Path(value))
            if problem:
                key = ".".join(loc)
                out.append((key, f"{key}: {problem}"))
    return out


def _root_key_problem(path: Path) -> str | None:
    from watchlist.format.errors import KeyFileError
    from watchlist.format.keys import load_public_key

    fix = "install HQ's root public key there (it is pinned at installation) or correct the path"
    if not path.exists():
        return f"no such file {str(path)!r}; {fix}"
    if not path.is_file():
        return f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}; {fix}"
    if path.stat().st_size > MAX_ROOT_KEY_BYTES:
        return f"{path} is {path.stat().st_size} bytes, far too large for a public key; {fix}"
    try:
        load_public_key(path)
    except KeyFileError as exc:
        return f"{exc} (HQ's root public key is pinned at installation)"
    return None


def _data_file_problem(path: Path) -> str | None:
    """Why the unit could not keep a file at `path` (None: it can try)."""
    resolved = path.expanduser().resolve(strict=False)
    for root in _VIRTUAL_ROOTS:
        if resolved == root or root in resolved.parents:
            return (
                f"{path} is under {root}, a file system the kernel makes up (nothing kept there survives); "
                "give a path on the unit's disk, such as /var/lib/checkpoint/"
            )
    if resolved.is_dir():
        return f"{path} is a folder; give the path of a file in it (for example {path / path.name}.sqlite)"
    if resolved.exists() and not resolved.is_file():
        return f"{path} is not a regular file (a device or FIFO?); give the path of a file on the unit's disk"
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so no folder can be made for {path}; correct the path"
    return None


def calibration_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """The unit's own threshold checked against its model's calibration, by the rule every threshold a
    unit uses meets (Calibration.threshold_problem; bundles' are checked by it too): `[matching] threshold
    = 0.5` made every stranger a hit, as strangers score about 0.97 with the default model. A model
    without calibration keeps the model-independent check (range_problems); a calibration file the
    config names must be readable. Read from the raw values, so it is reported alongside other problems."""
    try:
        engine = EngineConfig.model_validate(raw_value(raw, ("engine",)) or {})
    except ValidationError:
        return []  # [engine]'s own problems are reported; its model is not known
    try:
        cal = Calibration.for_engine_config(engine)
    except CalibrationError as exc:
        if engine.embedder is not None and engine.embedder.calibration is not None:
            return [("engine.embedder.calibration", f"engine.embedder.calibration: {exc}")]
        return []
    t = finite_number(raw, ("matching", "threshold"))
    problem = None if t is None or t <= 0.0 else cal.threshold_problem(t)
    if problem is None:
        return []
    return [
        (
            "matching.threshold",
            f"matching.threshold: {problem}; or remove the key to use the watchlist's calibrated threshold",
        )
    ]
