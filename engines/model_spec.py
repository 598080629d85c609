"""What an embedder model expects and returns, so that operators can bring their own ONNX models.

The default embedder is dlib's ResNet, converted by this project. A stronger model (for example
an ArcFace-style network: 112x112 input, 5-point template, 512-d output) is described in the unit's
config with an `[engine.embedder]` table and checked against the ONNX file's signature on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from common.config import StrictModel
from engines.errors import ModelError

# The built-in embedder's name: the first part of its model id.
DEFAULT_EMBEDDER_NAME = "dlib-resnet-v1"

# The standard ArcFace 5-point template (left eye, right eye, nose tip, mouth corners) for
# 112x112 chips, as published with InsightFace.
ARCFACE_112_TEMPLATE: tuple[tuple[float, float], ...] = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


class EmbedderSpec(StrictModel):
    """Description of an embedder ONNX model: input geometry, colour, normalisation, alignment, output."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, description="short model name, part of the model id in hits and bundles")
    onnx: Path | None = Field(None, description="path of the ONNX file; None for the built-in default model")
    input_width: int = Field(gt=0, le=1024)
    input_height: int = Field(gt=0, le=1024)
    colour: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    alignment: Literal["dlib5", "template"] = "template"
    template: tuple[tuple[float, float], ...] | None = Field(
        None, description="5 (x, y) points in chip pixels: left eye, right eye, nose tip, left and right mouth corners"
    )
    embedding_size: int = Field(gt=0, le=4096, description="values the model outputs per face")
    norm_anchor: float | None = Field(
        None,
        gt=0,
        description="for models trained with a Euclidean loss: a constant appended to each output before "
        "normalising, so that cosine similarity ranks pairs as Euclidean distance does",
    )
    calibration: Path | None = Field(
        None,
        description="JSON file of the model's stranger scores, made by `engines calibrate`; "
        "sets the thresholds that give a chosen false-alert rate",
    )

    @property
    def embedding_dim(self) -> int:
        """Length of the embeddings the engine returns: the model's output, plus one with a norm anchor."""
        return self.embedding_size + (1 if self.norm_anchor else 0)

    @model_validator(mode="after")
    def _check(self) -> EmbedderSpec:
        if self.alignment == "template":
            if self.template is None or len(self.template) != 5:
                raise ValueError("alignment = 'template' needs `template`: 5 [x, y] points in chip pixels")
            for x, y in self.template:
                if not (0 <= x < self.input_width and 0 <= y < self.input_height):
                    raise ValueError(
                        f"template point ({x}, {y}) lies outside the {self.input_width}x{self.input_height} chip"
                    )
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self

    def check_signature(self, inputs: list[tuple[str, tuple]], outputs: list[tuple[str, tuple]], where: str) -> None:
        """Raise ModelError if the ONNX model's input/output shapes contradict this description."""
        if len(inputs) != 1:
            raise ModelError(f"{where}: an embedder must have exactly one input, the model has {len(inputs)}")
        name, shape = inputs[0]
        if len(shape) != 4:
            raise ModelError(f"{where}: input {name!r} has shape {shape}; an embedder takes a 4-d image batch")
        want = (
            (3, self.input_height, self.input_width)
            if self.layout == "nchw"
            else (self.input_height, self.input_width, 3)
        )
        got = tuple(shape[1:])
        for w, g in zip(want, got):
            if isinstance(g, int) and g > 0 and g != w:
                raise ModelError(
                    f"{where}: the model description says input {self.layout.upper()} "
                    f"{want} but the ONNX input {name!r} is {tuple(shape)}; fix input_width/input_height/layout"
                )
        if not outputs:
            raise ModelError(f"{where}: the model has no outputs")
        oname, oshape = outputs[0]
        last = oshape[-1] if oshape else None
        if isinstance(last, int) and last > 0 and last != self.embedding_size:
            raise ModelError(
                f"{where}: the model description says embedding_size = {self.embedding_size} "
                f"but the ONNX output {oname!r} has {last} values; fix embedding_size"
            )


def dlib_resnet_spec(channel_means: tuple[float, float, float]) -> EmbedderSpec:
    """The built-in embedder: dlib's ResNet on dlib's own 150x150 face chip."""
    return EmbedderSpec(
        name=DEFAULT_EMBEDDER_NAME,
        input_width=150,
        input_height=150,
        colour="rgb",
        layout="nchw",
        mean=channel_means,
        std=(256.0, 256.0, 256.0),
        alignment="dlib5",
        embedding_size=128,
        # dlib trained this model with a Euclidean-distance loss, and the descriptor's length
        # carries identity information that plain cosine similarity throws away (measured with
        # bench/accuracy.py on lag-dev: see docs/engine.md). Appending a constant before
        # normalising keeps the embeddings unit-length for the matcher while cosine similarity
        # follows Euclidean distance closely (exactly as the constant grows without bound).
        norm_anchor=3.0,
    )


def model_id_of(name: str, weights_sha256: str) -> str:
    """A model's id in hits and bundles: its name and the start of its weights' SHA-256."""
    return f"{name}:{weights_sha256[:12]}"


@dataclass(frozen=True)
class EmbedderIdentity:
    """What a watchlist must be made with to match on an engine: the model id and the embedding size."""

    model_id: str
    embedding_dim: int


def embedder_identity(spec: EmbedderSpec | None) -> EmbedderIdentity:
    """The identity of the embedder an `[engine]` table names (`spec`: its `embedder`, None for the
    built-in one), from its weights file alone: nothing is converted or loaded, so tools that only
    check a list against a unit (`watchlist apply`) need not load the face engine. Raises ModelError
    when the weights cannot be read."""
    from engines.cache import dlib_model_path, sha256_file

    if spec is None:
        # The built-in model's id hashes dlib's weights (engines.cache), as FaceEngine.load does; its
        # size does not depend on the converted model's channel means.
        weights = dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")
        size = dlib_resnet_spec(channel_means=(0.0, 0.0, 0.0)).embedding_dim
        return EmbedderIdentity(model_id_of(DEFAULT_EMBEDDER_NAME, sha256_file(weights)), size)
    if spec.onnx is None or not Path(spec.onnx).is_file():
        raise ModelError(f"engine.embedder.onnx: model file {spec.onnx} not found; give the path of the ONNX file")
    return EmbedderIdentity(model_id_of(spec.name, sha256_file(Path(spec.onnx))), spec.embedding_dim)
