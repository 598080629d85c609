"""Convert facenet-pytorch's MTCNN weights (P-Net, R-Net, O-Net) to ONNX, without torch.

The graphs reproduce facenet_pytorch/models/mtcnn.py layer for layer: 3x3/2x2 valid
convolutions, per-channel PReLU, max-pooling with ceil_mode, and -- before each dense
layer -- the (N, C, H, W) -> (N, W, H, C) permute that facenet-pytorch keeps from the
original Caffe model's column-major layout. Inputs are NCHW float32, already normalised
as (pixel - 127.5) * 0.0078125, rows = image rows (facenet-pytorch does not transpose
the image; the transpose lives only in that permute).

Outputs, by name:
  pnet: ``reg`` (N, 4, H', W'), ``prob`` (N, 2, H', W')   H' = ceil((H-2)/2) - 4
  rnet: ``reg`` (N, 4), ``prob`` (N, 2)
  onet: ``reg`` (N, 4), ``landmarks`` (N, 10) [x1..x5, y1..y5], ``prob`` (N, 2)
``prob[:, 1]`` is the face probability.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from common.files import atomic_write
from engines.errors import ModelError
from engines.torch_legacy import load_state_dict

OPSET = 17
# onnxruntime >= 1.14 reads IR 8; newer onnx writes IR 10 by default, which older runtimes
# (and some TensorRT parsers on Jetson) refuse.
IR_VERSION = 8
NETS = ("pnet", "rnet", "onet")

# (op, name, params): "conv" k, "prelu", "pool" (kernel, stride), "flatten_cwh", "dense"
_ARCH: dict[str, list[tuple]] = {
    "pnet": [
        ("conv", "conv1"),
        ("prelu", "prelu1"),
        ("pool", 2, 2),
        ("conv", "conv2"),
        ("prelu", "prelu2"),
        ("conv", "conv3"),
        ("prelu", "prelu3"),
    ],
    "rnet": [
        ("conv", "conv1"),
        ("prelu", "prelu1"),
        ("pool", 3, 2),
        ("conv", "conv2"),
        ("prelu", "prelu2"),
        ("pool", 3, 2),
        ("conv", "conv3"),
        ("prelu", "prelu3"),
        ("permute_flatten",),
        ("dense", "dense4"),
        ("prelu", "prelu4"),
    ],
    "onet": [
        ("conv", "conv1"),
        ("prelu", "prelu1"),
        ("pool", 3, 2),
        ("conv", "conv2"),
        ("prelu", "prelu2"),
        ("pool", 3, 2),
        ("conv", "conv3"),
        ("prelu", "prelu3"),
        ("pool", 2, 2),
        ("conv", "conv4"),
        ("prelu", "prelu4"),
        ("permute_flatten",),
        ("dense", "dense5"),
        ("prelu", "prelu5"),
    ],
}
# head layer -> output name; "prob" heads get a softmax over the class axis.
_HEADS: dict[str, list[tuple[str, str]]] = {
    "pnet": [("conv4_2", "reg"), ("conv4_1", "prob")],
    "rnet": [("dense5_2", "reg"), ("dense5_1", "prob")],
    "onet": [("dense6_2", "reg"), ("dense6_3", "landmarks"), ("dense6_1", "prob")],
}
_INPUT_SIZE = {"pnet": None, "rnet": 24, "onet": 48}


class MtcnnWeightsError(ModelError):
    """The MTCNN source weights are missing or do not match the expected architecture."""


def find_mtcnn_weights() -> dict[str, Path]:
    """Locate pnet.pt, rnet.pt and onet.pt inside the installed facenet-pytorch package.

    The package is found without importing it (its __init__ imports torch, which is not
    needed here). Raises MtcnnWeightsError naming the install command when missing.
    """
    hint = "install it with `pip install --no-deps facenet-pytorch` (torch is not needed)"
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MtcnnWeightsError(f"the facenet-pytorch package, which ships the MTCNN weights, is not installed; {hint}")
    for root in spec.submodule_search_locations:
        paths = {net: Path(root) / "data" / f"{net}.pt" for net in NETS}
        if all(p.is_file() for p in paths.values()):
            return paths
    raise MtcnnWeightsError(
        f"facenet-pytorch is installed at {list(spec.submodule_search_locations)} but its data/pnet.pt, "
        f"rnet.pt or onet.pt is missing; reinstall it: `pip install --no-deps --force-reinstall facenet-pytorch`"
    )


def weights_digest(sources: dict[str, Path]) -> str:
    """SHA-256 over the three source weight files, for keying a conversion cache."""
    h = hashlib.sha256()
    for net in NETS:
        h.update(net.encode())
        h.update(Path(sources[net]).read_bytes())
    return h.hexdigest()


def build_mtcnn_graph(net: str, weights: dict[str, np.ndarray]):
    """Build the ONNX ModelProto for one of "pnet", "rnet", "onet" from its state_dict."""
    from onnx import TensorProto, checker, helper, numpy_helper

    if net not in _ARCH:
        raise ValueError(f"unknown MTCNN net {net!r}; expected one of {NETS}")
    used: set[str] = set()

    def w(name: str, expect_ndim: int) -> np.ndarray:
        if name not in weights:
            raise MtcnnWeightsError(f"{net}: weight {name} is missing from the source file")
        arr = np.asarray(weights[name], dtype=np.float32)
        if arr.ndim != expect_ndim:
            raise MtcnnWeightsError(f"{net}: weight {name} has shape {arr.shape}, expected {expect_ndim} dims")
        used.add(name)
        return arr

    inits = []
    nodes = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    x = "input"
    spatial = True
    for i, layer in enumerate(_ARCH[net]):
        op = layer[0]
        out = f"{layer[1] if len(layer) > 1 and isinstance(layer[1], str) else op}_{i}"
        if op == "conv":
            name = layer[1]
            weight, bias = w(f"{name}.weight", 4), w(f"{name}.bias", 1)
            nodes.append(
                helper.make_node(
                    "Conv",
                    [x, const(f"{name}.weight", weight), const(f"{name}.bias", bias)],
                    [out],
                    kernel_shape=list(weight.shape[2:]),
                    name=name,
                )
            )
        elif op == "prelu":
            name = layer[1]
            slope = w(f"{name}.weight", 1)
            if spatial:
                slope = slope.reshape(-1, 1, 1)
            # PReLU(x) = a*x + (1-a)*relu(x): ONNX Runtime's PRelu kernel broadcasts the slope
            # element by element and took a third of R-Net's time; Relu, Mul and Add are
            # vectorised and cut R-Net and O-Net by 30-40% (docs/detector.md).
            a, one_minus = const(f"{name}.weight", slope), const(f"{name}.one_minus", 1.0 - slope)
            nodes += [
                helper.make_node("Relu", [x], [f"{out}_relu"], name=f"{name}_relu"),
                helper.make_node("Mul", [f"{out}_relu", one_minus], [f"{out}_pos"], name=f"{name}_pos"),
                helper.make_node("Mul", [x, a], [f"{out}_lin"], name=f"{name}_lin"),
                helper.make_node("Add", [f"{out}_lin", f"{out}_pos"], [out], name=name),
            ]
        elif op == "pool":
            k, s = layer[1], layer[2]
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    [x],
                    [out],
                    kernel_shape=[k, k],
                    strides=[s, s],
                    ceil_mode=1,
                    name=f"pool_{i}",
                )
            )
        elif op == "permute_flatten":
            perm = f"permute_{i}"
            nodes.append(helper.make_node("Transpose", [x], [perm], perm=[0, 3, 2, 1], name=perm))
            nodes.append(helper.make_node("Flatten", [perm], [out], axis=1, name=f"flatten_{i}"))
            spatial = False
        elif op == "dense":
            name = layer[1]
            weight, bias = w(f"{name}.weight", 2), w(f"{name}.bias", 1)
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [x, const(f"{name}.weight", weight), const(f"{name}.bias", bias)],
                    [out],
                    transB=1,
                    name=name,
                )
            )
        x = out

    outputs = []
    for name, out_name in _HEADS[net]:
        if spatial:
            weight = w(f"{name}.weight", 4)
            head = [
                helper.make_node(
                    "Conv",
                    [x, const(f"{name}.weight", weight), const(f"{name}.bias", w(f"{name}.bias", 1))],
                    [f"{name}_out" if out_name == "prob" else out_name],
                    kernel_shape=[1, 1],
                    name=name,
                )
            ]
        else:
            head = [
                helper.make_node(
                    "Gemm",
                    [x, const(f"{name}.weight", w(f"{name}.weight", 2)), const(f"{name}.bias", w(f"{name}.bias", 1))],
                    [f"{name}_out" if out_name == "prob" else out_name],
                    transB=1,
                    name=name,
                )
            ]
        if out_name == "prob":
            head.append(helper.make_node("Softmax", [f"{name}_out"], ["prob"], axis=1, name="softmax"))
        nodes.extend(head)
        n_out = weights[f"{name}.weight"].shape[0]
        shape = ["N", n_out, "H_out", "W_out"] if spatial else ["N", n_out]
        outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, shape))

    unused = sorted(set(weights) - used)
    if unused:
        raise MtcnnWeightsError(f"{net}: source file holds weights this architecture does not use: {unused}")

    size = _INPUT_SIZE[net]
    in_shape: list[str | int] = ["N", 3, "H", "W"] if size is None else ["N", 3, size, size]
    graph = helper.make_graph(
        nodes,
        f"mtcnn_{net}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        outputs,
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="checkpoint.engines.mtcnn_convert",
    )
    model.ir_version = IR_VERSION
    model.doc_string = (
        f"MTCNN {net} (Zhang et al. 2016) converted from facenet-pytorch's weights (MIT licence). "
        "Input: RGB NCHW float32, (pixel - 127.5) * 0.0078125."
    )
    checker.check_model(model)
    return model


def convert_mtcnn(out_dir: Path, sources: dict[str, Path] | None = None) -> dict[str, Path]:
    """Write pnet.onnx, rnet.onnx and onet.onnx into out_dir and return their paths by net name.

    sources defaults to the weights in the installed facenet-pytorch package. Each file is
    written to a temporary name and renamed, so a reader never sees half a model.
    Example: ``convert_mtcnn(Path("models/mtcnn"))["pnet"]`` -> ``models/mtcnn/pnet.onnx``.
    """
    sources = sources or find_mtcnn_weights()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for net in NETS:
        model = build_mtcnn_graph(net, load_state_dict(sources[net]))
        dest = out_dir / f"{net}.onnx"
        atomic_write(dest, model.SerializeToString())
        result[net] = dest
    return result
