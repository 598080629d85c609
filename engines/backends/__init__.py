"""Inference backends behind one interface: ONNX Runtime (CPU, CUDA, TensorRT providers) and
native TensorRT (tensorrt + pycuda, on Jetson).

Every backend runs one ONNX model: `run({input_name: array}) -> {output_name: array}`, with the
batch as the first dimension of each input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from engines.errors import BackendError

BackendKind = Literal["auto", "onnxruntime", "tensorrt"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str | None, ...]  # str or None for a dynamic dimension
    dtype: str


class Backend(Protocol):
    """A loaded model ready to run on one device."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; returns every output by name."""


def tensorrt_available() -> str | None:
    """None when TensorRT and pycuda can be used here, else the reason they cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (it ships with JetPack on Jetson)"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device found"
    except Exception as exc:  # pycuda raises its own error types for driver problems
        return f"pycuda cannot reach a CUDA device: {exc}"
    return None


def create_backend(
    onnx_path: Path,
    kind: BackendKind = "auto",
    *,
    threads: int = 0,
    cache_dir: Path | None = None,
    max_batch: int = 32,
    precision: Literal["fp16", "fp32", "int8"] = "fp16",
    dynamic_bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None,
    calibration: Callable[[], np.ndarray] | None = None,
    calibration_key: str = "",
) -> Backend:
    """Load `onnx_path` on the best available backend (`auto`: native TensorRT when usable, else
    ONNX Runtime with the best execution provider it has).

    precision applies to TensorRT; ONNX Runtime runs the file as it is (for int8, give it the
    quantised file). TensorRT int8 calibrates on `calibration()` (preprocessed inputs, called only
    when no calibration cache exists), named by `calibration_key` in the engine's cache key.
    """
    if not Path(onnx_path).is_file():
        raise BackendError(f"{onnx_path}: model file missing; run `engines build` to convert the models")
    if kind == "auto":
        kind = "tensorrt" if tensorrt_available() is None else "onnxruntime"
    if kind == "tensorrt":
        reason = tensorrt_available()
        if reason is not None:
            raise BackendError(f'TensorRT backend requested but unavailable: {reason}; use backend = "onnxruntime"')
        from engines.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(
            Path(onnx_path),
            cache_dir=cache_dir or Path(onnx_path).parent,
            max_batch=max_batch,
            precision=precision,
            dynamic_bounds=dynamic_bounds,
            calibration=calibration,
            calibration_key=calibration_key,
        )
    if kind == "onnxruntime":
        from engines.backends.ort_backend import OrtBackend

        return OrtBackend(Path(onnx_path), threads=threads)
    raise BackendError(f"unknown backend {kind!r}; use auto, onnxruntime or tensorrt")
