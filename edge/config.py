"""The unit's one TOML config file, loaded into pydantic models; every error names the file and the key.

Each module defines the model of its own table beside its code; this module only composes them:

    [unit]            UnitSection            (here)
    [[cameras]]       CameraConfig           (edge.camera.capture.CaptureConfig + name, enabled, analysis_fps)
    [engine]          EngineConfig           (engines.config)
    [analysis]        AnalysisConfig         (edge.analysis; [analysis.tracker]: edge.tracker.TrackerConfig)
    [matching]        DecisionConfig         (edge.decision; [matching.crop]: edge.hits.CropConfig)
    [watchlist]       WatchlistConfig        (watchlist.unit.config)
    [mqtt]            MqttConfig             (edge.reporter; optional)
    [outbox]          OutboxConfig           (edge.outbox; used with [mqtt])
    [sinks.jsonl]     JsonlSinkConfig        (edge.sinks; optional)
    [logging]         LoggingConfig          (here)

Relative paths in the file are taken relative to the file's own folder, so a config and the
files it names can move together.

    cfg = load_config("/etc/checkpoint/unit.toml")   # raises ConfigError("unit.toml: cameras[1].url: ...")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.config import StrictModel
from edge.analysis import AnalysisConfig
from edge.camera.config import CaptureConfig
from edge.canary import CANARY_CAMERA_ID, CanaryConfig
from edge.decision import DecisionConfig
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig
from edge.sinks import JsonlSinkConfig
from engines.calibration import Calibration, CalibrationError
from engines.config import EngineConfig
from watchlist.unit.config import WatchlistConfig
from wire.topics import TopicLevel, UnitIdLevel


class ConfigError(Exception):
    """The unit config cannot be used. The message names the file, the key and what to change."""


class UnitSection(StrictModel):
    """``[unit]``: who this unit is; both ids appear in every hit and in the MQTT topics."""

    id: UnitIdLevel = Field(
        description="unit id, unique in the deployment (letters, digits, '-', '_', '.'; not 'watchlist')"
    )
    site: TopicLevel = Field(description="site (station, checkpoint) the unit belongs to; also the MQTT topic level")


class CameraConfig(CaptureConfig):
    """``[[cameras]]``: one camera; the capture settings plus how the unit analyses it."""

    name: str = Field("", description="a human name for the camera, shown to operators")
    enabled: bool = Field(True, description="false keeps the camera in the file but does not read it")
    analysis_fps: float = Field(
        5.0, gt=0.0, le=60.0, description="frames per second analysed (sampled from the stream)"
    )


class SinksConfig(StrictModel):
    """``[sinks]``: where hits go besides MQTT."""

    jsonl: JsonlSinkConfig | None = None


class LoggingConfig(StrictModel):
    """``[logging]``: log level and format, and how often per-camera figures are logged."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR (any case)"
    )
    format: Literal["text", "json"] = Field("text", description="json: one JSON object per line, for log collectors")
    stats_interval_s: float = Field(60.0, ge=1.0, description="seconds between per-camera figure lines")

    @field_validator("level", mode="before")
    @classmethod
    def _any_case(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v


class UnitConfig(StrictModel):
    """The whole unit config file."""

    unit: UnitSection
    cameras: list[CameraConfig] = Field(min_length=1)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    matching: DecisionConfig = Field(default_factory=DecisionConfig)
    watchlist: WatchlistConfig
    mqtt: MqttConfig | None = None
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)

    @model_validator(mode="after")
    def _consistent(self) -> UnitConfig:
        if self.canary.enabled:
            if any(c.id == CANARY_CAMERA_ID for c in self.cameras):
                raise ValueError(
                    f"camera id {CANARY_CAMERA_ID!r} is the canary's while [canary] is enabled: give the camera another id"
                )
            if self.canary.interval_s <= 2 * self.analysis.tracker.max_age_s:
                # One run's track must have ended before the next begins, or the next run makes no new hit.
                raise ValueError(
                    f"[canary] interval_s ({self.canary.interval_s:g}) must exceed twice analysis.tracker.max_age_s "
                    f"({self.analysis.tracker.max_age_s:g})"
                )
        if self.mqtt is None and self.sinks.jsonl is None:
            raise ValueError("hits would go nowhere: configure [mqtt] or [sinks.jsonl] (or both)")
        if self.watchlist.topic and self.mqtt is None:
            raise ValueError(
                "watchlist.topic is set but there is no [mqtt] table: live watchlist updates come over MQTT; "
                "configure [mqtt] or remove watchlist.topic"
            )
        return self

    @property
    def enabled_cameras(self) -> list[CameraConfig]:
        return [c for c in self.cameras if c.enabled]


def load_config(path: str | Path) -> UnitConfig:
    """Read and check a unit config file; raise ConfigError naming the file and key of each problem.

    Example: ``cfg = load_config("/etc/checkpoint/unit.toml")``
    """
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read the config file: {exc}") from None
    return parse_config(text, name=name, base_dir=path.resolve().parent)


def parse_config(text: str, name: str = "<config>", base_dir: Path | None = None) -> UnitConfig:
    """Check config text (TOML); `name` is used in messages, relative paths resolve against `base_dir`.

    Every problem found is reported in one ConfigError, one line each (file: key: what and what to do).
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError(
            f"{name}: arrays or inline tables are nested too deeply to read; a unit config needs a few "
            "levels at most: check that this is the unit config file"
        ) from None
    try:
        return _check_all(raw, name, base_dir)
    except RecursionError:
        raise ConfigError(
            f"{name}: tables are nested too deeply to check; a unit config needs a few levels at most: "
            "check that this is the unit config file"
        ) from None


def _check_all(raw: dict[str, Any], name: str, base_dir: Path | None) -> UnitConfig:
    if base_dir is not None:
        _resolve_paths(UnitConfig, raw, base_dir)
        _resolve_camera_files(raw, base_dir)
    problems: dict[str, str] = {}  # key -> problem; the first found for a key wins
    for key, problem in _inherit_site(raw):
        problems.setdefault(key, problem)
    for key, problem in _value_problems(raw) + _range_problems(raw):
        problems.setdefault(key, problem)
    cfg: UnitConfig | None = None
    try:
        cfg = UnitConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            key = _dotted(_clean_loc(tuple(err.get("loc", ())))) or "(top level)"
            problems.setdefault(key, _describe(err, raw))
    for key, problem in _file_problems(raw):
        problems.setdefault(key, problem)
    if cfg is not None:
        for key, problem in _camera_problems(cfg):
            problems.setdefault(key, problem)
    for key, problem in _calibration_problems(raw):
        problems.setdefault(key, problem)
    if problems:
        raise ConfigError("\n".join(f"{name}: {p}" for p in problems.values()))
    assert cfg is not None  # no problem means validation succeeded
    return cfg


def _value_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Non-finite numbers anywhere, and quoted numbers where the key takes a number (pydantic would take "1883")."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), raw)]
    while stack:  # iterative: a deeply nested file must not overflow the stack here
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((loc + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((loc + (i,), v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            key = _dotted(loc)
            out.append((key, f"{key}: {value} is not a usable value; give a finite number"))
    _quoted_numbers(UnitConfig, raw, (), out)
    return sorted(out)


def _quoted_numbers(model: type[BaseModel], raw: Any, loc: tuple[Any, ...], out: list[tuple[str, str]]) -> None:
    if not isinstance(raw, dict):
        return
    for fname, field in model.model_fields.items():
        if fname not in raw:
            continue
        value, here = raw[fname], loc + (fname,)
        if isinstance(value, str) and _number_only(field.annotation):
            key = _dotted(here)
            out.append((key, f"{key}: must be a number, got the text {value!r}; remove the quotes"))
            continue
        sub = _model_of(field.annotation)
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
        for loc in _expand(raw, pattern):
            v = _number(raw, loc)
            key = _dotted(loc)
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
    for loc in _expand(raw, ("cameras", "*", "analysis_fps")):
        v = _number(raw, loc)
        if v is not None and 0 < v < _LEAST_ANALYSIS_FPS:
            key = _dotted(loc)
            out.append(
                (
                    key,
                    f"{key}: {v:g} frames per second leaves the camera in effect unwatched; give at least "
                    f"{_LEAST_ANALYSIS_FPS:g} (or enabled = false to keep the camera off)",
                )
            )
    return out


def _expand(raw: dict[str, Any], pattern: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The locations in `raw` a pattern with "*" (every list item) names."""
    locs: list[tuple[Any, ...]] = [()]
    for part in pattern:
        if part != "*":
            locs = [loc + (part,) for loc in locs]
            continue
        grown = []
        for loc in locs:
            items = _raw_value(raw, loc)
            if isinstance(items, list):
                grown.extend(loc + (i,) for i in range(len(items)))
        locs = grown
    return locs


def _number(raw: dict[str, Any], loc: tuple[Any, ...]) -> float | None:
    v = _raw_value(raw, loc)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _range_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Values the field models allow but no unit can work with; read from the raw values, so they are
    reported alongside any other problem."""
    out: list[tuple[str, str]] = []
    t = _number(raw, ("matching", "threshold"))
    if t is not None and t <= 0.0:
        out.append(
            (
                "matching.threshold",
                f"matching.threshold: {t:g} would let strangers match (unrelated faces score about 0); give a "
                "value in (0, 1), or remove the key to use the watchlist's calibrated default",
            )
        )
    q = _number(raw, ("matching", "min_quality"))
    if q is not None and q > 1.0:
        out.append(
            (
                "matching.min_quality",
                f"matching.min_quality: {q:g} is above 1, the best quality score: no face would ever be embedded; "
                "give a value in [0, 1] (0 keeps the engine's own checks only)",
            )
        )
    return out + _timing_problems(raw)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # Pydantic adds the name of the union member or function validator it tried (e.g. 'MqttConfig',
    # 'function-after[...]'); they are not keys the user wrote.
    last = len(loc) - 1
    return tuple(
        p
        for i, p in enumerate(loc)
        if isinstance(p, int) or not ("[" in p or p.startswith("function-") or (p[:1].isupper() and i < last))
    )


def _describe(err: Any, raw: dict[str, Any]) -> str:
    loc = _clean_loc(tuple(err.get("loc", ())))
    key = _dotted(loc) or "(top level)"
    kind = err.get("type", "")
    msg = err.get("msg", "")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{key}: unknown key{hint}; check its spelling or remove it"
    if kind == "missing":
        return f"{key}: required key is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not loc:
        return msg
    if _has(raw, loc) and kind not in ("model_type", "dict_type", "list_type"):
        value = _get(raw, loc)
        if isinstance(value, (dict, list)):
            return f"{key}: {msg}"
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if f"got {shown}" in msg or f"got {value}" in msg:  # the model's own message already shows it
            return f"{key}: {msg}"
        return f"{key}: {msg} (got {shown})"
    return f"{key}: {msg}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = UnitConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _resolve_paths(model: type[BaseModel], raw: Any, base_dir: Path) -> None:
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
        sub = _model_of(field.annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for item in value:
                _resolve_paths(sub, item, base_dir)
        else:
            _resolve_paths(sub, value, base_dir)


def _is_path_type(annotation: Any) -> bool:
    if annotation is Path:
        return True
    return any(a is Path for a in getattr(annotation, "__args__", ()) or ())


def _resolve_camera_files(raw: dict[str, Any], base_dir: Path) -> None:
    # A camera url that is a plain relative path names a video file; it too starts at the config's folder.
    cams = raw.get("cameras")
    if not isinstance(cams, list):
        return
    for cam in cams:
        url = cam.get("url") if isinstance(cam, dict) else None
        if isinstance(url, str) and url.strip() and "://" not in url and not url.strip().isdigit():
            if not url.startswith(("/", "~")):
                cam["url"] = str(base_dir / url.strip())


def _inherit_site(raw: dict[str, Any]) -> list[tuple[str, str]]:
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


def _has(raw: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        if isinstance(part, int) and isinstance(raw, list) and 0 <= part < len(raw):
            raw = raw[part]
        elif isinstance(part, str) and isinstance(raw, dict) and part in raw:
            raw = raw[part]
        else:
            return False
    return True


def _get(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        raw = raw[part]
    return raw


# File systems the kernel makes up: nothing written there survives, or writing there is harmful.
_VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
MAX_ROOT_KEY_BYTES = 64 * 1024


def _raw_value(raw: dict[str, Any], loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(part, int) and isinstance(raw, list) and 0 <= part < len(raw):
            raw = raw[part]
        elif isinstance(part, str) and isinstance(raw, dict) and part in raw:
            raw = raw[part]
        else:
            return None
    return raw


def _default_of(model: type[BaseModel], loc: tuple[str, ...]) -> Any:
    for part in loc[:-1]:
        sub = _model_of(model.model_fields[part].annotation)
        if sub is None:
            return None
        model = sub
    field = model.model_fields[loc[-1]]
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _file_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with the files the config names, read from the raw values (so they are found even when
    other keys are wrong)."""
    out: list[tuple[str, str]] = []
    spec = _raw_value(raw, ("engine", "embedder"))
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
    root_key = _raw_value(raw, ("watchlist", "root_key"))
    if isinstance(root_key, str):
        problem = _root_key_problem(Path(root_key))
        if problem:
            out.append(("watchlist.root_key", f"watchlist.root_key: {problem}"))
    cache_dir = _raw_value(raw, ("engine", "cache_dir"))
    if isinstance(cache_dir, str) and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        out.append(("engine.cache_dir", f"engine.cache_dir: {cache_dir} exists and is not a folder; give a folder"))
    places = [("watchlist", "store"), ("sinks", "jsonl", "path")]
    if isinstance(raw.get("mqtt"), dict):
        places.append(("outbox", "path"))
    for loc in places:
        value = _raw_value(raw, loc)
        if value is None and _raw_value(raw, loc[:-1]) is not None:
            value = _default_of(UnitConfig, loc)
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


def _calibration_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """The unit's own threshold checked against its model's calibration, by the rule every threshold a
    unit uses meets (Calibration.threshold_problem; bundles' are checked by it too): `[matching] threshold
    = 0.5` made every stranger a hit, as strangers score about 0.97 with the default model. A model
    without calibration keeps the model-independent check (_range_problems); a calibration file the
    config names must be readable. Read from the raw values, so it is reported alongside other problems."""
    try:
        engine = EngineConfig.model_validate(_raw_value(raw, ("engine",)) or {})
    except ValidationError:
        return []  # [engine]'s own problems are reported; its model is not known
    try:
        cal = Calibration.for_engine_config(engine)
    except CalibrationError as exc:
        if engine.embedder is not None and engine.embedder.calibration is not None:
            return [("engine.embedder.calibration", f"engine.embedder.calibration: {exc}")]
        return []
    t = _number(raw, ("matching", "threshold"))
    problem = None if t is None or t <= 0.0 else cal.threshold_problem(t)
    if problem is None:
        return []
    return [
        (
            "matching.threshold",
            f"matching.threshold: {problem}; or remove the key to use the watchlist's calibrated threshold",
        )
    ]


def _camera_problems(cfg: UnitConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, cam in enumerate(cfg.cameras):
        cid = cam.id
        if cid in seen:
            out.append(
                (f"cameras[{i}].id", f"cameras[{i}].id: camera id {cid!r} is already used by cameras[{seen[cid]}]")
            )
        else:
            seen[cid] = i
    if not cfg.enabled_cameras:
        out.append(("cameras", "cameras: every camera has enabled = false; enable at least one"))
    return out
