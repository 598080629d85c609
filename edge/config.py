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
files it names can move together. Besides the models' own checks, edge.config_checks finds what they
let through (quoted or non-finite numbers, timings out of a sane range, unusable files, a threshold the
model's calibration rules out); edge.config_keys puts each problem into words under its key.

    cfg = load_config("/etc/checkpoint/unit.toml")   # raises ConfigError("unit.toml: cameras[1].url: ...")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from common import toml
from common.config import StrictModel
from edge.analysis import AnalysisConfig
from edge.camera.config import CaptureConfig
from edge.canary import CANARY_CAMERA_ID, CanaryConfig
from edge.config_checks import (
    calibration_problems,
    file_problems,
    inherit_site,
    range_problems,
    resolve_camera_files,
    resolve_paths,
    value_problems,
)
from edge.config_keys import clean_loc, describe, dotted
from edge.decision import DecisionConfig
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig
from edge.sinks import JsonlSinkConfig
from engines.config import EngineConfig
from watchlist.unit.config import WatchlistConfig
from wire.timezones import zone_problem
from wire.topics import TopicLevel, UnitIdLevel


class ConfigError(Exception):
    """The unit config cannot be used. The message names the file, the key and what to change."""


class UnitSection(StrictModel):
    """``[unit]``: who this unit is; both ids appear in every hit and in the MQTT topics."""

    id: UnitIdLevel = Field(
        description="unit id, unique in the deployment (letters, digits, '-', '_', '.'; not 'watchlist')"
    )
    site: TopicLevel = Field(description="site (station, checkpoint) the unit belongs to; also the MQTT topic level")
    timezone: str | None = Field(
        None,
        description="the site's IANA time zone (Europe/Vienna), sent in the heartbeat so operators see the site's "
        "local time beside UTC; unset: the system's (TZ, /etc/localtime)",
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        problem = None if v is None else zone_problem(v)
        if problem:
            raise ValueError(f"{v!r} {problem}")
        return v


class CameraConfig(CaptureConfig):
    """``[[cameras]]``: one camera; the capture settings plus how the unit analyses it."""

    name: str = Field("", max_length=80, description="a human name for the camera, shown to operators")
    location: str = Field(
        "",
        max_length=80,
        description="where the camera is (platform, gate, which way it looks), shown to operators beside its name",
    )
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
        raw = toml.loads(text)
    except toml.TOMLDecodeError as exc:
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
        resolve_paths(UnitConfig, raw, base_dir)
        resolve_camera_files(raw, base_dir)
    problems: dict[str, str] = {}  # key -> problem; the first found for a key wins
    for key, problem in inherit_site(raw):
        problems.setdefault(key, problem)
    for key, problem in value_problems(raw, UnitConfig) + range_problems(raw):
        problems.setdefault(key, problem)
    cfg: UnitConfig | None = None
    try:
        cfg = UnitConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            key = dotted(clean_loc(tuple(err.get("loc", ())))) or "(top level)"
            problems.setdefault(key, describe(err, raw, UnitConfig))
    for key, problem in file_problems(raw, UnitConfig):
        problems.setdefault(key, problem)
    if cfg is not None:
        for key, problem in _camera_problems(cfg):
            problems.setdefault(key, problem)
    for key, problem in calibration_problems(raw):
        problems.setdefault(key, problem)
    if problems:
        raise ConfigError("\n".join(f"{name}: {p}" for p in problems.values()))
    assert cfg is not None  # no problem means validation succeeded
    return cfg


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
