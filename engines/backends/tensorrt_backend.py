"""Native TensorRT backend (tensorrt + pycuda) for Jetson and other NVIDIA GPUs.

The engine is built once from the ONNX file and cached. A serialised engine is only valid for
the TensorRT version and GPU that built it, and its optimisation profile fixes the batch range,
so the cache key covers all of these: a change of any of them builds a new engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from engines.backends import TensorInfo
from engines.errors import BackendError, ModelError

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_cache_key(
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    precision: str,
    profiles: dict[str, tuple[Shape, Shape, Shape]],
) -> str:
    """A stable key for a built engine; any change of its inputs gives a different key."""
    blob = json.dumps(
        {
            "onnx": onnx_sha256,
            "trt": trt_version,
            "gpu": gpu_name,
            "precision": precision,
            "profiles": {k: [list(s) for s in v] for k, v in sorted(profiles.items())},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def batch_profiles(
    inputs: list[tuple[str, tuple[int | str | None, ...]]],
    max_batch: int,
    opt_batch: int | None = None,
    dynamic_bounds: dict[str, tuple[Shape, Shape, Shape]] | None = None,
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Optimisation-profile shapes (min, opt, max) for each input: the first dimension is the batch,
    from 1 to `max_batch`; other dimensions must be fixed in the ONNX file unless `dynamic_bounds`
    gives them."""
    if max_batch < 1:
        raise BackendError(f"max_batch must be >= 1, got {max_batch}")
    opt = opt_batch or max(1, max_batch // 2)
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, shape in inputs:
        if dynamic_bounds and name in dynamic_bounds:
            out[name] = dynamic_bounds[name]
            continue
        rest = shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in rest):
            raise BackendError(
                f"input {name!r} has dynamic non-batch dimensions {shape}; give their bounds for the TensorRT profile"
            )
        fixed = tuple(int(d) for d in rest)
        out[name] = ((1, *fixed), (opt, *fixed), (max_batch, *fixed))
    return out


def _onnx_inputs(onnx_path: Path) -> list[tuple[str, tuple[int | str | None, ...]]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {i.name for i in model.graph.initializer}
    result = []
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in inp.type.tensor_type.shape.dim
        )
        result.append((inp.name, dims))
    return result


class TensorRTBackend:
    """Runs one ONNX model through a cached TensorRT engine (FP16 by default, dynamic batch)."""

    def __init__(
        self,
        onnx_path: Path,
        cache_dir: Path,
        max_batch: int = 32,
        precision: Literal["fp16", "fp32"] = "fp16",
        dynamic_bounds: dict[str, tuple[Shape, Shape, Shape]] | None = None,
        workspace_mb: int = 1024,
    ) -> None:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        profiles = batch_profiles(_onnx_inputs(onnx_path), max_batch, dynamic_bounds=dynamic_bounds)
        gpu = cuda.Device(0).name()
        key = engine_cache_key(file_sha256(onnx_path), trt.__version__, gpu, precision, profiles)
        engine_path = Path(cache_dir) / f"{Path(onnx_path).stem}-{key}.engine"
        if engine_path.is_file():
            log.info("loading TensorRT engine %s", engine_path)
            data = engine_path.read_bytes()
        else:
            log.info("building TensorRT engine for %s (%s, %s); this takes minutes once", onnx_path, precision, gpu)
            data = self._build(onnx_path, precision, profiles, workspace_mb)
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(engine_path)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ModelError(f"{engine_path}: TensorRT could not load this engine; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.name = f"tensorrt[{gpu},{precision}]"
        self._profiles = profiles
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins, outs = [], []
        for n in names:
            info = TensorInfo(
                n, tuple(self.engine.get_tensor_shape(n)), str(trt.nptype(self.engine.get_tensor_dtype(n)))
            )
            (ins if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else outs).append(info)
        self.inputs, self.outputs = tuple(ins), tuple(outs)
        self._buffers: dict[str, tuple[object, int]] = {}
        self._host: dict[str, np.ndarray] = {}

    def _build(self, onnx_path: Path, precision: str, profiles: dict, workspace_mb: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(Path(onnx_path).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"{onnx_path}: TensorRT cannot parse this ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if precision == "fp16":
            if not builder.platform_has_fast_fp16:
                log.warning("this GPU has no fast FP16; building an FP32 engine")
            else:
                config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profiles.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
        return bytes(serialized)

    def _buffer(self, name: str, nbytes: int):
        buf = self._buffers.get(name)
        if buf is None or buf[1] < nbytes:
            buf = (self._cuda.mem_alloc(max(nbytes, 1)), nbytes)
            self._buffers[name] = buf
        return buf[0]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, trt = self._cuda, self._trt
        for info in self.inputs:
            if info.name not in feeds:
                raise BackendError(f"{self.name}: missing input {info.name!r}")
            arr = np.ascontiguousarray(feeds[info.name], dtype=trt.nptype(self.engine.get_tensor_dtype(info.name)))
            mn, _, mx = self._profiles[info.name]
            if any(a < lo or a > hi for a, lo, hi in zip(arr.shape, mn, mx)):
                raise BackendError(
                    f"{self.name}: input {info.name} shape {arr.shape} outside the engine's profile {mn}..{mx}"
                )
            self.context.set_input_shape(info.name, arr.shape)
            dev = self._buffer(info.name, arr.nbytes)
            cuda.memcpy_htod_async(dev, arr, self.stream)
            self.context.set_tensor_address(info.name, int(dev))
        results: dict[str, np.ndarray] = {}
        for info in self.outputs:
            shape = tuple(self.context.get_tensor_shape(info.name))
            host = self._host.get(info.name)
            if host is None or host.shape != shape:
                # Page-locked memory is slow to allocate: keep it while the batch shape repeats.
                host = cuda.pagelocked_empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(info.name)))
                self._host[info.name] = host
            dev = self._buffer(info.name, host.nbytes)
            self.context.set_tensor_address(info.name, int(dev))
            results[info.name] = host
        if not self.context.execute_async_v3(self.stream.handle):
            raise BackendError(f"{self.name}: TensorRT execution failed")
        for info in self.outputs:
            cuda.memcpy_dtoh_async(results[info.name], self._buffers[info.name][0], self.stream)
        self.stream.synchronize()
        return {k: np.array(v, dtype=np.float32) for k, v in results.items()}
