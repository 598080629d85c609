"""Convert a TensorFlow.js graph model (model.json and its weight shards) to ONNX, for the ops that
convolutional face embedders use.

A TF.js graph model is a TensorFlow GraphDef written as JSON (`modelTopology.node`) whose constants
live in binary shards described by `weightsManifest`: each group's shards are concatenated and its
weights read one after another, float32 or int32, or quantised (`quantization.dtype` float16, or
uint8/uint16 as q * scale + min), as the TF.js converter writes them.

Ops converted (NHWC only): Placeholder, Const, Identity; Conv2D, DepthwiseConv2dNative and TF.js's
fused forms _FusedConv2D and FusedDepthwiseConv2dNative (fused BiasAdd, Relu, Relu6, Elu, Sigmoid,
Tanh, LeakyRelu, Prelu), SAME/VALID/EXPLICIT padding, strides, dilations; MatMul, _FusedMatMul,
BiasAdd; FusedBatchNorm(V3) in inference form; MaxPool, AvgPool; Add, AddV2, Sub, Mul, RealDiv,
Div, Maximum, Minimum, SquaredDifference with broadcasting; Relu, Relu6, Elu, LeakyRelu, Prelu,
Sigmoid, Tanh, Softmax, Abs, Neg, Square, Sqrt, Rsqrt, Exp, Log; Mean, Sum, Max, Min, Prod; Pad,
PadV2, MirrorPad (REFLECT), Reshape, Squeeze, ConcatV2. Anything else -- another op, NCHW data,
a graph with functions, a string tensor -- is refused by name rather than guessed at.

TF.js computes in NHWC; ONNX's Conv in NCHW. As in engines/tflite_convert.py the graph's input stays
NHWC and every 4-d tensor is carried in NCHW after the first convolution: each value remembers the
layouts it exists in, and a transpose is inserted only where an op needs TF's own order (Reshape,
Softmax, an output). Axis attributes (reductions, Squeeze, ConcatV2, Pad) are mapped to NCHW. Only the
nodes that the requested outputs need are converted, so a model's other heads (faceres's age and
gender) are dropped. The input's batch is free, as it is in the source (-1).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.errors import ModelError

log = logging.getLogger(__name__)

# ONNX Runtime >= 1.14 reads IR 8 (see engines/mtcnn_convert.py); opset 13 has every op used here.
OPSET = 13
IR_VERSION = 8
BATCH = "batch"
# The largest weight file set read for one model: far above an embedder, far below a damaged manifest's claim.
MAX_WEIGHT_BYTES = 256 << 20

# NHWC axis -> its position in NCHW.
_TO_NCHW = (0, 2, 3, 1)

_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "bool": np.dtype("?")}
_QUANTISED: dict[str, np.dtype] = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "float16": np.dtype("<f2")}
_TF_TYPES = {"DT_FLOAT": np.float32, "DT_INT32": np.int32, "DT_INT64": np.int64, "DT_BOOL": np.bool_}


class TfjsConversionError(ModelError):
    """A TF.js model holds something this converter does not handle, or is not a TF.js graph model."""


def read_weights(manifest: list[dict[str, Any]], read: Callable[[str], bytes], source: str) -> dict[str, np.ndarray]:
    """The weights of a TF.js `weightsManifest`, by name, dequantised to float32 where quantised.

    `read(path)` returns a shard's bytes (`path` as the manifest names it, relative to model.json).
    """
    out: dict[str, np.ndarray] = {}
    total = 0
    for group in manifest:
        data = b"".join(read(p) for p in group.get("paths", []))
        total += len(data)
        if total > MAX_WEIGHT_BYTES:
            raise TfjsConversionError(f"{source}: weight shards exceed {MAX_WEIGHT_BYTES} bytes; not an embedder")
        offset = 0
        for w in group.get("weights", []):
            name, shape, kind = w["name"], [int(d) for d in w.get("shape", [])], w.get("dtype", "float32")
            count = int(np.prod(shape)) if shape else 1
            quant = w.get("quantization")
            if kind not in _DTYPES:
                raise TfjsConversionError(f"{source}: weight {name!r} is {kind}; only float32, int32 and bool are read")
            stored: np.dtype | None = _QUANTISED.get(quant["dtype"]) if quant else _DTYPES[kind]
            if stored is None:
                raise TfjsConversionError(f"{source}: weight {name!r} is quantised as {quant['dtype']!r}; not read")
            end = offset + count * stored.itemsize
            if end > len(data):
                raise TfjsConversionError(
                    f"{source}: the shards of {group.get('paths')} end before weight {name!r}; a shard is "
                    "truncated or missing"
                )
            raw = np.frombuffer(data, stored, count, offset)
            offset = end
            if quant and quant["dtype"] != "float16":
                value = raw.astype(np.float64) * float(quant["scale"]) + float(quant["min"])
                raw = np.round(value) if kind == "int32" else value
            out[name] = raw.astype(_DTYPES[kind]).reshape(shape)
        if offset != len(data):
            raise TfjsConversionError(
                f"{source}: the manifest describes {offset} bytes of {group.get('paths')}, the shards hold "
                f"{len(data)}; they do not belong together"
            )
    return out


def _attr(node: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A node attribute in TF's JSON form, as a Python value (ints, floats, strings, lists of them)."""
    a = node.get("attr", {}).get(key)
    if a is None:
        return default
    if "list" in a:
        lst = a["list"]
        if "i" in lst:
            return [int(v) for v in lst["i"]]
        if "f" in lst:
            return [float(v) for v in lst["f"]]
        if "s" in lst:
            return [base64.b64decode(v).decode() for v in lst["s"]]
        return []
    if "i" in a:
        return int(a["i"])
    if "f" in a:
        return float(a["f"])
    if "b" in a:
        return bool(a["b"])
    if "s" in a:
        return base64.b64decode(a["s"]).decode()
    if "type" in a:
        return a["type"]
    return a


def _inline_tensor(t: Mapping[str, Any], where: str) -> np.ndarray:
    """A Const's `value` attribute (a TensorProto in JSON): small constants the converter left inline."""
    kind = _TF_TYPES.get(t.get("dtype", ""))
    if kind is None:
        raise TfjsConversionError(f"{where}: inline constant of type {t.get('dtype')!r} is not read")
    shape = [int(d.get("size", 0)) for d in t.get("tensorShape", {}).get("dim", [])]
    if "tensorContent" in t:
        arr = np.frombuffer(base64.b64decode(t["tensorContent"]), np.dtype(kind).newbyteorder("<"))
    else:
        vals = t.get("floatVal") or t.get("intVal") or t.get("int64Val") or t.get("boolVal") or []
        arr = np.array(vals, dtype=kind)
        if arr.size == 1 and shape:
            arr = np.full(shape, arr[0], dtype=kind)
    return arr.astype(kind).reshape(shape)


@dataclass
class _Value:
    """A TF tensor on its way to ONNX: its rank, its ONNX names by layout, or its constant data."""

    rank: int | None
    names: dict[str, str] = field(default_factory=dict)  # "tf" (TF's own order) / "nchw" -> ONNX name
    const: np.ndarray | None = None


class _Converter:
    def __init__(self, model: Mapping[str, Any], weights: Mapping[str, np.ndarray], source: str) -> None:
        self.source = source
        topo = model.get("modelTopology")
        if model.get("format") not in (None, "graph-model") or not isinstance(topo, dict) or "node" not in topo:
            raise TfjsConversionError(f"{source}: not a TF.js graph model (format {model.get('format')!r})")
        if topo.get("library", {}).get("function"):
            raise TfjsConversionError(f"{source}: the graph has functions (control flow); not converted")
        self.weights = weights
        self.nodes_by_name: dict[str, dict[str, Any]] = {n["name"]: n for n in topo.get("node", [])}
        self.values: dict[str, _Value] = {}
        self.onnx_nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.used_names: set[str] = set()
        self.input_name = ""
        self.input_shape: list[int | str] = []

    # ---- graph walking ---------------------------------------------------------------------------

    def order(self, outputs: list[str]) -> list[dict[str, Any]]:
        """The nodes the outputs need, each after its inputs."""
        done: set[str] = set()
        ordered: list[dict[str, Any]] = []
        for out in outputs:
            stack: list[tuple[str, bool]] = [(out, False)]
            while stack:
                name, expanded = stack.pop()
                if name in done:
                    continue
                node = self.nodes_by_name.get(name)
                if node is None:
                    raise TfjsConversionError(f"{self.source}: the graph has no node {name!r}")
                if expanded:
                    done.add(name)
                    ordered.append(node)
                    continue
                stack.append((name, True))
                stack.extend((i, False) for i in self.data_inputs(node) if i not in done)
        return ordered

    @staticmethod
    def data_inputs(node: Mapping[str, Any]) -> list[str]:
        # "^name" is a control dependency; "name:1" the second output of a node (none of ours has two).
        return [i.split(":")[0] for i in node.get("input", []) if not i.startswith("^")]

    # ---- writing ONNX ----------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}#{k}", k + 1
        self.used_names.add(name)
        return name

    def const(self, arr: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        output = self.fresh(output)
        self.onnx_nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def get(self, name: str, layout: str) -> str:
        """The ONNX name of TF value `name` in `layout` ("tf" or "nchw"), transposing once if needed."""
        v = self.values[name]
        if v.const is not None:
            arr = v.const
            if layout == "nchw" and arr.ndim == 4:
                arr = arr.transpose(0, 3, 1, 2)
            key = f"const:{layout}"
            if key not in v.names:
                v.names[key] = self.const(arr, name if layout == "tf" else f"{name}/nchw")
            return v.names[key]
        if layout not in v.names:
            src = next(iter(v.names.values()))
            perm = [0, 3, 1, 2] if layout == "nchw" else [0, 2, 3, 1]
            if v.rank != 4:
                raise TfjsConversionError(f"{self.source}: {name!r} is not 4-d; it has no {layout} form")
            v.names[layout] = self.node("Transpose", [src], f"{name}/{layout}", perm=perm)
        return v.names[layout]

    def layout_of(self, name: str) -> str:
        """The layout to compute an elementwise op on `name` in: NCHW when it already exists so."""
        v = self.values[name]
        return "nchw" if "nchw" in v.names else "tf"

    def put(self, name: str, onnx_name: str, layout: str, rank: int | None) -> None:
        self.values[name] = _Value(rank, {layout: onnx_name})

    def constant(self, name: str, what: str, node: Mapping[str, Any]) -> np.ndarray:
        v = self.values[name]
        if v.const is None:
            raise TfjsConversionError(f"{self.source}: {node['op']} {node['name']!r}: its {what} is not a constant")
        return v.const

    # ---- conversion ------------------------------------------------------------------------------

    def convert(self, outputs: list[str]) -> Any:
        from onnx import TensorProto, checker, helper, shape_inference

        # The outputs keep their TF names: no node inside takes them, an Identity gives them at the end.
        self.used_names.update(outputs)
        for node in self.order(outputs):
            op = node["op"]
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                known = sorted(n[3:] for n in dir(self) if n.startswith("op_"))
                raise TfjsConversionError(
                    f"{self.source}: node {node['name']!r} is {op}, which this converter does not handle "
                    f"(it converts {', '.join(known)})"
                )
            if _attr(node, "data_format", "NHWC") not in ("NHWC", "NDHWC"):
                raise TfjsConversionError(f"{self.source}: node {node['name']!r} computes in NCHW; not converted")
            handler(node, self.data_inputs(node))
        if not self.input_name:
            raise TfjsConversionError(f"{self.source}: the outputs do not depend on a Placeholder input")
        out_infos = []
        for out in outputs:
            v = self.values[out]
            if v.const is not None:
                raise TfjsConversionError(f"{self.source}: output {out!r} is a constant")
            self.onnx_nodes.append(helper.make_node("Identity", [self.get(out, "tf")], [out], name=out))
            out_infos.append((out, v.rank))
        graph = helper.make_graph(
            self.onnx_nodes,
            "tfjs",
            [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, self.input_shape)],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n, _ in out_infos],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="checkpoint")
        model.ir_version = IR_VERSION
        # The outputs' static sizes (an embedder's length is checked against them), batch kept free.
        inferred = shape_inference.infer_shapes(model)
        shapes = {i.name: i.type.tensor_type.shape for i in [*inferred.graph.value_info, *inferred.graph.output]}
        del model.graph.output[:]
        for name, rank in out_infos:
            dims: list[int | str | None] = [None] * (rank or 0)
            if name in shapes and len(shapes[name].dim) == rank:
                dims = [d.dim_value if d.HasField("dim_value") else None for d in shapes[name].dim]
            if dims:
                dims[0] = BATCH
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims if rank else None))
        checker.check_model(model)
        return model

    # Sources -------------------------------------------------------------------------------------

    def op_Placeholder(self, node: dict[str, Any], ins: list[str]) -> None:
        if self.input_name:
            raise TfjsConversionError(f"{self.source}: more than one input; an embedder has one image input")
        dims = [int(d.get("size", -1)) for d in _attr(node, "shape", {}).get("shape", {}).get("dim", [])]
        if len(dims) != 4 or dims[3] != 3:
            raise TfjsConversionError(f"{self.source}: input {node['name']!r} is {dims}; an embedder takes N,H,W,3")
        if _attr(node, "dtype", "DT_FLOAT") != "DT_FLOAT":
            raise TfjsConversionError(f"{self.source}: input {node['name']!r} is not float32")
        self.input_name = self.fresh(node["name"])
        self.input_shape = [BATCH, *(d if d > 0 else f"dim{i}" for i, d in enumerate(dims[1:], 1))]
        self.put(node["name"], self.input_name, "tf", 4)

    def op_Const(self, node: dict[str, Any], ins: list[str]) -> None:
        name = node["name"]
        if name in self.weights:
            arr = self.weights[name]
        elif "value" in node.get("attr", {}):
            arr = _inline_tensor(node["attr"]["value"].get("tensor", {}), f"{self.source}: {name!r}")
        else:
            raise TfjsConversionError(f"{self.source}: constant {name!r} has no weights in the manifest")
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.values[name] = _Value(arr.ndim, const=arr)

    def op_Identity(self, node: dict[str, Any], ins: list[str]) -> None:
        self.values[node["name"]] = self.values[ins[0]]

    # Convolutions and matrix products -----------------------------------------------------------

    def _pads(self, node: Mapping[str, Any]) -> dict[str, Any]:
        padding = _attr(node, "padding", "VALID")
        if padding == "SAME":
            dilations = _attr(node, "dilations", [1, 1, 1, 1])
            if max(dilations) == 1:
                # ONNX's SAME_UPPER is TF's SAME (the odd pixel at the end), for any input size.
                return {"auto_pad": "SAME_UPPER"}
            # ONNX Runtime refuses SAME_UPPER with dilations; at stride 1 (all TF allows with them)
            # SAME pads (kernel - 1) * dilation in all, whatever the size.
            if max(_attr(node, "strides", [1, 1, 1, 1])) != 1:
                raise TfjsConversionError(f"{self.source}: {node['name']!r}: SAME with both strides and dilations")
            kh, kw = self.values[node["input"][1].split(":")[0]].const.shape[:2]  # type: ignore[union-attr]
            total = [(kh - 1) * dilations[1], (kw - 1) * dilations[2]]
            return {"pads": [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2]}
        if padding == "VALID":
            return {"pads": [0, 0, 0, 0]}
        if padding == "EXPLICIT":
            p = _attr(node, "explicit_paddings", [])
            if len(p) != 8 or any(p[:2]) or any(p[6:]):
                raise TfjsConversionError(f"{self.source}: {node['name']!r}: explicit paddings {p} not on H and W")
            return {"pads": [p[2], p[4], p[3], p[5]]}
        raise TfjsConversionError(f"{self.source}: {node['name']!r}: padding {padding!r} not converted")

    def _conv(self, node: dict[str, Any], ins: list[str], depthwise: bool) -> None:
        name = node["name"]
        w = self.constant(ins[1], "filter", node).astype(np.float32)
        if w.ndim != 4:
            raise TfjsConversionError(f"{self.source}: {name!r}: filter of shape {w.shape} is not 4-d")
        kh, kw, c_in, mult = w.shape
        if depthwise:
            # (KH, KW, C, M) -> (C * M, 1, KH, KW); TF's output channel c * M + m is ONNX group c's m-th.
            onnx_w = w.reshape(kh, kw, c_in * mult).transpose(2, 0, 1)[:, None]
            group = c_in
        else:
            onnx_w = w.transpose(3, 2, 0, 1)  # (KH, KW, I, O) -> (O, I, KH, KW)
            group = 1
        strides = _attr(node, "strides", [1, 1, 1, 1])
        dilations = _attr(node, "dilations", [1, 1, 1, 1])
        if strides[0] != 1 or strides[3] != 1 or dilations[0] != 1 or dilations[3] != 1:
            raise TfjsConversionError(f"{self.source}: {name!r}: strides or dilations on batch or channels")
        y = self.node(
            "Conv",
            [self.get(ins[0], "nchw"), self.const(onnx_w, f"{name}/weights")],
            f"{name}/conv",
            kernel_shape=[kh, kw],
            strides=strides[1:3],
            dilations=dilations[1:3],
            group=group,
            **self._pads(node),
        )
        self._fused(node, ins, y, "nchw", 4)

    def _fused(self, node: dict[str, Any], ins: list[str], y: str, layout: str, rank: int) -> None:
        """Apply a TF.js fused node's `fused_ops` (BiasAdd, then an activation) to `y` and store the result."""
        name = node["name"]
        ops = _attr(node, "fused_ops", [])
        extra = ins[2:]
        if ops and ops[0] == "BiasAdd":
            if not extra:
                raise TfjsConversionError(f"{self.source}: {name!r}: fused BiasAdd without a bias")
            y = self.node(
                "Add",
                [y, self.const(self.broadcast(self.values[extra[0]].const, layout, node), f"{name}/bias")],
                f"{name}/bias_add",
            )
            extra, ops = extra[1:], ops[1:]
        if len(ops) > 1:
            raise TfjsConversionError(f"{self.source}: {name!r}: fused ops {_attr(node, 'fused_ops')} not converted")
        if ops:
            y = self.activation(ops[0], y, node, layout, extra)
        self.put(name, y, layout, rank)

    def activation(self, kind: str, x: str, node: Mapping[str, Any], layout: str, extra: list[str]) -> str:
        name = node["name"]
        simple = {"Relu": "Relu", "Elu": "Elu", "Sigmoid": "Sigmoid", "Tanh": "Tanh"}
        if kind in simple:
            return self.node(simple[kind], [x], f"{name}/{kind.lower()}")
        if kind == "Relu6":
            bounds = [self.const(np.float32(v), f"{name}/{end}") for v, end in ((0.0, "min"), (6.0, "max"))]
            return self.node("Clip", [x, *bounds], f"{name}/relu6")
        if kind == "LeakyRelu":
            alpha = _attr(node, "leakyrelu_alpha", _attr(node, "alpha", 0.2))
            return self.node("LeakyRelu", [x], f"{name}/leaky_relu", alpha=float(alpha))
        if kind == "Prelu":
            if not extra or self.values[extra[0]].const is None:
                raise TfjsConversionError(f"{self.source}: {name!r}: Prelu without a constant alpha")
            alpha = self.broadcast(self.values[extra[0]].const, layout, node)
            return self.node("PRelu", [x, self.const(alpha, f"{name}/alpha")], f"{name}/prelu")
        raise TfjsConversionError(f"{self.source}: {name!r}: activation {kind} is not converted")

    def broadcast(self, arr: np.ndarray | None, layout: str, node: Mapping[str, Any]) -> np.ndarray:
        """A constant operand of an op computed in `layout`, shaped to broadcast as it does in TF."""
        if arr is None:
            raise TfjsConversionError(f"{self.source}: {node['name']!r}: an operand expected constant is not")
        arr = arr.astype(np.float32) if arr.dtype != np.float32 and arr.dtype.kind == "f" else arr
        if layout == "nchw" and arr.ndim >= 1:
            # Broadcasting aligns trailing axes: make it 4-d NHWC, then NCHW.
            arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape).transpose(0, 3, 1, 2)
        return arr

    def op_Conv2D(self, node: dict[str, Any], ins: list[str]) -> None:
        self._conv(node, ins, depthwise=False)

    def op__FusedConv2D(self, node: dict[str, Any], ins: list[str]) -> None:
        self._conv(node, ins, depthwise=False)

    def op_DepthwiseConv2dNative(self, node: dict[str, Any], ins: list[str]) -> None:
        self._conv(node, ins, depthwise=True)

    def op_FusedDepthwiseConv2dNative(self, node: dict[str, Any], ins: list[str]) -> None:
        self._conv(node, ins, depthwise=True)

    def _matmul(self, node: dict[str, Any], ins: list[str]) -> None:
        name = node["name"]
        if self.values[ins[0]].rank != 2:
            raise TfjsConversionError(f"{self.source}: {name!r}: MatMul of a non-matrix")
        a = self.get(ins[0], "tf")
        if _attr(node, "transpose_a", False):
            a = self.node("Transpose", [a], f"{name}/a_t", perm=[1, 0])
        b_val = self.values[ins[1]]
        if b_val.const is not None:
            b_arr = b_val.const.astype(np.float32)
            b = self.const(b_arr.T if _attr(node, "transpose_b", False) else b_arr, f"{name}/kernel")
        else:
            b = self.get(ins[1], "tf")
            if _attr(node, "transpose_b", False):
                b = self.node("Transpose", [b], f"{name}/b_t", perm=[1, 0])
        self._fused(node, ins, self.node("MatMul", [a, b], f"{name}/matmul"), "tf", 2)

    def op_MatMul(self, node: dict[str, Any], ins: list[str]) -> None:
        self._matmul(node, ins)

    def op__FusedMatMul(self, node: dict[str, Any], ins: list[str]) -> None:
        self._matmul(node, ins)

    def op_BiasAdd(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "Add")

    def op_FusedBatchNorm(self, node: dict[str, Any], ins: list[str]) -> None:
        name = node["name"]
        if _attr(node, "is_training", False):
            raise TfjsConversionError(f"{self.source}: {name!r}: batch norm in training form")
        scale, offset, mean, var = (self.constant(i, "statistics", node).astype(np.float64) for i in ins[1:5])
        eps = _attr(node, "epsilon", 1e-3)
        mul = scale / np.sqrt(var + eps)
        add = offset - mean * mul
        layout = self.layout_of(ins[0])
        x = self.get(ins[0], layout)
        x = self.node(
            "Mul",
            [x, self.const(self.broadcast(mul.astype(np.float32), layout, node), f"{name}/mul")],
            f"{name}/scaled",
        )
        y = self.node("Add", [x, self.const(self.broadcast(add.astype(np.float32), layout, node), f"{name}/add")], name)
        self.put(name, y, layout, self.values[ins[0]].rank)

    op_FusedBatchNormV3 = op_FusedBatchNorm

    def _pool(self, node: dict[str, Any], ins: list[str], onnx_op: str) -> None:
        ksize, strides = _attr(node, "ksize"), _attr(node, "strides")
        if ksize[0] != 1 or ksize[3] != 1 or strides[0] != 1 or strides[3] != 1:
            raise TfjsConversionError(f"{self.source}: {node['name']!r}: pooling across batch or channels")
        y = self.node(
            onnx_op,
            [self.get(ins[0], "nchw")],
            node["name"],
            kernel_shape=ksize[1:3],
            strides=strides[1:3],
            **self._pads(node),
        )
        self.put(node["name"], y, "nchw", 4)

    def op_MaxPool(self, node: dict[str, Any], ins: list[str]) -> None:
        self._pool(node, ins, "MaxPool")

    def op_AvgPool(self, node: dict[str, Any], ins: list[str]) -> None:
        # TF's SAME average leaves the padding out of the count, as ONNX's count_include_pad=0 does.
        self._pool(node, ins, "AveragePool")

    # Elementwise ---------------------------------------------------------------------------------

    def _binary(self, node: dict[str, Any], ins: list[str], onnx_op: str) -> None:
        name = node["name"]
        a, b = (self.values[i] for i in ins[:2])
        computed = [(i, v) for i, v in zip(ins[:2], (a, b)) if v.const is None]
        # NCHW only when every computed operand is a 4-d tensor and one already exists in NCHW;
        # otherwise TF's own order keeps broadcasting exact.
        nchw = bool(computed) and all(v.rank == 4 for _, v in computed) and any("nchw" in v.names for _, v in computed)
        layout = "nchw" if nchw else "tf"
        operands = []
        for i, v in zip(ins[:2], (a, b)):
            if v.const is None:
                operands.append(self.get(i, layout))
            else:
                operands.append(self.const(self.broadcast(v.const, layout, node), f"{name}/{i}"))
        ranks = [v.rank if v.const is None else v.const.ndim for v in (a, b)]
        rank = max((r for r in ranks if r is not None), default=None)
        if onnx_op == "SquaredDifference":
            diff = self.node("Sub", operands, f"{name}/diff")
            y = self.node("Mul", [diff, diff], name)
        else:
            y = self.node(onnx_op, operands, name)
        self.put(name, y, layout, rank)

    def op_Add(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "Add")

    op_AddV2 = op_Add

    def op_Sub(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "Sub")

    def op_Mul(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "Mul")

    def op_RealDiv(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "Div")

    op_Div = op_RealDiv

    def op_Maximum(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "Max")

    def op_Minimum(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "Min")

    def op_SquaredDifference(self, node: dict[str, Any], ins: list[str]) -> None:
        self._binary(node, ins, "SquaredDifference")

    def op_Prelu(self, node: dict[str, Any], ins: list[str]) -> None:
        layout = self.layout_of(ins[0])
        y = self.activation("Prelu", self.get(ins[0], layout), node, layout, ins[1:])
        self.put(node["name"], y, layout, self.values[ins[0]].rank)

    def _unary(self, node: dict[str, Any], ins: list[str], onnx_op: str, **attrs: Any) -> None:
        layout = self.layout_of(ins[0])
        y = self.node(onnx_op, [self.get(ins[0], layout)], node["name"], **attrs)
        self.put(node["name"], y, layout, self.values[ins[0]].rank)

    def op_Relu(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Relu")

    def op_Relu6(self, node: dict[str, Any], ins: list[str]) -> None:
        layout = self.layout_of(ins[0])
        y = self.activation("Relu6", self.get(ins[0], layout), node, layout, [])
        self.put(node["name"], y, layout, self.values[ins[0]].rank)

    def op_LeakyRelu(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "LeakyRelu", alpha=float(_attr(node, "alpha", 0.2)))

    def op_Elu(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Elu")

    def op_Sigmoid(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Sigmoid")

    def op_Tanh(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Tanh")

    def op_Abs(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Abs")

    def op_Neg(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Neg")

    def op_Sqrt(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Sqrt")

    def op_Exp(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Exp")

    def op_Log(self, node: dict[str, Any], ins: list[str]) -> None:
        self._unary(node, ins, "Log")

    def op_Square(self, node: dict[str, Any], ins: list[str]) -> None:
        layout = self.layout_of(ins[0])
        x = self.get(ins[0], layout)
        self.put(node["name"], self.node("Mul", [x, x], node["name"]), layout, self.values[ins[0]].rank)

    def op_Rsqrt(self, node: dict[str, Any], ins: list[str]) -> None:
        layout = self.layout_of(ins[0])
        root = self.node("Sqrt", [self.get(ins[0], layout)], f"{node['name']}/sqrt")
        self.put(node["name"], self.node("Reciprocal", [root], node["name"]), layout, self.values[ins[0]].rank)

    def op_Softmax(self, node: dict[str, Any], ins: list[str]) -> None:
        # TF's Softmax is over the last axis: TF's own order.
        y = self.node("Softmax", [self.get(ins[0], "tf")], node["name"], axis=-1)
        self.put(node["name"], y, "tf", self.values[ins[0]].rank)

    # Shapes and reductions -----------------------------------------------------------------------

    def _axes(self, node: Mapping[str, Any], axes: list[int], rank: int | None) -> list[int]:
        if rank is None:
            raise TfjsConversionError(f"{self.source}: {node['name']!r}: rank of the input unknown")
        return sorted(a % rank for a in axes)

    def _reduced_layout(self, x: str, axes: list[int], keep: bool) -> str:
        """NCHW when `x` exists so and the axes that remain keep their order in it."""
        v = self.values[x]
        if "nchw" not in v.names or v.rank != 4:
            return "tf"
        if keep:
            return "nchw"
        rest = [_TO_NCHW[a] for a in range(4) if a not in axes]
        return "nchw" if rest == sorted(rest) else "tf"

    def _reduce(self, node: dict[str, Any], ins: list[str], onnx_op: str) -> None:
        name = node["name"]
        rank = self.values[ins[0]].rank
        axes = self._axes(node, [int(a) for a in np.ravel(self.constant(ins[1], "axes", node))], rank)
        keep = bool(_attr(node, "keep_dims", False))
        layout = self._reduced_layout(ins[0], axes, keep)
        onnx_axes = [_TO_NCHW[a] for a in axes] if layout == "nchw" else axes
        x = self.get(ins[0], layout)
        if onnx_op == "ReduceSum":  # an input from opset 13 on; the others keep the attribute until 18
            y = self.node(
                onnx_op, [x, self.const(np.array(onnx_axes, np.int64), f"{name}/axes")], name, keepdims=int(keep)
            )
        else:
            y = self.node(onnx_op, [x], name, axes=onnx_axes, keepdims=int(keep))
        out_rank = rank if keep else (rank or 0) - len(axes)
        self.put(name, y, layout if out_rank == 4 else "tf", out_rank)

    def op_Mean(self, node: dict[str, Any], ins: list[str]) -> None:
        self._reduce(node, ins, "ReduceMean")

    def op_Sum(self, node: dict[str, Any], ins: list[str]) -> None:
        self._reduce(node, ins, "ReduceSum")

    def op_Max(self, node: dict[str, Any], ins: list[str]) -> None:
        self._reduce(node, ins, "ReduceMax")

    def op_Min(self, node: dict[str, Any], ins: list[str]) -> None:
        self._reduce(node, ins, "ReduceMin")

    def op_Prod(self, node: dict[str, Any], ins: list[str]) -> None:
        self._reduce(node, ins, "ReduceProd")

    def op_Squeeze(self, node: dict[str, Any], ins: list[str]) -> None:
        name = node["name"]
        rank = self.values[ins[0]].rank
        dims = _attr(node, "squeeze_dims", []) or _attr(node, "axis", [])
        if not dims:
            raise TfjsConversionError(f"{self.source}: {name!r}: Squeeze without axes (sizes unknown here)")
        axes = self._axes(node, dims, rank)
        layout = self._reduced_layout(ins[0], axes, keep=False)
        onnx_axes = [_TO_NCHW[a] for a in axes] if layout == "nchw" else axes
        y = self.node(
            "Squeeze", [self.get(ins[0], layout), self.const(np.array(onnx_axes, np.int64), f"{name}/axes")], name
        )
        out_rank = (rank or 0) - len(axes)
        self.put(name, y, layout if out_rank == 4 else "tf", out_rank)

    def op_Reshape(self, node: dict[str, Any], ins: list[str]) -> None:
        name = node["name"]
        target = [int(d) for d in np.ravel(self.constant(ins[1], "shape", node))]
        if not target or target[0] != -1:
            raise TfjsConversionError(
                f"{self.source}: {name!r}: Reshape to {target} fixes the batch; only a leading -1 keeps it free"
            )
        shape = self.const(np.array(target, np.int64), f"{name}/shape")
        self.put(name, self.node("Reshape", [self.get(ins[0], "tf"), shape], name), "tf", len(target))

    def _pad(self, node: dict[str, Any], ins: list[str], mode: str, value: float = 0.0) -> None:
        name = node["name"]
        p = np.asarray(self.constant(ins[1], "paddings", node)).reshape(-1, 2)
        x = self.values[ins[0]]
        layout = "nchw" if "nchw" in x.names and x.rank == 4 else "tf"
        if layout == "nchw":
            p = p[[0, 3, 1, 2]]
        inputs = [
            self.get(ins[0], layout),
            self.const(np.concatenate([p[:, 0], p[:, 1]]).astype(np.int64), f"{name}/pads"),
        ]
        if mode == "constant":
            inputs.append(self.const(np.float32(value), f"{name}/value"))
        self.put(name, self.node("Pad", inputs, name, mode=mode), layout, x.rank)

    def op_Pad(self, node: dict[str, Any], ins: list[str]) -> None:
        self._pad(node, ins, "constant")

    def op_PadV2(self, node: dict[str, Any], ins: list[str]) -> None:
        self._pad(node, ins, "constant", float(np.ravel(self.constant(ins[2], "value", node))[0]))

    def op_MirrorPad(self, node: dict[str, Any], ins: list[str]) -> None:
        if _attr(node, "mode", "REFLECT") != "REFLECT":
            raise TfjsConversionError(f"{self.source}: {node['name']!r}: MirrorPad {_attr(node, 'mode')} not converted")
        self._pad(node, ins, "reflect")

    def op_ConcatV2(self, node: dict[str, Any], ins: list[str]) -> None:
        name = node["name"]
        parts, axis_name = ins[:-1], ins[-1]
        vals = [self.values[i] for i in parts]
        rank = next((v.rank if v.const is None else v.const.ndim for v in vals), None)
        (axis,) = self._axes(node, [int(np.ravel(self.constant(axis_name, "axis", node))[0])], rank)
        nchw = rank == 4 and any("nchw" in v.names for v in vals)
        layout = "nchw" if nchw else "tf"
        y = self.node("Concat", [self.get(i, layout) for i in parts], name, axis=_TO_NCHW[axis] if nchw else axis)
        self.put(name, y, layout, rank)


def load_tfjs(
    model_json: bytes | str, read: Callable[[str], bytes], source: str = "model.json"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The parsed model.json and its weights; `read(path)` gives a shard's bytes by its manifest path."""
    try:
        model = json.loads(model_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TfjsConversionError(f"{source}: not JSON ({exc}); is it a TF.js model.json?") from exc
    if not isinstance(model, dict) or "modelTopology" not in model or "weightsManifest" not in model:
        raise TfjsConversionError(f"{source}: no modelTopology and weightsManifest; not a TF.js graph model")
    return model, read_weights(model["weightsManifest"], read, source)


def convert_tfjs(
    model: Mapping[str, Any], weights: Mapping[str, np.ndarray], outputs: list[str], source: str = "model.json"
) -> Any:
    """An ONNX ModelProto computing the TF.js graph `model`'s `outputs` (node names; ":0" allowed), the
    input NHWC with a free batch. Raises TfjsConversionError naming the op or tensor it cannot convert.

    Example: ``model, w = load_tfjs(Path("faceres.json").read_bytes(), lambda p: Path(p).read_bytes());
    onnx.save(convert_tfjs(model, w, ["global_pooling/Mean"]), "faceres.onnx")``
    """
    names = [o.split(":")[0] for o in outputs]
    proto = _Converter(model, weights, source).convert(names)
    log.info("converted %s: %d ONNX nodes", source, len(proto.graph.node))
    return proto
