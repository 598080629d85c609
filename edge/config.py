"""The unit's one TOML config file, loaded into pydantic models; every error names the file and the key.

Each module defines the model of its own table beside its code; this module only composes them:

    [unit]            UnitSection            (here)
    [[cameras]]       CameraConfig           (edge.camera.capture.CaptureConfig + name, enabled, analysis_fps)
    [engine]          EngineConfig           (engines.config)
    [analysis]        AnalysisConfig         (edge.pipeline; [analysis.tracker]: edge.tracker.TrackerConfig)
    [matching]        MatchingConfig         (edge.pipeline; [matching.crop]: edge.hits.CropConfig)
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

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from common.config import StrictModel
from edge.camera.config import CaptureConfig
from edge.outbox import OutboxConfig
from edge.pipeline import AnalysisConfig, MatchingConfig
from edge.reporter import MqttConfig
from edge.sinks import JsonlSinkConfig
from engines.config import EngineConfig
from watchlist.unit.config import WatchlistConfig
from wire.topics import TopicLevel


class ConfigError(Exception):
    """The unit config cannot be used. The message names the file, the key and what to change."""


class UnitSection(StrictModel):
    """``[unit]``: who this unit is; both ids appear in every hit and in the MQTT topics."""

    id: TopicLevel = Field(description="unit id, unique in the deployment (letters, digits, '-', '_', '.')")
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

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field("text", description="json: one JSON object per line, for log collectors")
    stats_interval_s: float = Field(60.0, ge=1.0, description="seconds between per-camera figure lines")


class UnitConfig(StrictModel):
    """The whole unit config file."""

    unit: UnitSection
    cameras: list[CameraConfig] = Field(min_length=1)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    matching: MatchingConfig = Field(default_factory=MatchingConfig)
    watchlist: WatchlistConfig
    mqtt: MqttConfig | None = None
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> UnitConfig:
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
    """Check config text (TOML); `name` is used in messages, relative paths resolve against `base_dir`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: TOML syntax error: {exc}") from None
    if base_dir is not None:
        _resolve_paths(UnitConfig, raw, base_dir)
        _resolve_camera_files(raw, base_dir)
    _inherit_site(raw, name)
    cfg = _validate(raw, name)
    _check_files(cfg, name)
    _check_cameras(cfg, name)
    return cfg


def _validate(raw: dict[str, Any], name: str) -> UnitConfig:
    try:
        return UnitConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, raw) for err in exc.errors(include_url=False)]
        raise ConfigError("\n".join(f"{name}: {p}" for p in problems)) from None


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
    if _has(raw, loc) and kind not in ("model_type", "dict_type"):
        value = _get(raw, loc)
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
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


def _inherit_site(raw: dict[str, Any], name: str) -> None:
    # The site is said once, in [unit]; [mqtt] may repeat it but must then agree.
    unit, mqtt = raw.get("unit"), raw.get("mqtt")
    if not isinstance(unit, dict) or not isinstance(mqtt, dict):
        return
    if "site" not in mqtt:
        if "site" in unit:
            mqtt["site"] = unit["site"]
    elif "site" in unit and mqtt["site"] != unit["site"]:
        raise ConfigError(
            f"{name}: mqtt.site: {mqtt['site']!r} differs from unit.site {unit['site']!r}; "
            "remove mqtt.site (it defaults to unit.site) or make them equal"
        )


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


def _check_files(cfg: UnitConfig, name: str) -> None:
    spec = cfg.engine.embedder
    if spec is not None:
        if spec.onnx is None:
            raise ConfigError(f"{name}: engine.embedder.onnx: a custom embedder needs the path of its ONNX model file")
        if not Path(spec.onnx).is_file():
            raise ConfigError(
                f"{name}: engine.embedder.onnx: model file {spec.onnx} not found; "
                "copy the model there or correct the path (relative paths start at the config file's folder)"
            )
    if not Path(cfg.watchlist.root_key).is_file():
        raise ConfigError(
            f"{name}: watchlist.root_key: no such file {str(cfg.watchlist.root_key)!r}; install HQ's root public key "
            "there (it is pinned at installation) or correct the path"
        )
    if (
        cfg.engine.cache_dir is not None
        and Path(cfg.engine.cache_dir).exists()
        and not Path(cfg.engine.cache_dir).is_dir()
    ):
        raise ConfigError(f"{name}: engine.cache_dir: {cfg.engine.cache_dir} exists and is not a folder")


def _check_cameras(cfg: UnitConfig, name: str) -> None:
    seen: dict[str, int] = {}
    for i, cam in enumerate(cfg.cameras):
        cid = cam.id
        if cid in seen:
            raise ConfigError(f"{name}: cameras[{i}].id: camera id {cid!r} is already used by cameras[{seen[cid]}]")
        seen[cid] = i
    if not cfg.enabled_cameras:
        raise ConfigError(f"{name}: cameras: every camera has enabled = false; enable at least one")
