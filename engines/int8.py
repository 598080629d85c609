"""Static int8 quantisation of an embedder for ONNX Runtime: QDQ format, per-channel weights.

ONNX Runtime's quantisation tools first fold the model (dlib's affine layers into the
convolutions before them), then record every activation's range on calibration chips
(engines.int8_chips) and write QuantizeLinear/DequantizeLinear pairs around each convolution and
matrix product: unsigned 8-bit activations, signed 8-bit weights with one scale per output
channel (min-max ranges). On x86 CPUs with AVX-512 VNNI or AMX, ONNX Runtime runs these as
integer convolutions. How much accuracy this costs is measured, not assumed:
`bench/int8_accuracy.py` and docs/engine.md.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from engines.errors import ModelError

log = logging.getLogger(__name__)

# Bump when the quantised model made from the same model and chips changes, so caches redo it.
INT8_QUANTISER = 2
# Operator types kept in float32: the final projection to the embedding (dlib's 256 -> 128 fully
# connected layer) costs under 0.1% of the multiply-adds, and in int8 it carried a fifth of the
# embedding error measured on lag-dev (docs/engine.md).
KEEP_FLOAT_OPS: tuple[str, ...] = ("MatMul", "Gemm")
_CALIBRATION_BATCH = 16


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over an array of model inputs."""

    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: np.ascontiguousarray(inputs[i : i + _CALIBRATION_BATCH], dtype=np.float32)}
            for i in range(0, len(inputs), _CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_embedder(
    float_onnx: Path, out: Path, inputs: np.ndarray, keep_float_ops: Sequence[str] = KEEP_FLOAT_OPS
) -> list[str]:
    """Write an int8 (QDQ, per-channel) copy of the embedder `float_onnx` to `out`.

    inputs: preprocessed model inputs (N, ...) float32, N >= 1, to record activation ranges on
    (Embedder.preprocess of calibration chips). keep_float_ops: operator types to leave in
    float32. Returns the names of the nodes left in float32.
    """
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ModelError(
            f"int8 needs onnxruntime's quantisation tools, which this onnxruntime lacks ({exc}); "
            'install onnxruntime >= 1.17 or use precision = "fp32"'
        ) from exc
    import onnx

    inputs = np.asarray(inputs)
    if inputs.ndim < 2 or len(inputs) == 0:
        raise ModelError(f"int8 calibration needs a batch of model inputs, got an array of shape {inputs.shape}")
    model_inputs = onnx.load(str(float_onnx), load_external_data=False).graph.input
    if len(model_inputs) != 1:
        raise ModelError(f"{float_onnx}: int8 quantisation expects one model input, the model has {len(model_inputs)}")
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        # Folds constant Mul/Add into the convolutions so each one gets one per-channel weight scale.
        quant_pre_process(str(float_onnx), str(folded), skip_symbolic_shape=True)
        model = onnx.load(str(folded))
        # Nodes are excluded by name, and many exported models leave names empty.
        names = {n.name for n in model.graph.node}
        for i, node in enumerate(model.graph.node):
            if not node.name:
                node.name = next(
                    f"{node.op_type}_{i}_{k}" for k in range(len(names) + 1) if f"{node.op_type}_{i}_{k}" not in names
                )
                names.add(node.name)
        onnx.save(model, str(folded))
        keep = [n.name for n in model.graph.node if n.op_type in keep_float_ops]
        quantize_static(
            str(folded),
            str(out),
            _Reader(model_inputs[0].name, inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep,
        )
    log.info("wrote int8 model %s (%d calibration inputs; kept in float: %s)", out, len(inputs), keep)
    return keep
