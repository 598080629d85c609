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
INT8_QUANTISER = 1
# Nodes of the default embedder kept in float32. Empty: with every convolution and the final
# matrix product in int8, the guard of docs/engine.md holds (cosine to float32 >= 0.99 on every
# lag-dev face; TAR and rank-1 within 0.005).
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ()
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
    float_onnx: Path, out: Path, inputs: np.ndarray, keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT
) -> None:
    """Write an int8 (QDQ, per-channel) copy of the embedder `float_onnx` to `out`.

    inputs: preprocessed model inputs (N, ...) float32, N >= 1, to record activation ranges on
    (Embedder.preprocess of calibration chips). keep_float: names of nodes (in the folded model)
    to leave in float32.
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
        quantize_static(
            str(folded),
            str(out),
            _Reader(model_inputs[0].name, inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=list(keep_float),
        )
    log.info("wrote int8 model %s (%d calibration inputs, %d nodes kept in float)", out, len(inputs), len(keep_float))
