"""The `[engine]` table of the unit's TOML: models, backend, detector, quality gate."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.config import StrictModel
from engines.detector import MtcnnConfig
from engines.ensemble import DEFAULT_MEMBERS, EnsembleMember, check_members
from engines.model_spec import EmbedderSpec
from engines.quality import QualityConfig


class EngineConfig(StrictModel):
    """Face engine settings. Every field has a default, so an empty `[engine]` table works."""

    cache_dir: Path | None = Field(None, description="where converted models and TensorRT engines live")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["fp16", "fp32", "int8"] = Field(
        "fp16",
        description="fp16 and fp32 choose TensorRT's precision (ONNX Runtime on a CPU runs float32 for both); "
        "int8 runs a calibrated int8 embedder on either backend (docs/engine.md)",
    )
    int8_calibration_photos: Path | None = Field(
        None, description="folder of face photos to calibrate int8 on; default: scikit-image's public-domain photos"
    )
    threads: int = Field(0, ge=0, le=256, description="ONNX Runtime threads for the embedder; 0 lets it choose")
    max_batch: int = Field(32, ge=1, le=256, description="most faces per embedder call")
    flip_average: bool = Field(False, description="average each face's embedding with its mirror image's")
    detector: MtcnnConfig = Field(default_factory=MtcnnConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    embedder: EmbedderSpec | None = Field(None, description="a custom embedder instead of the default models")
    ensemble: tuple[EnsembleMember, ...] | None = Field(
        None,
        description="the embedders a face is embedded by and their weights (engines/ensemble.py); "
        "default: DEFAULT_MEMBERS; one member is that model alone (ensemble = ['dlib-resnet-v1'])",
    )
    ensemble_calibration: Path | None = Field(
        None, description="the ensemble's calibration file (`engines calibrate`); default: the packaged one"
    )

    @model_validator(mode="after")
    def _one_model_choice(self) -> EngineConfig:
        if self.embedder is not None and self.ensemble is not None:
            raise ValueError("give either [engine.embedder] or [engine] ensemble, not both")
        if self.ensemble is not None:
            check_members(self.ensemble)
        return self

    def members(self) -> tuple[EnsembleMember, ...]:
        """The embedders this config names: its custom embedder alone, else its ensemble, else the default."""
        if self.embedder is not None:
            return (EnsembleMember(embedder=self.embedder),)
        return self.ensemble if self.ensemble is not None else DEFAULT_MEMBERS


class EngineConfigError(ValueError):
    """A unit config file's `[engine]` table is unreadable or wrong; the message names the file and key."""


def load_engine_config(path: str | Path) -> EngineConfig:
    """Only the `[engine]` table of a unit config file (TOML), for tools that need no other part of it.

    Relative paths (cache_dir, embedder.onnx, embedder.calibration, the same in ensemble members,
    ensemble_calibration) resolve against the file's folder.
    Example: ``cfg = load_engine_config("/etc/checkpoint/unit.toml")``
    """
    from pydantic import ValidationError

    from common import toml

    path = Path(path)
    try:
        raw = toml.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, toml.TOMLDecodeError) as exc:
        raise EngineConfigError(f"{path}: cannot read the config file: {exc}") from None
    table = raw.get("engine", {})
    if not isinstance(table, dict):
        raise EngineConfigError(f"{path}: engine must be a table ([engine])")
    base = path.resolve().parent
    if "cache_dir" in table:
        table["cache_dir"] = base / Path(table["cache_dir"]).expanduser()
    if isinstance(table.get("ensemble_calibration"), str):
        table["ensemble_calibration"] = base / Path(table["ensemble_calibration"]).expanduser()
    members = table.get("ensemble")
    specs = [table.get("embedder")] + [m.get("embedder") for m in members or () if isinstance(m, dict)]
    for emb in specs:
        if isinstance(emb, dict):
            for key in ("onnx", "calibration"):
                if isinstance(emb.get(key), str):
                    emb[key] = base / Path(emb[key]).expanduser()
    try:
        return EngineConfig.model_validate(table)
    except ValidationError as exc:
        problems = [
            f"{path}: engine.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
        raise EngineConfigError("\n".join(problems)) from None
