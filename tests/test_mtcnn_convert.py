"""The torch-free .pt reader and the MTCNN -> ONNX converter, checked against a numpy reference."""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engines.mtcnn_convert import MtcnnWeightsError, build_mtcnn_graph, convert_mtcnn, find_mtcnn_weights
from engines.torch_legacy import TorchFileError, load_state_dict
from tests.services import missing_model


@pytest.fixture(scope="module")
def sources() -> dict[str, Path]:
    try:
        return find_mtcnn_weights()
    except MtcnnWeightsError as exc:
        missing_model(f"needs facenet-pytorch's MTCNN weights: pip install --no-deps facenet-pytorch ({exc})")


@pytest.fixture(scope="module")
def onnx_paths(sources, tmp_path_factory) -> dict[str, Path]:
    return convert_mtcnn(tmp_path_factory.mktemp("mtcnn"), sources)


# ---- writing torch files without torch, to test the reader on layouts we control -------------


@pytest.fixture
def fake_torch(monkeypatch):
    """Register stand-ins for torch.FloatStorage and torch._utils._rebuild_tensor_v2 so that
    pickle writes the same global references torch.save does."""
    torch_mod = types.ModuleType("torch")
    utils_mod = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only used as a pickle reference")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch_mod.FloatStorage = FloatStorage
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod._utils = utils_mod
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return types.SimpleNamespace(FloatStorage=FloatStorage, rebuild=_rebuild_tensor_v2)


class _Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data.astype("<f4").ravel()


class _Tensor:
    def __init__(self, rebuild, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self):
        return (self.rebuild, self.args)


def _state(fake) -> tuple[dict, dict[str, np.ndarray]]:
    """A state_dict with a plain tensor, a transposed view, and two tensors sharing one storage."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    shared = _Storage("1", np.arange(10, dtype=np.float32) * 0.5)
    obj = collections.OrderedDict(
        plain=_Tensor(fake.rebuild, _Storage("0", a), 0, (3, 4), (4, 1)),
        transposed=_Tensor(fake.rebuild, _Storage("2", a), 0, (4, 3), (1, 4)),
        head=_Tensor(fake.rebuild, shared, 0, (4,), (1,)),
        tail=_Tensor(fake.rebuild, shared, 6, (2, 2), (2, 1)),
    )
    expect = {
        "plain": a,
        "transposed": a.T,
        "head": np.arange(4, dtype=np.float32) * 0.5,
        "tail": (np.arange(6, 10, dtype=np.float32) * 0.5).reshape(2, 2),
    }
    return obj, expect


def _storages(obj) -> dict[str, _Storage]:
    return {t.args[0].key: t.args[0] for t in obj.values()}


def _dump_legacy(path: Path, obj, fake) -> None:
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", fake.FloatStorage, o.key, "cpu", o.data.size, None)
            return None

    with path.open("wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        keys = sorted(_storages(obj))
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            st = _storages(obj)[key]
            f.write(struct.pack("<q", st.data.size))
            f.write(st.data.tobytes())


def _dump_zip(path: Path, obj, fake) -> None:
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", fake.FloatStorage, o.key, "cpu", o.data.size)
            return None

    import io

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        for key, st in _storages(obj).items():
            zf.writestr(f"archive/data/{key}", st.data.tobytes())


@pytest.mark.parametrize("dump", [_dump_legacy, _dump_zip], ids=["legacy", "zip"])
def test_reader_round_trips_strided_and_shared_tensors(tmp_path, fake_torch, dump):
    obj, expect = _state(fake_torch)
    path = tmp_path / "state.pt"
    dump(path, obj, fake_torch)
    got = load_state_dict(path)
    assert list(got) == list(expect)
    for name, arr in expect.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_reader_refuses_code_execution_globals(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({}, f, protocol=2)
        f.write(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
    with pytest.raises(TorchFileError, match="os.system"):
        load_state_dict(path)


def test_reader_reads_facenet_weights(sources):
    sd = load_state_dict(sources["pnet"])
    assert list(sd) == [
        "conv1.weight",
        "conv1.bias",
        "prelu1.weight",
        "conv2.weight",
        "conv2.bias",
        "prelu2.weight",
        "conv3.weight",
        "conv3.bias",
        "prelu3.weight",
        "conv4_1.weight",
        "conv4_1.bias",
        "conv4_2.weight",
        "conv4_2.bias",
    ]
    assert sd["conv1.weight"].shape == (10, 3, 3, 3) and sd["conv1.weight"].dtype == np.float32
    assert sd["conv4_2.weight"].shape == (4, 32, 1, 1)
    assert np.all(np.isfinite(sd["conv1.weight"])) and np.abs(sd["conv1.weight"]).max() > 0.01
    onet = load_state_dict(sources["onet"])
    assert onet["dense5.weight"].shape == (256, 1152)
    assert onet["dense6_3.weight"].shape == (10, 256)
    assert load_state_dict(sources["rnet"])["dense4.weight"].shape == (128, 576)


@pytest.mark.parametrize("cut", [10, 200, 1000, -100])
def test_truncated_file_raises_named_error(sources, tmp_path, cut):
    data = sources["pnet"].read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:cut])
    with pytest.raises(TorchFileError, match="truncated|corrupt"):
        load_state_dict(path)


def test_garbage_and_empty_files_raise_named_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file at all" * 10)
    with pytest.raises(TorchFileError, match="garbage.pt"):
        load_state_dict(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(TorchFileError, match="empty"):
        load_state_dict(empty)
    with pytest.raises(TorchFileError, match="cannot read"):
        load_state_dict(tmp_path / "absent.pt")


def test_converter_refuses_weights_of_another_architecture(sources):
    sd = load_state_dict(sources["pnet"])
    with pytest.raises(MtcnnWeightsError, match="rnet: weight dense4.weight is missing"):
        build_mtcnn_graph("rnet", sd)


# ---- numpy reference of facenet_pytorch/models/mtcnn.py ----------------------------------------


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + h - kh + 1, j : j + wd - kw + 1]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def _prelu(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    a = a.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, a * x)


def _maxpool_ceil(x: np.ndarray, k: int, s: int) -> np.ndarray:
    n, c, h, w = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    out = np.full((n, c, oh, ow), -np.inf)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * s : i * s + k, j * s : j * s + k].max(axis=(2, 3))
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _dense(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _reference(net: str, sd: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    def cp(x, i, pool=None):
        x = _prelu(_conv(x, sd[f"conv{i}.weight"], sd[f"conv{i}.bias"]), sd[f"prelu{i}.weight"])
        return _maxpool_ceil(x, *pool) if pool else x

    if net == "pnet":
        x = cp(cp(cp(x, 1, (2, 2)), 2), 3)
        return {
            "reg": _conv(x, sd["conv4_2.weight"], sd["conv4_2.bias"]),
            "prob": _softmax(_conv(x, sd["conv4_1.weight"], sd["conv4_1.bias"])),
        }
    if net == "rnet":
        x = cp(cp(cp(x, 1, (3, 2)), 2, (3, 2)), 3)
        x = x.transpose(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = _prelu(_dense(x, sd, "dense4"), sd["prelu4.weight"])
        return {"reg": _dense(x, sd, "dense5_2"), "prob": _softmax(_dense(x, sd, "dense5_1"))}
    x = cp(cp(cp(cp(x, 1, (3, 2)), 2, (3, 2)), 3, (2, 2)), 4)
    x = x.transpose(0, 3, 2, 1).reshape(x.shape[0], -1)
    x = _prelu(_dense(x, sd, "dense5"), sd["prelu5.weight"])
    return {
        "reg": _dense(x, sd, "dense6_2"),
        "landmarks": _dense(x, sd, "dense6_3"),
        "prob": _softmax(_dense(x, sd, "dense6_1")),
    }


@pytest.mark.parametrize("net,shape", [("pnet", (2, 3, 23, 30)), ("rnet", (3, 3, 24, 24)), ("onet", (2, 3, 48, 48))])
def test_onnx_matches_numpy_reference(sources, onnx_paths, net, shape):
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    # Normalised pixels lie in [-1, 1]; a smooth image keeps activations in a realistic range.
    x = np.clip(rng.normal(0, 0.5, size=shape), -1, 1).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_paths[net]), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"input": x})))
    want = _reference(net, load_state_dict(sources[net]), x.astype(np.float64))
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4, err_msg=f"{net}.{name}")


def test_convert_writes_three_loadable_files_atomically(onnx_paths):
    import onnx

    assert set(onnx_paths) == {"pnet", "rnet", "onet"}
    for net, path in onnx_paths.items():
        assert path.name == f"{net}.onnx"
        model = onnx.load(str(path))
        assert model.opset_import[0].version == 17
    leftovers = [p.name for p in onnx_paths["pnet"].parent.iterdir() if p.suffix == ".tmp"]
    assert leftovers == []


def test_find_weights_names_the_install_command(monkeypatch, tmp_path):
    # An import path without site-packages is what a machine without the package looks like.
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.delitem(sys.modules, "facenet_pytorch", raising=False)
    with pytest.raises(MtcnnWeightsError, match=r"pip install --no-deps facenet-pytorch"):
        find_mtcnn_weights()
