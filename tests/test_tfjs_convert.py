"""The TF.js graph-model -> ONNX converter, on tiny model.json files and weight shards written here and
checked against a plain numpy implementation of TensorFlow's ops (NHWC, as TF computes them)."""

from __future__ import annotations

import base64
import json

import numpy as np
import onnxruntime as ort
import pytest

from engines.tfjs_convert import TfjsConversionError, convert_tfjs, load_tfjs, read_weights

# ---- numpy reference of TF's ops ------------------------------------------------------------------


def same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's SAME padding on one axis: output ceil(size / stride), the odd pixel at the end."""
    eff = (k - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def ref_conv(x, w, stride, padding, dilation=1, depthwise=False, explicit=None):
    """NHWC convolution; w is (KH, KW, I, O), or (KH, KW, C, M) for a depthwise one."""
    kh, kw = w.shape[:2]
    if padding == "SAME":
        pads = [same_pads(x.shape[1], kh, stride, dilation), same_pads(x.shape[2], kw, stride, dilation)]
    elif padding == "EXPLICIT":
        pads = [tuple(explicit[2:4]), tuple(explicit[4:6])]
    else:
        pads = [(0, 0), (0, 0)]
    xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    oh = (xp.shape[1] - (kh - 1) * dilation - 1) // stride + 1
    ow = (xp.shape[2] - (kw - 1) * dilation - 1) // stride + 1
    if depthwise:
        c, m = w.shape[2:]
        out = np.zeros((x.shape[0], oh, ow, c * m))
    else:
        out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[
                :,
                i * dilation : i * dilation + stride * oh : stride,
                j * dilation : j * dilation + stride * ow : stride,
            ]
            if depthwise:
                out += (patch[..., :, None] * w[i, j][None, None, None]).reshape(out.shape)
            else:
                out += patch @ w[i, j]
    return out


def ref_pool(x, k, stride, padding, kind):
    pads = (
        [same_pads(x.shape[1], k, stride, 1), same_pads(x.shape[2], k, stride, 1)]
        if padding == "SAME"
        else [(0, 0)] * 2
    )
    fill = -np.inf if kind == "max" else np.nan
    xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)], constant_values=fill)
    oh, ow = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    win = np.stack(
        [xp[:, i : i + stride * oh : stride, j : j + stride * ow : stride] for i in range(k) for j in range(k)]
    )
    # TF's SAME average counts only the pixels inside the image.
    return win.max(0) if kind == "max" else np.nanmean(win, 0)


ACTS = {
    "Relu": lambda x, a: np.maximum(x, 0),
    "Relu6": lambda x, a: np.clip(x, 0, 6),
    "Prelu": lambda x, a: np.where(x > 0, x, a * x),
    "Sigmoid": lambda x, a: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "Elu": lambda x, a: np.where(x > 0, x, np.exp(x) - 1),
}


# ---- writing TF.js graph models ---------------------------------------------------------------------


def _list(key: str, values) -> dict:
    return {"list": {key: [str(v) if key == "i" else v for v in values]}}


def _s(text: str) -> dict:
    return {"s": base64.b64encode(text.encode()).decode()}


class TinyTfjs:
    """A TF.js graph model built node by node, with the numpy reference of each node kept beside it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.nodes: list[dict] = []
        self.weights: dict[str, np.ndarray] = {}
        self.ref: dict[str, object] = {}  # node name -> numpy function of the input, or a constant
        self.nodes.append(
            {
                "name": "input",
                "op": "Placeholder",
                "attr": {"shape": {"shape": {"dim": [{"size": str(d)} for d in shape]}}, "dtype": {"type": "DT_FLOAT"}},
            }
        )
        self.ref["input"] = lambda x: x

    def _name(self, op: str) -> str:
        return f"{op.lower()}_{len(self.nodes)}"

    def const(self, arr) -> str:
        arr = np.asarray(arr)
        name = f"const_{len(self.nodes)}"
        self.nodes.append(
            {
                "name": name,
                "op": "Const",
                "attr": {"dtype": {"type": "DT_INT32" if arr.dtype.kind == "i" else "DT_FLOAT"}},
            }
        )
        self.weights[name] = arr.astype(np.int32 if arr.dtype.kind == "i" else np.float32)
        return name

    def op(self, op: str, inputs: list[str], fn, **attr) -> str:
        name = self._name(op)
        self.nodes.append({"name": name, "op": op, "input": inputs, "attr": attr})
        self.ref[name] = fn
        return name

    def value(self, name: str, x: np.ndarray):
        ref = self.ref.get(name)
        return ref(x) if callable(ref) else self.weights[name].astype(np.float64)

    # Layers -------------------------------------------------------------------------------------

    def conv(
        self,
        x,
        w,
        stride=1,
        padding="SAME",
        dilation=1,
        depthwise=False,
        bias=None,
        act=None,
        alpha=None,
        explicit=None,
    ):
        attrs = {
            "strides": _list("i", [1, stride, stride, 1]),
            "dilations": _list("i", [1, dilation, dilation, 1]),
            "padding": _s(padding),
            "data_format": _s("NHWC"),
        }
        if explicit is not None:
            attrs["explicit_paddings"] = _list("i", explicit)
        inputs = [x, self.const(w)]
        fused = []
        if bias is not None:
            fused.append("BiasAdd")
            inputs.append(self.const(bias))
        if act is not None:
            fused.append(act)
            if alpha is not None:
                inputs.append(self.const(alpha))
        if fused:
            attrs["fused_ops"] = {"list": {"s": [base64.b64encode(f.encode()).decode() for f in fused]}}
            attrs["num_args"] = {"i": str(len(inputs) - 2)}
            op = "FusedDepthwiseConv2dNative" if depthwise else "_FusedConv2D"
        else:
            op = "DepthwiseConv2dNative" if depthwise else "Conv2D"

        # The reference reads the weights as stored (quantised ones as TF.js would read them).
        def fn(v, x=x, names=inputs[1:]):
            w, *rest = (self.weights[n].astype(np.float64) for n in names)
            y = ref_conv(self.value(x, v), w, stride, padding, dilation, depthwise, explicit)
            if bias is not None:
                y = y + rest.pop(0)
            return ACTS[act](y, rest[0] if rest else None) if act else y

        return self.op(op, inputs, fn, **attrs)

    def binary(self, op: str, a: str, b: str) -> str:
        f = {
            "AddV2": np.add,
            "Add": np.add,
            "Sub": np.subtract,
            "Mul": np.multiply,
            "Maximum": np.maximum,
            "Minimum": np.minimum,
            "RealDiv": np.divide,
        }[op]
        return self.op(op, [a, b], lambda v: f(self.value(a, v), self.value(b, v)))

    def unary(self, op: str, x: str, fn) -> str:
        return self.op(op, [x], lambda v: fn(self.value(x, v)))

    def mxnet_prelu(self, x: str, gamma: np.ndarray) -> str:
        """PReLU as becauseofAI's MobileFace reads after conversion: max(0, x) + gamma * min(0, x)."""
        zero = self.const(np.float32(0))
        pos = self.binary("Maximum", zero, x)
        return self.binary("AddV2", pos, self.binary("Mul", self.const(gamma), self.binary("Minimum", zero, x)))

    def reduce(self, op: str, x: str, axes: list[int], keep: bool) -> str:
        f = {"Mean": np.mean, "Sum": np.sum, "Max": np.max}[op]
        return self.op(
            op,
            [x, self.const(np.array(axes, np.int32))],
            lambda v: f(self.value(x, v), axis=tuple(axes), keepdims=keep),
            keep_dims={"b": keep},
        )

    def model_json(self, shards: int = 1, quantise: dict[str, str] | None = None) -> tuple[dict, dict[str, bytes]]:
        """(model.json, shard files): the weights in `shards` files, some stored quantised as TF.js does."""
        quantise = quantise or {}
        entries, blob = [], b""
        for name, arr in self.weights.items():
            entry = {"name": name, "shape": list(arr.shape), "dtype": "int32" if arr.dtype.kind == "i" else "float32"}
            kind = quantise.get(name)
            if kind == "float16":
                entry["quantization"] = {"dtype": "float16"}
                blob += arr.astype("<f2").tobytes()
                self.weights[name] = arr.astype(np.float16).astype(np.float32)
            elif kind == "uint8":
                lo, hi = float(arr.min()), float(arr.max())
                scale = (hi - lo) / 255 or 1.0
                q = np.round((arr - lo) / scale).astype(np.uint8)
                entry["quantization"] = {"dtype": "uint8", "min": lo, "scale": scale}
                blob += q.tobytes()
                self.weights[name] = (q * scale + lo).astype(np.float32)  # the reference sees what TF.js would
            else:
                blob += arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            entries.append(entry)
        cut = [len(blob) * k // shards for k in range(shards + 1)]
        files = {f"group1-shard{k + 1}of{shards}.bin": blob[cut[k] : cut[k + 1]] for k in range(shards)}
        model = {
            "format": "graph-model",
            "modelTopology": {"node": self.nodes, "library": {}, "versions": {}},
            "weightsManifest": [{"paths": list(files), "weights": entries}],
        }
        return model, files

    def check(self, outputs: list[str], x: np.ndarray, tol: float = 1e-4, **kw) -> None:
        """Convert, run in ONNX Runtime, and compare each output with the numpy reference."""
        model, files = self.model_json(**kw)
        parsed, weights = load_tfjs(json.dumps(model).encode(), files.__getitem__, "tiny")
        proto = convert_tfjs(parsed, weights, outputs, "tiny")
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x.astype(np.float32)})
        for name, y in zip(outputs, got, strict=True):
            want = self.value(name, x.astype(np.float64))
            assert y.shape == want.shape, name
            np.testing.assert_allclose(y, want, rtol=tol, atol=tol, err_msg=name)
        # The batch is free: each face alone gets what it gets in the batch.
        alone = np.concatenate(
            [session.run(None, {"input": x[i : i + 1].astype(np.float32)})[0] for i in range(len(x))]
        )
        np.testing.assert_allclose(alone, got[0], rtol=1e-5, atol=1e-5)


RNG = np.random.default_rng(7)


def rand(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# ---- tests ---------------------------------------------------------------------------------------


def test_mobilenet_style_graph_with_fused_ops_matches_numpy():
    """Conv2D stride 2 SAME on an odd size, fused BiasAdd+Relu6 depthwise (multiplier 2, dilation 2),
    Prelu fused into a 1x1 convolution, batch norm, a residual add, pooling, global Mean and a
    fused MatMul with the batch kept free through a Reshape."""
    g = TinyTfjs((-1, 11, 11, 3))
    x = g.conv("input", rand(3, 3, 3, 4), stride=2)
    x = g.conv(x, rand(3, 3, 4, 2), depthwise=True, dilation=2, bias=rand(8), act="Relu6")
    y = g.conv(x, rand(1, 1, 8, 8), bias=rand(8), act="Prelu", alpha=rand(8))
    scale, offset, mean, var = rand(8), rand(8), rand(8), np.abs(rand(8)) + 0.5
    bn = g.op(
        "FusedBatchNormV3",
        [y, g.const(scale), g.const(offset), g.const(mean), g.const(var)],
        lambda v, y=y: (g.value(y, v) - mean) / np.sqrt(var + 1e-3) * scale + offset,
        epsilon={"f": 1e-3},
    )
    x = g.binary("AddV2", x, bn)
    x = g.op(
        "MaxPool",
        [x],
        lambda v, x=x: ref_pool(g.value(x, v), 3, 2, "SAME", "max"),
        ksize=_list("i", [1, 3, 3, 1]),
        strides=_list("i", [1, 2, 2, 1]),
        padding=_s("SAME"),
    )
    p = g.op(
        "AvgPool",
        [x],
        lambda v, x=x: ref_pool(g.value(x, v), 2, 2, "SAME", "avg"),
        ksize=_list("i", [1, 2, 2, 1]),
        strides=_list("i", [1, 2, 2, 1]),
        padding=_s("SAME"),
    )
    m = g.reduce("Mean", p, [1, 2], keep=False)
    w, b = rand(8, 5), rand(5)
    fused = {"list": {"s": [base64.b64encode(s.encode()).decode() for s in ("BiasAdd", "Relu")]}}
    out = g.op(
        "_FusedMatMul",
        [m, g.const(w), g.const(b)],
        lambda v: np.maximum(g.value(m, v) @ w + b, 0),
        fused_ops=fused,
        transpose_a={"b": False},
        transpose_b={"b": False},
    )
    flat = g.op(
        "Reshape", [x, g.const(np.array([-1, 8 * 3 * 3], np.int32))], lambda v, x=x: g.value(x, v).reshape(len(v), -1)
    )
    g.check([out, flat, m], rand(3, 11, 11, 3, scale=1.0))


def test_mxnet_style_graph_pads_prelu_and_normalisation_match_numpy():
    """As becauseofAI's MobileFace reads after conversion: (x - 127.5) * 0.0078125 inside the graph,
    explicit Pad before VALID convolutions, PReLU as Maximum/Minimum/Mul/AddV2, a flatten and MatMul,
    then an l2 normalisation (Square, Sum keep_dims, Maximum, Rsqrt, Mul)."""
    g = TinyTfjs((-1, 8, 8, 3))
    x = g.binary("Mul", g.binary("Sub", "input", g.const(np.float32(127.5))), g.const(np.float32(0.0078125)))
    pads = np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32)
    x = g.op("Pad", [x, g.const(pads)], lambda v, x=x: np.pad(g.value(x, v), pads))
    x = g.conv(x, rand(3, 3, 3, 4), stride=2, padding="VALID")
    x = g.mxnet_prelu(x, rand(4))
    x = g.conv(x, rand(3, 3, 4, 1), depthwise=True, padding="EXPLICIT", explicit=[0, 0, 1, 1, 2, 0, 0, 0])
    flat = g.op(
        "Reshape", [x, g.const(np.array([-1, 4 * 4 * 4], np.int32))], lambda v, x=x: g.value(x, v).reshape(len(v), -1)
    )
    w = rand(64, 6)
    e = g.op(
        "MatMul", [flat, g.const(w)], lambda v: g.value(flat, v) @ w, transpose_a={"b": False}, transpose_b={"b": False}
    )
    sq = g.unary("Square", e, np.square)
    s = g.reduce("Sum", sq, [1], keep=True)
    mx = g.binary("Maximum", s, g.const(np.float32(1e-10)))
    r = g.unary("Rsqrt", mx, lambda v: 1 / np.sqrt(v))
    out = g.binary("Mul", e, r)
    g.check([out], RNG.uniform(0, 255, (2, 8, 8, 3)))


def test_axes_reductions_squeeze_concat_and_heads_keep_tf_meaning():
    """Axes given in NHWC (reductions with and without keep_dims, over channels too, Squeeze, ConcatV2
    on channels) mean the same after the switch to NCHW; Softmax and Sigmoid heads; only the
    requested outputs are converted (an unconvertible node elsewhere is ignored)."""
    g = TinyTfjs((-1, 5, 5, 3))
    x = g.conv("input", rand(1, 1, 3, 4))
    keep = g.reduce("Mean", x, [1, 2], keep=True)
    sq = g.op("Squeeze", [keep], lambda v: g.value(keep, v)[:, 0, 0, :], squeeze_dims=_list("i", [1, 2]))
    over_c = g.reduce("Max", x, [3], keep=False)  # (N, H, W): the remaining axes keep their order
    over_hc = g.reduce("Sum", x, [1, -1], keep=False)  # (N, W)
    cat = g.op("ConcatV2", [x, "input", g.const(np.int32(-1))], lambda v: np.concatenate([g.value(x, v), v], axis=-1))
    soft = g.unary("Softmax", sq, lambda v: np.exp(v) / np.exp(v).sum(-1, keepdims=True))
    sig = g.unary("Sigmoid", over_hc, lambda v: 1 / (1 + np.exp(-v)))
    g.op("Unique", [x], None)
    g.check([soft, over_c, sig, cat], rand(3, 5, 5, 3, scale=1.0))


@pytest.mark.parametrize("kind", ["float16", "uint8"])
def test_quantised_weights_are_read_as_the_manifest_says(kind):
    g = TinyTfjs((-1, 6, 6, 3))
    w = rand(3, 3, 3, 4)
    out = g.conv("input", w, bias=rand(4), act="Relu")
    name = next(n for n, a in g.weights.items() if a.shape == w.shape)
    model, files = g.model_json(shards=3, quantise={name: kind})
    weights = read_weights(model["weightsManifest"], files.__getitem__, "tiny")
    want = w.astype(np.float16).astype(np.float32) if kind == "float16" else g.weights[name]
    assert weights[name].dtype == np.float32
    np.testing.assert_allclose(weights[name], want, atol=1e-6)
    if kind == "uint8":  # a dequantised weight is off by at most half a step
        assert np.abs(weights[name] - w).max() <= (w.max() - w.min()) / 255 / 2 + 1e-6
    g.check([out], rand(2, 6, 6, 3, scale=1.0), shards=3, quantise={name: kind})


def test_refuses_what_it_does_not_convert():
    g = TinyTfjs((-1, 4, 4, 3))
    x = g.op("Unique", ["input"], None)
    model, files = g.model_json()
    parsed, weights = load_tfjs(json.dumps(model), files.__getitem__, "tiny")
    with pytest.raises(TfjsConversionError, match="Unique, which this converter does not handle"):
        convert_tfjs(parsed, weights, [x])

    g = TinyTfjs((-1, 4, 4, 3))
    x = g.op("Reshape", ["input", g.const(np.array([2, 48], np.int32))], None)
    parsed, weights = load_tfjs(json.dumps(g.model_json()[0]), g.model_json()[1].__getitem__, "tiny")
    with pytest.raises(TfjsConversionError, match="fixes the batch"):
        convert_tfjs(parsed, weights, [x])

    g = TinyTfjs((-1, 4, 4, 3))
    x = g.conv("input", rand(1, 1, 3, 2))
    g.nodes[-1]["attr"]["data_format"] = _s("NCHW")
    model, files = g.model_json()
    with pytest.raises(TfjsConversionError, match="NCHW"):
        convert_tfjs(*load_tfjs(json.dumps(model), files.__getitem__), [x])

    model, files = g.model_json(shards=2)
    files["group1-shard2of2.bin"] = files["group1-shard2of2.bin"][:-4]
    with pytest.raises(TfjsConversionError, match="truncated or missing"):
        load_tfjs(json.dumps(model), files.__getitem__, "tiny")
    with pytest.raises(TfjsConversionError, match="not a TF.js graph model"):
        load_tfjs(b'{"format": "layers-model"}', files.__getitem__)
