"""Native TensorRT backend (tensorrt + pycuda) for Jetson and other NVIDIA GPUs.

The engine is built once from the ONNX file and cached. A serialised engine is only valid for
the TensorRT version and GPU that built it, and its optimisation profile fixes the batch range,
so the cache key covers all of these: a change of any of them builds a new engine.

Threads: the unit calls one backend from its detect and embed worker threads, while the CUDA
context was made in the loading thread. The backend therefore uses the device's primary context
and pushes it around each run (a CUDA context is current per thread), and keeps a small pool of
execution slots -- each an execution context with its own optimisation profile, stream, device
buffers and page-locked host buffers, used by one thread at a time under its own lock -- so no
two threads ever share a binding or a staging buffer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from common.files import atomic_write
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
    contexts: int = 1,
) -> str:
    """A stable key for a built engine; any change of its inputs gives a different key."""
    fields: dict[str, Any] = {
        "onnx": onnx_sha256,
        "trt": trt_version,
        "gpu": gpu_name,
        "precision": precision,
        "profiles": {k: [list(s) for s in v] for k, v in sorted(profiles.items())},
    }
    if contexts != 1:  # one profile per execution context; a single-context engine keeps its old key
        fields["contexts"] = contexts
    blob = json.dumps(fields, sort_keys=True)
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
        fixed = tuple(d for d in rest if isinstance(d, int) and d > 0)
        if len(fixed) != len(rest):
            raise BackendError(
                f"input {name!r} has dynamic non-batch dimensions {shape}; give their bounds for the TensorRT profile"
            )
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


class CalibrationFeed:
    """What TensorRT's INT8 calibrator reads: full batches of preprocessed inputs, and the
    calibration cache file beside the engine.

    Plain Python, so it is tested where TensorRT is absent. make_inputs() is called on the first
    batch only, so a calibration cache left by an earlier build needs no calibration chips.
    """

    def __init__(self, make_inputs: Callable[[], np.ndarray], batch_size: int, cache_path: Path) -> None:
        if batch_size < 1:
            raise BackendError(f"calibration batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.cache_path = Path(cache_path)
        self._make_inputs = make_inputs
        self._inputs: np.ndarray | None = None
        self._next = 0

    def next_batch(self) -> np.ndarray | None:
        """The next full batch as contiguous float32, or None when no full batch is left."""
        if self._inputs is None:
            self._inputs = np.asarray(self._make_inputs(), dtype=np.float32)
            if len(self._inputs) < self.batch_size:
                raise BackendError(
                    f"int8 calibration needs at least {self.batch_size} inputs (one batch), got {len(self._inputs)}"
                )
        start = self._next
        if start + self.batch_size > len(self._inputs):
            return None
        self._next += self.batch_size
        return np.ascontiguousarray(self._inputs[start : start + self.batch_size])

    def read_cache(self) -> bytes | None:
        """The calibration table an earlier build wrote, or None."""
        return self.cache_path.read_bytes() if self.cache_path.is_file() else None

    def write_cache(self, data: bytes) -> None:
        """Keep the calibration table beside the engine, written whole or not at all."""
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.cache_path, data)


def _int8_calibrator(trt, cuda, feed: CalibrationFeed):
    """A TensorRT IInt8EntropyCalibrator2 reading `feed` (defined here: its base class needs tensorrt)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._device = None

        def get_batch_size(self) -> int:
            return feed.batch_size

        def get_batch(self, names):  # (one input)
            batch = feed.next_batch()
            if batch is None:
                return None
            if self._device is None:
                self._device = cuda.mem_alloc(batch.nbytes)
            cuda.memcpy_htod(self._device, batch)
            return [int(self._device)]

        def read_calibration_cache(self):
            return feed.read_cache()

        def write_calibration_cache(self, cache) -> None:
            feed.write_cache(bytes(cache))

    return Calibrator()


class _Slot:
    """One execution context and everything only it may touch: its stream, bindings and staging buffers."""

    def __init__(self, engine: Any, profile: int, cuda: Any) -> None:
        self.lock = threading.Lock()
        self.profile = profile
        self.stream = cuda.Stream()
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        if engine.num_optimization_profiles > 1:
            self.context.set_optimization_profile_async(profile, self.stream.handle)
            self.stream.synchronize()
        self.device: dict[str, tuple[Any, int]] = {}  # tensor name -> (allocation, bytes)
        self.host: dict[str, np.ndarray] = {}  # tensor name -> page-locked array


class TensorRTBackend:
    """Runs one ONNX model through a cached TensorRT engine (FP16 by default, dynamic batch).

    Safe to call from several threads: `contexts` execution slots run at the same time (each with
    its own optimisation profile); more callers wait for a free one.

    precision "int8" calibrates with an INT8 entropy calibrator on `calibration()` and keeps its
    table as `<engine>.calib` beside the engine; layers without an int8 kernel run in FP16.
    """

    def __init__(
        self,
        onnx_path: Path,
        cache_dir: Path,
        max_batch: int = 32,
        precision: Literal["fp16", "fp32", "int8"] = "fp16",
        dynamic_bounds: dict[str, tuple[Shape, Shape, Shape]] | None = None,
        workspace_mb: int = 1024,
        contexts: int = 1,
        device: int = 0,
        calibration: Callable[[], np.ndarray] | None = None,
        calibration_key: str = "",
    ) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        if not 1 <= contexts <= 16:
            raise BackendError(f"contexts must be 1..16, got {contexts}")
        cuda.init()
        self._cuda = cuda
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        # The primary context (not pycuda.autoinit's, which is current in the loading thread only) is
        # shared with ONNX Runtime's CUDA provider and pushed by whichever thread runs.
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        try:
            self._load(
                onnx_path, cache_dir, max_batch, precision, dynamic_bounds, workspace_mb, contexts, device,
                calibration, calibration_key,
            )  # fmt: skip
        finally:
            cuda.Context.pop()

    def _load(
        self,
        onnx_path: Path,
        cache_dir: Path,
        max_batch: int,
        precision: str,
        dynamic_bounds: dict[str, tuple[Shape, Shape, Shape]] | None,
        workspace_mb: int,
        contexts: int,
        device: int,
        calibration: Callable[[], np.ndarray] | None,
        calibration_key: str,
    ) -> None:
        cuda, trt = self._cuda, self._trt
        profiles = batch_profiles(_onnx_inputs(onnx_path), max_batch, dynamic_bounds=dynamic_bounds)
        gpu = cuda.Device(device).name()
        if precision == "int8" and calibration is None:
            raise BackendError(f"{onnx_path}: a TensorRT int8 engine needs calibration inputs; none were given")
        key_precision = f"int8:{calibration_key}" if precision == "int8" else precision
        key = engine_cache_key(file_sha256(onnx_path), trt.__version__, gpu, key_precision, profiles, contexts)
        engine_path = Path(cache_dir) / f"{Path(onnx_path).stem}-{key}.engine"
        if engine_path.is_file():
            log.info("loading TensorRT engine %s", engine_path)
            data = engine_path.read_bytes()
        else:
            log.info("building TensorRT engine for %s (%s, %s); this takes minutes once", onnx_path, precision, gpu)
            feed = None
            if precision == "int8" and calibration is not None:  # int8 without calibration is refused above
                opt_batch = next(iter(profiles.values()))[1][0]
                feed = CalibrationFeed(calibration, opt_batch, engine_path.with_suffix(".calib"))
            data = self._build(onnx_path, precision, profiles, workspace_mb, contexts, feed)
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(engine_path, data)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ModelError(f"{engine_path}: TensorRT could not load this engine; delete it to rebuild")
        self.name = f"tensorrt[{gpu},{precision}]"
        self._profiles = profiles
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins: list[TensorInfo] = []
        outs: list[TensorInfo] = []
        for n in names:
            info = TensorInfo(
                n, tuple(self.engine.get_tensor_shape(n)), str(trt.nptype(self.engine.get_tensor_dtype(n)))
            )
            (ins if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else outs).append(info)
        self.inputs, self.outputs = tuple(ins), tuple(outs)
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for profile in range(contexts):
            self._slots.put(_Slot(self.engine, profile, cuda))

    def _build(
        self,
        onnx_path: Path,
        precision: str,
        profiles: dict,
        workspace_mb: int,
        contexts: int = 1,
        feed: CalibrationFeed | None = None,
    ) -> bytes:
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
        first_profile = None
        for _ in range(contexts):  # execution contexts running at once each need a profile of their own
            profile = builder.create_optimization_profile()
            for name, (mn, opt, mx) in profiles.items():
                profile.set_shape(name, mn, opt, mx)
            config.add_optimization_profile(profile)
            first_profile = first_profile or profile
        if precision == "int8":
            if not builder.platform_has_fast_int8:
                log.warning("this GPU has no fast INT8; building an FP16 engine")
                config.set_flag(trt.BuilderFlag.FP16)
            elif feed is None:
                raise BackendError(f"{onnx_path}: a TensorRT int8 engine needs calibration inputs; none were given")
            else:
                # Layers without an int8 kernel fall back to FP16 rather than FP32.
                config.set_flag(trt.BuilderFlag.INT8)
                config.set_flag(trt.BuilderFlag.FP16)
                config.int8_calibrator = _int8_calibrator(trt, self._cuda, feed)
                # Calibration runs at the profile's opt shapes, which is the feed's batch size.
                config.set_calibration_profile(first_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
        return bytes(serialized)

    def _device_buffer(self, slot: _Slot, name: str, nbytes: int) -> Any:
        buf = slot.device.get(name)
        if buf is None or buf[1] < nbytes:
            buf = (self._cuda.mem_alloc(max(nbytes, 1)), nbytes)
            slot.device[name] = buf
        return buf[0]

    def _host_buffer(self, slot: _Slot, name: str, shape: tuple[int, ...]) -> np.ndarray:
        host = slot.host.get(name)
        if host is None or host.shape != shape:
            # Page-locked memory is slow to allocate: keep it while the batch shape repeats.
            host = self._cuda.pagelocked_empty(shape, dtype=self._trt.nptype(self.engine.get_tensor_dtype(name)))
            slot.host[name] = host
        return host

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; any thread may call it (see the module doc)."""
        arrays = self._check_feeds(feeds)
        slot = self._slots.get()
        try:
            with slot.lock:
                self._ctx.push()
                try:
                    return self._run_on(slot, arrays)
                finally:
                    self._cuda.Context.pop()
        finally:
            self._slots.put(slot)

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for info in self.inputs:
            if info.name not in feeds:
                raise BackendError(f"{self.name}: missing input {info.name!r}")
            arr = np.ascontiguousarray(
                feeds[info.name], dtype=self._trt.nptype(self.engine.get_tensor_dtype(info.name))
            )
            mn, _, mx = self._profiles[info.name]
            if arr.ndim != len(mn) or any(a < lo or a > hi for a, lo, hi in zip(arr.shape, mn, mx)):
                raise BackendError(
                    f"{self.name}: input {info.name} shape {arr.shape} outside the engine's profile {mn}..{mx}"
                )
            out[info.name] = arr
        return out

    def _run_on(self, slot: _Slot, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, ctx, stream = self._cuda, slot.context, slot.stream
        for name, arr in arrays.items():
            ctx.set_input_shape(name, arr.shape)
            staged = self._host_buffer(slot, name, arr.shape)
            staged[...] = arr
            dev = self._device_buffer(slot, name, arr.nbytes)
            cuda.memcpy_htod_async(dev, staged, stream)
            ctx.set_tensor_address(name, int(dev))
        results: dict[str, np.ndarray] = {}
        for info in self.outputs:
            host = self._host_buffer(slot, info.name, tuple(ctx.get_tensor_shape(info.name)))
            ctx.set_tensor_address(info.name, int(self._device_buffer(slot, info.name, host.nbytes)))
            results[info.name] = host
        if not ctx.execute_async_v3(stream.handle):
            raise BackendError(f"{self.name}: TensorRT execution failed")
        for name, host in results.items():
            cuda.memcpy_dtoh_async(host, slot.device[name][0], stream)
        stream.synchronize()
        # Copies: the page-locked arrays are this slot's and are overwritten by its next run.
        return {k: np.array(v, dtype=np.float32) for k, v in results.items()}
