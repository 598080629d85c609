"""The TensorRT backend called from worker threads, as the unit's detect and embed threads call it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engines.backends import create_backend, tensorrt_available
from engines.backends.tensorrt_backend import engine_cache_key

onnx = pytest.importorskip("onnx")


def _tiny_net(path, dim: int = 64) -> None:
    """A real ONNX graph with a dynamic batch: a 3x3 convolution, pooling, a projection."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    conv = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    w = rng.normal(size=(8, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "K"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["embedding"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(conv, "K"), numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_the_cache_key_tells_engines_with_more_contexts_apart() -> None:
    args = ("a" * 64, "10.0", "Orin", "fp16", {"input": ((1, 3), (4, 3), (8, 3))})
    assert engine_cache_key(*args) == engine_cache_key(*args, contexts=1)
    assert engine_cache_key(*args, contexts=2) != engine_cache_key(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("contexts", [1, 2])
def test_two_worker_threads_get_the_results_onnx_runtime_gets(tmp_path, contexts: int) -> None:
    reason = tensorrt_available()
    if reason is not None:
        pytest.skip(f"GPU test: {reason}")
    from engines.backends.tensorrt_backend import TensorRTBackend

    path = tmp_path / "tiny.onnx"
    _tiny_net(path)
    ref = create_backend(path, "onnxruntime")
    # Loaded in this thread, used only from two others: the CUDA context must follow the calls.
    trt = TensorRTBackend(path, tmp_path, max_batch=8, precision="fp32", contexts=contexts)
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(int(rng.integers(1, 9)), 3, 32, 32)).astype(np.float32) for _ in range(40)]
    expected = [ref.run({"input": b})["embedding"] for b in batches]
    errors: list[BaseException] = []
    worst = [0.0, 0.0]

    def worker(k: int) -> None:
        try:
            for _ in range(10):
                # The two threads walk the batches in opposite orders, so shapes differ call to call.
                order = range(len(batches)) if k == 0 else reversed(range(len(batches)))
                for i in order:
                    got = trt.run({"input": batches[i]})["embedding"]
                    assert got.shape == expected[i].shape
                    worst[k] = max(worst[k], float(np.max(np.abs(got - expected[i]))))
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), name=f"worker-{k}") for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors
    assert max(worst) < 1e-3, worst
