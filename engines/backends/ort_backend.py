"""ONNX Runtime backend: CPU here; CUDA and TensorRT execution providers where installed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engines.backends import TensorInfo
from engines.errors import BackendError, ModelError

log = logging.getLogger(__name__)

_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OrtBackend:
    """Runs one ONNX model with onnxruntime."""

    def __init__(self, onnx_path: Path, threads: int = 0, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting pool threads between runs: the engine aligns the next batch in numpy
        # right after a run, and on a machine with other work a spinning worker took the CPU from
        # it (alignment markedly slower right after a run than after a pause, docs/engine.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        chosen = providers or [p for p in _PREFERRED if p in available]
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            raise ModelError(
                f"{onnx_path}: ONNX Runtime cannot load this model ({exc}); the file may be corrupt — "
                "delete it and run `engines build` again"
            ) from exc
        self.name = f"onnxruntime[{self.session.get_providers()[0]}]"
        self.inputs = tuple(TensorInfo(i.name, tuple(i.shape), i.type) for i in self.session.get_inputs())
        self.outputs = tuple(TensorInfo(o.name, tuple(o.shape), o.type) for o in self.session.get_outputs())
        self._out_names = [o.name for o in self.outputs]
        log.debug("loaded %s on %s", onnx_path, self.name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(self._out_names, feeds)
        except Exception as exc:
            shapes = {k: getattr(v, "shape", None) for k, v in feeds.items()}
            raise BackendError(f"{self.name}: inference failed for inputs {shapes}: {exc}") from exc
        return dict(zip(self._out_names, outs))
