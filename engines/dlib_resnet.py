"""Convert dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) to ONNX.

The .dat file is a serialised dlib::loss_metric network. dlib writes a network from the loss
layer down: first each layer's version number (outermost first), then the input layer, then
each computational layer's parameters from the input upwards. Tag and skip layers carry no
parameters, so the residual wiring is recovered from the known block pattern of this network
family (dlib's dnn_face_recognition_ex.cpp): a block is con-affine-relu-con-affine, then an
optional 2x2 average pool of the block's input (the downsampling shortcut), then add_prev, relu.

The ONNX graph takes NCHW float32 RGB chips already normalised as dlib does
((pixel - channel mean) / 256, see `input_normalisation`) and outputs the raw 128-d descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.dlib_format import DlibReader
from engines.errors import ModelError


@dataclass
class Layer:
    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc
    params: dict = field(default_factory=dict)


@dataclass
class DlibNet:
    input_size: int
    channel_means: tuple[float, float, float]
    layers: list[Layer]  # from the input upwards
    loss: str


def _read_trailer(r: DlibReader) -> None:
    """Skip the add_layer bookkeeping after each layer's details: three flags and the
    gradient/output caches (empty tensors in a saved model)."""
    for _ in range(3):
        r.bool()
    while not r.at_end() and r.peek_byte() == 0x01 and r.peek_byte(1) == 0x02:
        r.dnn_tensor()
    if not r.at_end() and r.peek_string() is None:
        r.int()  # sample expansion factor, written only by the layer that sits on the input


def parse_dlib_net(data: bytes, source: str = "<bytes>") -> DlibNet:
    """Parse a serialised dlib metric-learning ResNet into a flat list of layers."""
    r = DlibReader(data, source)
    if r.int() != 1:
        raise r._fail("not a dlib loss layer (bad version)")
    loss = r.string()
    if not loss.startswith("loss_metric"):
        raise r._fail(f"expected a loss_metric network, found {loss!r}")
    r.float()  # margin
    r.float()  # distance threshold
    # Version numbers of every layer, outermost first, until the input layer's name.
    while r.peek_string() is None:
        if r.int() not in (1, 2, 3):
            raise r._fail("bad layer version")
    name = r.string()
    if name != "input_rgb_image_sized":
        raise r._fail(f"expected input_rgb_image_sized, found {name!r}")
    means = (r.float(), r.float(), r.float())
    nr, nc = r.int(), r.int()
    if nr != nc:
        raise r._fail(f"non-square input {nr}x{nc}")

    layers: list[Layer] = []
    while not r.at_end():
        name = r.string()
        if name == "con_4":
            params = r.dnn_tensor().reshape(-1)
            num_filters, knr, knc, sy, sx, py, px = (r.int() for _ in range(7))
            filt = r.alias_tensor()
            r.alias_tensor()  # biases
            for _ in range(4):
                r.float()  # learning-rate and weight-decay multipliers
            n_w = int(np.prod(filt))
            layers.append(
                Layer(
                    "con",
                    {
                        "W": params[:n_w].reshape(filt),
                        "B": params[n_w : n_w + num_filters].copy(),
                        "kernel": (knr, knc),
                        "stride": (sy, sx),
                        "pad": (py, px),
                    },
                )
            )
        elif name == "affine_":
            params = r.dnn_tensor().reshape(-1)
            g = r.alias_tensor()
            r.alias_tensor()
            r.int()  # mode: per channel for conv outputs
            k = int(np.prod(g))
            layers.append(Layer("affine", {"gamma": params[:k].copy(), "beta": params[k : 2 * k].copy()}))
        elif name == "relu_":
            layers.append(Layer("relu"))
        elif name in ("max_pool_2", "avg_pool_2"):
            pnr, pnc, sy, sx, py, px = (r.int() for _ in range(6))
            layers.append(Layer(name[:-2], {"kernel": (pnr, pnc), "stride": (sy, sx), "pad": (py, px)}))
        elif name == "add_prev_":
            layers.append(Layer("add_prev"))
        elif name == "fc_2":
            num_outputs = r.int()
            num_inputs = r.int()
            params = r.dnn_tensor().reshape(-1)
            r.alias_tensor()
            r.alias_tensor()
            bias_mode = r.int()
            for _ in range(4):
                r.float()
            if bias_mode != 1:
                raise r._fail("fc layer with bias is not supported")
            layers.append(Layer("fc", {"W": params[: num_inputs * num_outputs].reshape(num_inputs, num_outputs)}))
        else:
            raise r._fail(f"unsupported layer {name!r}")
        _read_trailer(r)
    return DlibNet(input_size=nr, channel_means=means, layers=layers, loss=loss)


class _Graph:
    """Tiny helper that accumulates ONNX nodes and initialisers with unique names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, arr: np.ndarray, prefix: str) -> str:
        nm = self.name(prefix)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(arr), nm))
        return nm

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return 1 + (size + 2 * p - k) // s


def build_onnx(net: DlibNet):
    """Build the ONNX model (opset 17) of a parsed dlib ResNet. Shapes are tracked statically
    because dlib's add_prev zero-pads the smaller operand, which ONNX expresses with Pad."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    size = net.input_size
    x = "chip"
    shape = (3, size, size)  # C, H, W
    layers = net.layers
    i = 0
    block_input: tuple[str, tuple[int, int, int]] | None = None

    def pad_to(t: str, shp: tuple[int, int, int], target: tuple[int, int, int]) -> str:
        if shp == target:
            return t
        pads = np.array([0, 0, 0, 0, 0, target[0] - shp[0], target[1] - shp[1], target[2] - shp[2]], dtype=np.int64)
        return g.node("Pad", [t, g.const(pads, "pads")], mode="constant")

    while i < len(layers):
        layer = layers[i]
        p = layer.params
        if layer.kind == "con":
            if _starts_block(layers, i):
                block_input = (x, shape)
            kh, kw = p["kernel"]
            x = g.node(
                "Conv",
                [x, g.const(p["W"], "W"), g.const(p["B"], "B")],
                kernel_shape=[kh, kw],
                strides=list(p["stride"]),
                pads=[p["pad"][0], p["pad"][1], p["pad"][0], p["pad"][1]],
            )
            shape = (
                p["W"].shape[0],
                _out_size(shape[1], kh, p["stride"][0], p["pad"][0]),
                _out_size(shape[2], kw, p["stride"][1], p["pad"][1]),
            )
        elif layer.kind == "affine":
            c = shape[0]
            x = g.node("Mul", [x, g.const(p["gamma"].reshape(1, c, 1, 1), "gamma")])
            x = g.node("Add", [x, g.const(p["beta"].reshape(1, c, 1, 1), "beta")])
        elif layer.kind == "relu":
            x = g.node("Relu", [x])
        elif layer.kind in ("max_pool", "avg_pool"):
            kh, kw = p["kernel"]
            if kh == 0 and kw == 0:
                x = g.node("GlobalAveragePool", [x])
                shape = (shape[0], 1, 1)
            elif layer.kind == "avg_pool" and i + 1 < len(layers) and layers[i + 1].kind == "add_prev":
                # The downsampling shortcut: pool the block's input, not the block's output.
                if block_input is None:
                    raise ModelError("dlib network: shortcut pool without a block input")
                src, sshape = block_input
                pooled = g.node(
                    "AveragePool",
                    [src],
                    kernel_shape=[kh, kw],
                    strides=list(p["stride"]),
                    pads=[p["pad"][0], p["pad"][1], p["pad"][0], p["pad"][1]],
                )
                block_input = (
                    pooled,
                    (
                        sshape[0],
                        _out_size(sshape[1], kh, p["stride"][0], p["pad"][0]),
                        _out_size(sshape[2], kw, p["stride"][1], p["pad"][1]),
                    ),
                )
            else:
                op = "MaxPool" if layer.kind == "max_pool" else "AveragePool"
                x = g.node(
                    op,
                    [x],
                    kernel_shape=[kh, kw],
                    strides=list(p["stride"]),
                    pads=[p["pad"][0], p["pad"][1], p["pad"][0], p["pad"][1]],
                )
                shape = (
                    shape[0],
                    _out_size(shape[1], kh, p["stride"][0], p["pad"][0]),
                    _out_size(shape[2], kw, p["stride"][1], p["pad"][1]),
                )
        elif layer.kind == "add_prev":
            if block_input is None:
                raise ModelError("dlib network: residual add without a block input")
            src, sshape = block_input
            target = (max(shape[0], sshape[0]), max(shape[1], sshape[1]), max(shape[2], sshape[2]))
            x = g.node("Add", [pad_to(x, shape, target), pad_to(src, sshape, target)])
            shape = target
            block_input = None
        elif layer.kind == "fc":
            flat = g.node("Flatten", [x], axis=1)
            x = g.node("MatMul", [flat, g.const(p["W"], "fcW")])
            shape = (p["W"].shape[1], 1, 1)
        else:
            raise ModelError(f"dlib network: unsupported layer {layer.kind}")
        i += 1

    g.nodes[-1].output[0] = "descriptor"
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_v1",
        [helper.make_tensor_value_info("chip", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", shape[0]])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="checkpoint")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _starts_block(layers: list[Layer], i: int) -> bool:
    """A residual block is con, affine, relu, con, affine, [avg_pool], add_prev."""
    kinds = [lyr.kind for lyr in layers[i : i + 7]]
    return kinds[:5] == ["con", "affine", "relu", "con", "affine"] and (
        kinds[5:6] == ["add_prev"] or kinds[5:7] == ["avg_pool", "add_prev"]
    )


def input_normalisation(net: DlibNet) -> tuple[np.ndarray, float]:
    """Per-channel RGB means and the divisor dlib's input layer applies: (pixel - mean) / 256."""
    return np.array(net.channel_means, dtype=np.float32), 256.0


def convert(dat_path: Path, onnx_path: Path) -> DlibNet:
    """Read a dlib face recognition .dat file and write its ONNX equivalent to `onnx_path`."""
    import onnx

    try:
        data = Path(dat_path).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read dlib model {dat_path}: {exc}") from exc
    net = parse_dlib_net(data, str(dat_path))
    model = build_onnx(net)
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_suffix(onnx_path.suffix + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(onnx_path)
    return net
