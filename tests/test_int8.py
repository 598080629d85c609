"""The int8 embedder: quantisation, calibration chips, the cache, the self-check, both backends, and its accuracy."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from engines.backends import create_backend, tensorrt_available
from engines.backends.tensorrt_backend import CalibrationFeed
from engines.config import EngineConfig
from engines.errors import BackendError, ModelError
from engines.face_engine import FaceEngine
from engines.int8 import MAX_WEIGHT, quantize_embedder

onnx = pytest.importorskip("onnx")
skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the public-domain calibration photos")

# dlib's ResNet alone, whatever the default model is: these tests are about its int8 copy (the default
# ensemble's npm members fall back to float32: docs/engine.md).
DLIB = ("dlib-resnet-v1",)


def _conv_embedder(path, size=32, dim=16):
    """A real small convolutional embedder: conv-relu-conv-relu, global pooling, a projection."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (16, dim)).astype(np.float32), "proj"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _conv_weights(model) -> list[np.ndarray]:
    """The quantised weight tensor of each convolution of a QDQ model, as integers."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    weights = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producer[conv.input[1]]
        weights.append(numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64))
    return weights


def _cosines(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_quantised_graph_is_int8_and_close_to_float(tmp_path):
    src, out = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    _conv_embedder(src)
    rng = np.random.default_rng(1)
    calib = rng.uniform(-0.5, 0.5, (64, 3, 32, 32)).astype(np.float32)
    kept = quantize_embedder(src, out, calib)

    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and "DequantizeLinear" in ops
    assert len(kept) == 1, "the final projection stays in float32"
    weights = {i.name: i for i in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale = weights[dq.input[0]], weights[dq.input[1]]
        assert w.data_type == onnx.TensorProto.INT8
        assert list(scale.dims) == [w.dims[0]], "weights have one scale per output channel"
    assert max(np.abs(w).max() for w in _conv_weights(model)) <= MAX_WEIGHT, "7-bit weights: exact on AVX2 too"
    assert producer[convs[0].input[0]].op_type == "DequantizeLinear", "activations are quantised too"

    x = rng.uniform(-0.5, 0.5, (16, 3, 32, 32)).astype(np.float32)
    ref = create_backend(src, "onnxruntime").run({"input": x})["embedding"]
    got = create_backend(out, "onnxruntime").run({"input": x})["embedding"]
    assert _cosines(ref, got).min() > 0.99


def _saturating_conv(path, channels=32):
    """One convolution whose weights are all large and positive: with 8-bit weights, pairs of its
    products (255 x 127 twice) overflow int16, where AVX2's uint8 x int8 kernel saturates."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0.5, 0.05, (channels, channels, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["embedding"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "saturating",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [numpy_helper.from_array(np.abs(w), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


_RUN_MODELS = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
for i, model in enumerate(sys.argv[3:]):
    s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    np.save(f"{sys.argv[2]}-{i}.npy", s.run(None, {"input": x})[0])
"""


def _run_models(models, x, folder, cpu=None) -> list[np.ndarray]:
    """Each model's output on x, computed in a child Python (under `qemu-x86_64 -cpu <cpu>` when given)."""
    np.save(folder / "x.npy", x)
    prefix = ["qemu-x86_64", "-cpu", cpu] if cpu else []
    out = folder / (cpu or "native")
    cmd = [*prefix, sys.executable, "-c", _RUN_MODELS, str(folder / "x.npy"), str(out), *map(str, models)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return [np.load(f"{out}-{i}.npy") for i in range(len(models))]


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None,
    reason="needs an x86_64 machine and qemu-user (qemu-x86_64) to emulate an AVX2-only CPU",
)
def test_int8_convolutions_compute_the_same_on_an_avx2_cpu(tmp_path):
    """The quantiser's model gives bit-identical outputs natively and on an emulated AVX2 CPU
    (Haswell: uint8 x int8 pairs summed in int16 with saturation); 8-bit weights do not (the control,
    which shows this input does reach the saturation)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from engines.int8 import _Reader

    src = tmp_path / "float.onnx"
    _saturating_conv(src)
    rng = np.random.default_rng(1)
    calib = rng.uniform(-1, 1, (16, 32, 8, 8)).astype(np.float32)
    calib[0] = 1.0
    ours, full = tmp_path / "int8.onnx", tmp_path / "int8-8bit.onnx"
    quantize_embedder(src, ours, calib)
    quantize_static(
        str(src),
        str(full),
        _Reader("input", calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    x = np.concatenate([np.ones((1, 32, 8, 8), np.float32), rng.uniform(-1, 1, (3, 32, 8, 8)).astype(np.float32)])
    native = _run_models([ours, full], x, tmp_path)
    avx2 = _run_models([ours, full], x, tmp_path, cpu="Haswell")
    np.testing.assert_array_equal(avx2[0], native[0])
    assert not np.array_equal(avx2[1], native[1]), "the control: 8-bit weights saturate on AVX2"


def test_quantiser_refuses_an_empty_calibration_set(tmp_path):
    src = tmp_path / "float.onnx"
    _conv_embedder(src)
    with pytest.raises(ModelError, match="calibration"):
        quantize_embedder(src, tmp_path / "int8.onnx", np.zeros((0, 3, 32, 32), np.float32))


def test_calibration_chips_are_aligned_faces_and_repeatable():
    from engines.int8_chips import calibration_chips, photos_key, public_domain_photos, public_photos_key

    engine = FaceEngine.load(EngineConfig(backend="onnxruntime", ensemble=DLIB, precision="fp32"))
    photos = public_domain_photos()
    a = calibration_chips(photos, engine.detect, engine.align, count=6, seed=3)
    b = calibration_chips(photos, engine.detect, engine.align, count=6, seed=3)
    assert a.shape == (6, 150, 150, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert len({chip.tobytes() for chip in a}) == 6, "jitter makes every chip different"
    # A chip is a face: the float32 embedder puts the astronaut's chips near her photo's embedding.
    ref = engine.analyze(skdata.astronaut())[0].embedding
    sims = engine.embedder.embed_chips(a[0::2]) @ ref  # even turns are the astronaut
    assert sims.min() > 0.9
    assert photos_key(photos, 6, 3) != photos_key(photos, 7, 3) != photos_key(photos[:1], 7, 3)
    assert public_photos_key(6, 3) != public_photos_key(7, 3)


def test_calibration_photos_folder_errors_name_the_key(tmp_path):
    from engines.int8_chips import calibration_chips, folder_photos

    with pytest.raises(ModelError, match="int8_calibration_photos"):
        folder_photos(tmp_path)
    blank = [("blank.png", np.full((200, 200, 3), 90, np.uint8))]
    with pytest.raises(ModelError, match="no face found"):
        calibration_chips(blank, lambda img: [], lambda img, dets: None, count=2)


def test_precision_is_checked():
    assert EngineConfig(precision="int8").precision == "int8"
    with pytest.raises(ValidationError):
        EngineConfig(precision="int4")


@pytest.fixture(scope="module")
def engines_fp32_int8():
    fp32 = FaceEngine.load(EngineConfig(backend="onnxruntime", ensemble=DLIB, precision="fp32"))
    int8 = FaceEngine.load(EngineConfig(backend="onnxruntime", ensemble=DLIB, precision="int8"))
    return fp32, int8


def test_int8_engine_runs_the_cached_quantised_model(engines_fp32_int8):
    from engines.cache import ensure_default_models
    from engines.int8 import INT8_QUANTISER
    from engines.int8_chips import public_photos_key

    fp32, int8 = engines_fp32_int8
    float_dir = ensure_default_models().embedder.parent
    key = public_photos_key(256, seed=0)
    model_path = float_dir.parent / f"{float_dir.name}-int8-q{INT8_QUANTISER}-{key}" / "model.onnx"
    meta = json.loads((model_path.parent / "model.json").read_text())
    assert "public-domain" in meta["calibration"] and meta["calibration_inputs"] == 256
    assert meta["kept_float"], "the final projection is recorded as kept in float32"
    model = onnx.load(str(model_path))
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}
    weights = _conv_weights(model)
    assert len(weights) == 29 and max(np.abs(w).max() for w in weights) == MAX_WEIGHT
    checks = np.load(model_path.parent / "check_inputs.npy")
    assert meta["check_inputs"] == len(checks) == 8 and checks.shape[1:] == (3, 150, 150)
    # int8 embeddings are compared with float32 ones (watchlists enrolled at HQ), so the id is the same.
    assert int8.model_id == fp32.model_id and int8.embedding_dim == 129


def test_int8_embedding_agrees_with_float32(engines_fp32_int8):
    fp32, int8 = engines_fp32_int8
    img = skdata.astronaut()
    det = fp32.detect(img)[0]
    a = fp32.embed([(img, det)])
    b = int8.embed([(img, det)])
    assert float(a[0] @ b[0]) >= 0.99
    assert abs(np.linalg.norm(b[0]) - 1) < 1e-5


@pytest.mark.kernels
def test_int8_self_check_passes_on_the_good_model(engines_fp32_int8):
    fp32, int8 = engines_fp32_int8
    assert int8.precision == "int8" and int8.precision_fallback is None
    assert fp32.precision == "fp32" and fp32.precision_fallback is None


def _cache_with_broken_int8(tmp_path):
    """A cache holding the real converted models (the int8 one made by the engines_fp32_int8 fixture)
    and a copy of the int8 one whose weights of one convolution in the middle of the network were
    overwritten with random 7-bit integers."""
    from onnx import numpy_helper

    from engines.cache import default_cache_dir, ensure_default_models
    from engines.int8 import INT8_QUANTISER
    from engines.int8_chips import public_photos_key

    real = default_cache_dir()
    models = ensure_default_models(real)
    cache = tmp_path / "cache"
    cache.mkdir()
    for folder in (models.embedder.parent, models.detector["pnet"].parent):
        (cache / folder.name).symlink_to(folder)
    name = f"{models.embedder.parent.name}-int8-q{INT8_QUANTISER}-{public_photos_key(256, seed=0)}"
    shutil.copytree(real / name, cache / name)
    model = onnx.load(str(cache / name / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    conv = [n for n in model.graph.node if n.op_type == "Conv"][14]
    w = inits[producer[conv.input[1]].input[0]]
    noise = np.random.default_rng(0).integers(-MAX_WEIGHT, MAX_WEIGHT + 1, tuple(w.dims)).astype(np.int8)
    w.CopyFrom(numpy_helper.from_array(noise, w.name))
    onnx.save(model, str(cache / name / "model.onnx"))
    return cache


@pytest.mark.kernels
def test_a_broken_int8_model_is_caught_and_the_engine_runs_float32(tmp_path, caplog, engines_fp32_int8):
    fp32, _ = engines_fp32_int8
    cache = _cache_with_broken_int8(tmp_path)
    with caplog.at_level(logging.WARNING, logger="engines.face_engine"):
        engine = FaceEngine.load(EngineConfig(backend="onnxruntime", ensemble=DLIB, precision="int8", cache_dir=cache))
    assert engine.precision == "fp32"
    reason = engine.precision_fallback
    assert reason and "self-check failed" in reason and "features:" in reason
    from engines.cpu import cpu_features

    assert all(f in reason for f in cpu_features())
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [reason]
    # It runs the float32 model: the same embeddings as a float32 engine.
    img = skdata.astronaut()
    det = fp32.detect(img)[0]
    np.testing.assert_allclose(engine.embed([(img, det)]), fp32.embed([(img, det)]), atol=1e-6)
    # A unit on that engine says so in every heartbeat's warnings, not only in its start-up log.
    from edge.config import load_config
    from edge.daemon import Daemon

    (tmp_path / "root.pub").write_text("0" * 64)
    conf = tmp_path / "unit.toml"
    conf.write_text(
        '[unit]\nid = "u"\nsite = "s"\n\n[[cameras]]\nid = "c"\nurl = "clip.mp4"\n\n'
        '[watchlist]\nroot_key = "root.pub"\nstore = "wl.db"\n\n[sinks.jsonl]\npath = "hits.jsonl"\n'
    )
    (tmp_path / "clip.mp4").write_bytes(b"")
    assert Daemon(load_config(conf), engine=engine).warnings() == [reason]


def test_cpu_features_reads_x86_flags_and_arm_features(tmp_path):
    from engines.cpu import cpu_features

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni\n\nflags\t: other\n")
    assert cpu_features(x86) == ["avx2", "avx512_vnni", "avx512bw", "avx512f"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp i8mm\nCPU implementer\t: 0x41\n")
    assert cpu_features(arm) == ["asimd", "asimddp", "i8mm"]
    assert cpu_features(tmp_path / "missing") == []


@pytest.mark.data
def test_int8_cosine_on_lag_faces(engines_fp32_int8, lag_dir):
    """Every one of 200 lag-dev faces: cosine of int8 to float32 >= 0.99 on the final 129-d output."""
    import cv2

    from engines.image import load_image

    fp32, int8 = engines_fp32_int8
    paths = sorted(lag_dir.rglob("*.png"))[::11][:200]
    chips = []
    for p in paths:
        img = cv2.copyMakeBorder(load_image(p), 30, 30, 30, 30, cv2.BORDER_REFLECT_101)
        dets = fp32.detect(img)
        if dets:
            chips.append(fp32.align(img, dets[:1])[0])
    chips = np.stack(chips)
    cos = np.sum(fp32.embedder.embed_chips(chips) * int8.embedder.embed_chips(chips), axis=1)
    assert len(chips) >= 190 and cos.min() >= 0.99, (len(chips), cos.min())


def test_calibration_feed_gives_full_batches_lazily_and_keeps_its_cache(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return np.arange(10 * 2, dtype=np.float64).reshape(10, 2)

    feed = CalibrationFeed(make, batch_size=4, cache_path=tmp_path / "m-key.calib")
    assert feed.read_cache() is None and not calls, "no inputs made before the first batch"
    batches = [feed.next_batch(), feed.next_batch(), feed.next_batch()]
    assert len(calls) == 1
    assert [b.shape for b in batches[:2]] == [(4, 2), (4, 2)] and batches[2] is None
    assert batches[0].dtype == np.float32 and batches[0].flags["C_CONTIGUOUS"]
    feed.write_cache(b"table")
    assert feed.read_cache() == b"table" and (tmp_path / "m-key.calib").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m-key.calib"], "no temporary file left behind"
    small = CalibrationFeed(lambda: np.zeros((3, 2)), batch_size=4, cache_path=tmp_path / "x.calib")
    with pytest.raises(BackendError, match="at least 4"):
        small.next_batch()


@pytest.mark.gpu
def test_tensorrt_int8_engine_calibrates_and_caches_its_table(tmp_path):
    reason = tensorrt_available()
    if reason is not None:
        pytest.skip(f"GPU test: {reason}")
    src = tmp_path / "float.onnx"
    _conv_embedder(src)
    rng = np.random.default_rng(2)
    calib = rng.uniform(-0.5, 0.5, (64, 3, 32, 32)).astype(np.float32)
    trt = create_backend(src, "tensorrt", cache_dir=tmp_path, max_batch=8, precision="int8", calibration=lambda: calib)
    assert list(tmp_path.glob("*.calib")), "the calibration table is kept beside the engine"
    x = rng.uniform(-0.5, 0.5, (8, 3, 32, 32)).astype(np.float32)
    ref = create_backend(src, "onnxruntime").run({"input": x})["embedding"]
    got = trt.run({"input": x})["embedding"]
    assert _cosines(ref, got).min() > 0.99
    with pytest.raises(BackendError, match="calibration"):
        create_backend(src, "tensorrt", cache_dir=tmp_path / "other", precision="int8")


def test_a_model_exported_at_an_old_opset_is_quantised_into_one_that_loads(tmp_path) -> None:
    """fr_feature.onnx (docs/models.md) is opset 9, whose DequantizeLinear has no per-channel `axis`: its int8
    copy would not load unless the opset is raised first."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [w],
    )
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    old.ir_version = 7
    onnx.save(old, tmp_path / "old.onnx")
    x = rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    quantize_embedder(tmp_path / "old.onnx", tmp_path / "int8.onnx", x)
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    want = ort.InferenceSession(str(tmp_path / "old.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = session.run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
