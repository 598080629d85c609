"""Custom embedders described by a model description, checked against the ONNX file."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from engines.backends import create_backend
from engines.backends.tensorrt_backend import batch_profiles, engine_cache_key
from engines.embedder import Embedder
from engines.errors import BackendError, ImageError, ModelError
from engines.model_spec import ARCFACE_112_TEMPLATE, EmbedderSpec

onnx = pytest.importorskip("onnx")


def _tiny_embedder(path, size=112, dim=512, layout="nchw"):
    """A real ONNX graph: mean colour per image, projected to `dim` values."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, dim)).astype(np.float32)
    shape = ["batch", 3, size, size] if layout == "nchw" else ["batch", size, size, 3]
    nodes = []
    x = "input"
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["input"], ["t"], perm=[0, 3, 1, 2]))
        x = "t"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def _arcface_spec(path, **kw):
    base = dict(
        name="arcface-test",
        onnx=path,
        input_width=112,
        input_height=112,
        template=ARCFACE_112_TEMPLATE,
        embedding_size=512,
    )
    base.update(kw)
    return EmbedderSpec(**base)


def test_custom_embedder_runs_with_its_normalisation(tmp_path):
    path = tmp_path / "arc.onnx"
    w = _tiny_embedder(path)
    spec = _arcface_spec(path, colour="bgr")
    emb = Embedder(spec, create_backend(path, "onnxruntime"))
    chips = np.zeros((2, 112, 112, 3), np.uint8)
    chips[0, ..., 0] = 255  # pure red
    chips[1, ..., 2] = 255  # pure blue
    out = emb.embed_chips(chips)
    assert out.shape == (2, 512)
    # BGR model: red arrives in channel 2, normalised (255 - 127.5) / 127.5 = 1, others -1.
    expect = np.array([-1.0, -1.0, 1.0]) @ w
    np.testing.assert_allclose(out[0], expect / np.linalg.norm(expect), atol=1e-5)


def test_nhwc_layout(tmp_path):
    path = tmp_path / "arc_nhwc.onnx"
    _tiny_embedder(path, layout="nhwc")
    emb = Embedder(_arcface_spec(path, layout="nhwc"), create_backend(path, "onnxruntime"))
    assert emb.embed_chips(np.full((1, 112, 112, 3), 200, np.uint8)).shape == (1, 512)


def test_description_that_contradicts_the_file_is_refused(tmp_path):
    path = tmp_path / "arc.onnx"
    _tiny_embedder(path)
    backend = create_backend(path, "onnxruntime")
    with pytest.raises(ModelError, match="embedding_size = 256"):
        Embedder(_arcface_spec(path, embedding_size=256), backend)
    with pytest.raises(ModelError, match="input_width/input_height"):
        Embedder(
            _arcface_spec(
                path, input_width=128, input_height=128, template=((40, 50), (80, 50), (60, 70), (45, 90), (75, 90))
            ),
            backend,
        )


def test_bad_descriptions_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="template"):
        _arcface_spec(tmp_path / "x.onnx", template=None)
    with pytest.raises(ValidationError, match="outside"):
        _arcface_spec(tmp_path / "x.onnx", template=((200, 10),) * 5)
    with pytest.raises(ValidationError, match="extra"):
        EmbedderSpec(name="x", input_width=1, input_height=1, embedding_size=1, alignment="dlib5", colour_order="rgb")


def test_wrong_chips_are_refused(tmp_path):
    path = tmp_path / "arc.onnx"
    _tiny_embedder(path)
    emb = Embedder(_arcface_spec(path), create_backend(path, "onnxruntime"))
    with pytest.raises(ImageError, match="uint8"):
        emb.embed_chips(np.zeros((1, 112, 112, 3), np.float32))
    with pytest.raises(ImageError, match="112"):
        emb.embed_chips(np.zeros((1, 100, 100, 3), np.uint8))


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(BackendError, match="engines build"):
        create_backend(tmp_path / "missing.onnx", "onnxruntime")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelError, match="corrupt"):
        create_backend(bad, "onnxruntime")


def test_tensorrt_requested_without_tensorrt_says_why(tmp_path):
    from engines.backends import tensorrt_available

    if tensorrt_available() is None:
        pytest.skip("TensorRT is present here; this test covers machines without it")
    path = tmp_path / "arc.onnx"
    _tiny_embedder(path)
    with pytest.raises(BackendError, match="TensorRT backend requested but unavailable"):
        create_backend(path, "tensorrt")
    assert create_backend(path, "auto").name.startswith("onnxruntime")


def test_tensorrt_cache_key_changes_with_each_input():
    prof = batch_profiles([("input", ("batch", 3, 112, 112))], max_batch=32)
    assert prof["input"] == ((1, 3, 112, 112), (16, 3, 112, 112), (32, 3, 112, 112))
    base = engine_cache_key("abc", "10.3", "Orin", "fp16", prof)
    assert base == engine_cache_key("abc", "10.3", "Orin", "fp16", prof)
    variants = [
        engine_cache_key("abd", "10.3", "Orin", "fp16", prof),
        engine_cache_key("abc", "10.4", "Orin", "fp16", prof),
        engine_cache_key("abc", "10.3", "Xavier", "fp16", prof),
        engine_cache_key("abc", "10.3", "Orin", "fp32", prof),
        engine_cache_key("abc", "10.3", "Orin", "fp16", batch_profiles([("input", ("batch", 3, 112, 112))], 8)),
    ]
    assert len({base, *variants}) == 6
    with pytest.raises(BackendError, match="dynamic non-batch"):
        batch_profiles([("input", ("batch", 3, "h", "w"))], max_batch=4)


@pytest.mark.gpu
def test_tensorrt_backend_runs_like_onnxruntime(tmp_path):
    from engines.backends import tensorrt_available

    reason = tensorrt_available()
    if reason is not None:
        pytest.skip(f"GPU test: {reason}")
    path = tmp_path / "arc.onnx"
    _tiny_embedder(path)
    x = np.random.default_rng(1).normal(size=(5, 3, 112, 112)).astype(np.float32)
    ref = create_backend(path, "onnxruntime").run({"input": x})["embedding"]
    got = create_backend(path, "tensorrt", cache_dir=tmp_path, precision="fp32").run({"input": x})["embedding"]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    assert list(tmp_path.glob("*.engine")), "the built engine is cached"
