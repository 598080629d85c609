"""Turns aligned face chips into unit-length embeddings, many faces per call."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engines.backends import Backend
from engines.errors import ImageError
from engines.model_spec import EmbedderSpec

# Given a batch's plain embeddings, which faces deserve the mirrored chip too (see Embedder.embed_chips).
LookAgain = Callable[[np.ndarray], np.ndarray]


def preprocess_chips(chips: np.ndarray, spec: EmbedderSpec) -> np.ndarray:
    """uint8 RGB chips (N, H, W, 3) -> the input tensor of the model `spec` describes."""
    x = chips[..., ::-1] if spec.colour == "bgr" else chips
    x = (x.astype(np.float32) - np.asarray(spec.mean, dtype=np.float32)) * (
        1.0 / np.asarray(spec.std, dtype=np.float32)
    )
    if spec.layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


class Embedder:
    """Runs an embedder model described by an EmbedderSpec on batches of chips."""

    def __init__(self, spec: EmbedderSpec, backend: Backend, max_batch: int = 32, flip_average: bool = False) -> None:
        spec.check_signature(
            [(i.name, i.shape) for i in backend.inputs], [(o.name, o.shape) for o in backend.outputs], spec.name
        )
        self.spec = spec
        self.backend = backend
        self.max_batch = max(1, int(max_batch))
        self.flip_average = flip_average
        self._input = backend.inputs[0].name
        self._output = backend.outputs[0].name

    @property
    def dim(self) -> int:
        """Length of the embeddings returned (the model's output, plus one with a norm anchor)."""
        return self.spec.embedding_dim

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        """uint8 RGB chips (N, H, W, 3) -> the model's input tensor."""
        return preprocess_chips(chips, self.spec)

    def embed_chips(self, chips: np.ndarray, look_again: LookAgain | None = None) -> np.ndarray:
        """Embed aligned chips (N, H, W, 3) uint8 RGB; returns (N, D) float32 rows of unit length.

        With flip_average the mirrored chip's embedding is added before normalising, which makes
        the result less sensitive to pose and lighting asymmetry. `look_again` gives the same for
        some faces only (a "second look"): it gets the plain embeddings and returns a boolean mask
        of the faces whose mirrored chip should be added too -- those near a decision, where the
        better embedding is worth its cost.
        """
        chips = np.asarray(chips)
        want = (self.spec.input_height, self.spec.input_width, 3)
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != want:
            raise ImageError(
                f"{self.spec.name}: chips must be uint8 (N, {want[0]}, {want[1]}, 3), got {chips.dtype} {chips.shape}"
            )
        if len(chips) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        raw = self.outputs(chips, self.flip_average)
        out = self.finish(raw)
        if look_again is None or self.flip_average:
            return out
        mask = np.asarray(look_again(out))
        if mask.shape != (len(chips),) or mask.dtype != np.bool_:
            raise ValueError(
                f"look_again must return a boolean mask of shape ({len(chips)},), got {mask.dtype} {mask.shape}"
            )
        again = np.flatnonzero(mask)
        if again.size:
            # The same sum as flip_average, so a second look gives exactly the flip-averaged embedding.
            raw[again] = (raw[again] + self.outputs(chips[again][:, :, ::-1], False)) / 2
            out[again] = self.finish(raw[again])
        return out

    def outputs(self, chips: np.ndarray, flip_average: bool) -> np.ndarray:
        """The model's raw outputs (N, E) in batches of max_batch, mirrored-averaged with flip_average."""
        raw = np.empty((len(chips), self.spec.embedding_size), dtype=np.float32)
        for start in range(0, len(chips), self.max_batch):
            part = chips[start : start + self.max_batch]
            emb = self._run(part)
            if flip_average:
                emb = (emb + self._run(part[:, :, ::-1])) / 2
            raw[start : start + len(part)] = emb
        return raw

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs -> unit-length embeddings (with the norm anchor appended where the model has one)."""
        if self.spec.norm_anchor:
            raw = np.hstack([raw, np.full((len(raw), 1), self.spec.norm_anchor, np.float32)])
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        return (raw / np.maximum(norms, 1e-12)).astype(np.float32)

    def raw(self, chips: np.ndarray) -> np.ndarray:
        """The model's unnormalised output, for checking a conversion against its source."""
        return self._run(np.asarray(chips))

    def _run(self, chips: np.ndarray) -> np.ndarray:
        res = self.backend.run({self._input: self.preprocess(chips)})[self._output]
        return np.asarray(res, dtype=np.float32).reshape(len(chips), -1)
