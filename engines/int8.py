"""Static int8 quantisation of an embedder for ONNX Runtime: QDQ format, per-channel 7-bit weights.

ONNX Runtime's quantisation tools first fold the model (dlib's affine layers into the
convolutions before them), then record every activation's range on calibration chips
(engines.int8_chips) and write QuantizeLinear/DequantizeLinear pairs around each convolution:
unsigned 8-bit activations, signed weights with one scale per output channel (min-max ranges).

The weights use 7 bits (-64..64, ONNX Runtime's reduce_range) so that the integer arithmetic is
exact on every x86 CPU. ONNX Runtime's kernels (MLAS) pick their uint8 x int8 instructions by CPU:
with AVX-512 VNNI, AVX-VNNI or AMX every product is summed in int32, but AVX2 and AVX-512 without
VNNI first add pairs of products in int16 with saturation (vpmaddubsw). With full 8-bit weights
such a pair reaches 2 * 255 * 127 = 64,770, past int16's 32,767, and the same model gave other,
worse embeddings there; with |weight| <= 64 a pair stays within 2 * 255 * 64 = 32,640, so every
kernel computes the same integers. How much accuracy this costs is measured, not assumed:
`bench/int8_accuracy.py` and docs/engine.md.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from engines.backends import Backend
from engines.errors import ModelError

log = logging.getLogger(__name__)

# Bump when the quantised model made from the same model and chips changes, so caches redo it.
INT8_QUANTISER = 3
# The largest |weight| the quantiser writes: a pair of uint8 x weight products must fit int16.
MAX_WEIGHT = 64
# Operator types kept in float32: the final projection to the embedding (dlib's 256 -> 128 fully
# connected layer) costs under 0.1% of the multiply-adds, and in int8 it carried a fifth of the
# embedding error measured on lag-dev (docs/engine.md).
KEEP_FLOAT_OPS: tuple[str, ...] = ("MatMul", "Gemm")
_CALIBRATION_BATCH = 16
# The engine's self-check at load: the int8 model must agree with the float32 one on the check
# chips (a few calibration chips kept beside the int8 model) to this cosine of their raw outputs.
# A good model of dlib's ResNet comes to 0.9989 (`engines -v build --precision int8` logs it); the
# earlier 8-bit-weight model fell well below on an AVX2 CPU (docs/engine.md).
SELF_CHECK_MIN_COSINE = 0.99
CHECK_CHIPS = 8


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over an array of model inputs."""

    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: np.ascontiguousarray(inputs[i : i + _CALIBRATION_BATCH], dtype=np.float32)}
            for i in range(0, len(inputs), _CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def check_inputs(inputs: np.ndarray, count: int = CHECK_CHIPS) -> np.ndarray:
    """`count` model inputs spread evenly over the calibration inputs, for the self-check."""
    inputs = np.asarray(inputs, dtype=np.float32)
    return inputs[np.unique(np.linspace(0, len(inputs) - 1, count).round().astype(int))]


def lowest_cosine(int8: Backend, float32: Backend, inputs: np.ndarray) -> float:
    """The lowest cosine between the int8 and float32 models' raw outputs over `inputs`."""
    feed = {float32.inputs[0].name: np.ascontiguousarray(inputs, dtype=np.float32)}
    a = np.asarray(int8.run(feed)[int8.outputs[0].name], np.float64).reshape(len(inputs), -1)
    b = np.asarray(float32.run(feed)[float32.outputs[0].name], np.float64).reshape(len(inputs), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))


# The first opset whose DequantizeLinear takes `axis` (per-channel weight scales).
_PER_CHANNEL_OPSET = 13


def _default_opset(model) -> int:  # an onnx.ModelProto; onnx stays a local import
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def quantize_embedder(
    float_onnx: Path, out: Path, inputs: np.ndarray, keep_float_ops: Sequence[str] = KEEP_FLOAT_OPS
) -> list[str]:
    """Write an int8 (QDQ, per-channel, 7-bit weights) copy of the embedder `float_onnx` to `out`.

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
        if _default_opset(model) < _PER_CHANNEL_OPSET:
            # Per-channel scales need DequantizeLinear's `axis`, which ONNX has from opset 13 on; fr_feature.onnx
            # (docs/models.md) was exported at opset 9, and its quantised copy would not load.
            from onnx import version_converter

            model = version_converter.convert_version(model, _PER_CHANNEL_OPSET)
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
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep,
        )
    log.info("wrote int8 model %s (%d calibration inputs; kept in float: %s)", out, len(inputs), keep)
    return keep
