"""The TFLite -> ONNX converter, on tiny TFLite models written here with the flatbuffers builder and
checked against a plain numpy implementation of TFLite's ops."""

from __future__ import annotations

import importlib

import flatbuffers
import numpy as np
import pytest
import tflite
from tflite.ActivationFunctionType import ActivationFunctionType as Act
from tflite.BuiltinOperator import BuiltinOperator as Op
from tflite.BuiltinOptions import BuiltinOptions as Opts
from tflite.Padding import Padding

from engines.tflite_convert import TfliteConversionError, convert_tflite


def _schema(name: str):
    """A generated schema module (its builder functions); `tflite.X` itself is the reader class."""
    return importlib.import_module(f"tflite.{name}")


B, M, T, SG, OC, O = (_schema(n) for n in ("Buffer", "Model", "Tensor", "SubGraph", "OperatorCode", "Operator"))  # noqa: E741
CONV, DW, RESHAPE = (_schema(n) for n in ("Conv2DOptions", "DepthwiseConv2DOptions", "ReshapeOptions"))
ADD, SUB, MUL = (_schema(n) for n in ("AddOptions", "SubOptions", "MulOptions"))


# ---- writing TFLite flatbuffers ------------------------------------------------------------------


class TinyTflite:
    """A TFLite model built op by op; `evaluate` runs the same ops in numpy (the reference)."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        self.tensors: list[dict] = []
        self.ops: list[dict] = []
        self.input = self.tensor(input_shape, name="input")
        self.outputs: list[int] = []

    def tensor(self, shape, data: np.ndarray | None = None, name: str = "", dtype: int = tflite.TensorType.FLOAT32):
        self.tensors.append(
            {"shape": list(shape), "data": data, "name": name or f"t{len(self.tensors)}", "type": dtype}
        )
        return len(self.tensors) - 1

    def const(self, arr: np.ndarray) -> int:
        arr = np.asarray(arr)
        kind = tflite.TensorType.INT32 if arr.dtype == np.int32 else tflite.TensorType.FLOAT32
        return self.tensor(arr.shape, arr, dtype=kind)

    def op(self, code: int, inputs: list[int], out_shape, options: tuple | None = None) -> int:
        out = self.tensor(out_shape)
        self.ops.append({"code": code, "inputs": inputs, "output": out, "options": options})
        return out

    # Layers -------------------------------------------------------------------------------------

    def conv(self, x, w, b, stride=1, padding=Padding.SAME, act=Act.NONE, dilation=1, depthwise=False) -> int:
        n, h, wd, c = self.tensors[x]["shape"]
        k = w.shape[1]
        eff = (k - 1) * dilation + 1
        oh, ow = (
            (-(-h // stride), -(-wd // stride))
            if padding == Padding.SAME
            else ((h - eff) // stride + 1, (wd - eff) // stride + 1)
        )
        out_c = w.shape[3] if depthwise else w.shape[0]
        inputs = [x, self.const(w.astype(np.float32)), self.const(b.astype(np.float32))]
        kind = (
            ("dw", padding, stride, act, dilation, w.shape[3] // c)
            if depthwise
            else ("conv", padding, stride, act, dilation)
        )
        return self.op(Op.DEPTHWISE_CONV_2D if depthwise else Op.CONV_2D, inputs, (n, oh, ow, out_c), kind)

    def binary(self, code: int, a: int, b: int, act=Act.NONE) -> int:
        sa, sb = self.tensors[a]["shape"], self.tensors[b]["shape"]
        shape = np.broadcast_shapes(tuple(sa), tuple(sb))
        return self.op(code, [a, b], shape, ("act", act))

    def unary(self, code: int, x: int) -> int:
        return self.op(code, [x], self.tensors[x]["shape"])

    def prelu(self, x: int, alpha: np.ndarray) -> int:
        """PReLU as TOCO writes it in MobileFaceNet.tflite: relu(x) + alpha * (x - |x|) * 0.5."""
        pos = self.unary(Op.RELU, x)
        neg = self.binary(Op.SUB, x, self.unary(Op.ABS, x))
        return self.binary(Op.ADD, pos, self.binary(Op.MUL, self.const((alpha * 0.5).astype(np.float32)), neg))

    def reshape(self, x: int, shape: list[int]) -> int:
        return self.op(Op.RESHAPE, [x, self.const(np.array(shape, np.int32))], shape, ("reshape", shape))

    # Numpy reference ----------------------------------------------------------------------------

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        values = {self.input: x.astype(np.float64)}

        def get(i):
            return values[i] if i in values else self.tensors[i]["data"].astype(np.float64)

        for op in self.ops:
            ins = op["inputs"]
            code, opts = op["code"], op["options"]
            if code in (Op.CONV_2D, Op.DEPTHWISE_CONV_2D):
                w = get(ins[1])
                y = ref_conv(
                    get(ins[0]), w, get(ins[2]), opts[2], opts[1], opts[4], depthwise=code == Op.DEPTHWISE_CONV_2D
                )
                y = ref_act(y, opts[3])
            elif code in (Op.ADD, Op.SUB, Op.MUL):
                a, b = get(ins[0]), get(ins[1])
                y = ref_act({Op.ADD: a + b, Op.SUB: a - b, Op.MUL: a * b}[code], opts[1])
            elif code == Op.RELU:
                y = np.maximum(get(ins[0]), 0)
            elif code == Op.ABS:
                y = np.abs(get(ins[0]))
            elif code == Op.RESHAPE:
                y = get(ins[0]).reshape(opts[1])
            else:
                raise NotImplementedError(code)
            values[op["output"]] = y
        return values[self.outputs[0]]

    # Serialisation ------------------------------------------------------------------------------

    def build(self) -> bytes:
        b = flatbuffers.Builder(1024)

        def ivec(values):
            return b.CreateNumpyVector(np.asarray(values, np.int32))

        def tables(start, offsets):
            start(b, len(offsets))
            for off in reversed(offsets):
                b.PrependUOffsetTRelative(off)
            return b.EndVector()

        buffers = []
        B.BufferStart(b)
        buffers.append(B.BufferEnd(b))  # buffer 0: empty, by convention
        tensors = []
        for t in self.tensors:
            buf_index = 0
            if t["data"] is not None:
                data = b.CreateNumpyVector(np.frombuffer(np.ascontiguousarray(t["data"]).tobytes(), np.uint8))
                B.BufferStart(b)
                B.BufferAddData(b, data)
                buffers.append(B.BufferEnd(b))
                buf_index = len(buffers) - 1
            name = b.CreateString(t["name"])
            shape = ivec(t["shape"])
            T.TensorStart(b)
            T.TensorAddShape(b, shape)
            T.TensorAddType(b, t["type"])
            T.TensorAddBuffer(b, buf_index)
            T.TensorAddName(b, name)
            tensors.append(T.TensorEnd(b))
        codes = sorted({op["code"] for op in self.ops})
        operators = []
        for op in self.ops:
            kind, table = self._options(b, op)
            inputs, outputs = ivec(op["inputs"]), ivec([op["output"]])
            O.OperatorStart(b)
            O.OperatorAddOpcodeIndex(b, codes.index(op["code"]))
            O.OperatorAddInputs(b, inputs)
            O.OperatorAddOutputs(b, outputs)
            if table is not None:
                O.OperatorAddBuiltinOptionsType(b, kind)
                O.OperatorAddBuiltinOptions(b, table)
            operators.append(O.OperatorEnd(b))
        code_tables = []
        for code in codes:
            OC.OperatorCodeStart(b)
            OC.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            OC.OperatorCodeAddBuiltinCode(b, code)
            OC.OperatorCodeAddVersion(b, 1)
            code_tables.append(OC.OperatorCodeEnd(b))
        t_vec = tables(SG.SubGraphStartTensorsVector, tensors)
        o_vec = tables(SG.SubGraphStartOperatorsVector, operators)
        in_vec, out_vec = ivec([self.input]), ivec(self.outputs)
        SG.SubGraphStart(b)
        SG.SubGraphAddTensors(b, t_vec)
        SG.SubGraphAddInputs(b, in_vec)
        SG.SubGraphAddOutputs(b, out_vec)
        SG.SubGraphAddOperators(b, o_vec)
        subgraph = SG.SubGraphEnd(b)
        sg_vec = tables(M.ModelStartSubgraphsVector, [subgraph])
        oc_vec = tables(M.ModelStartOperatorCodesVector, code_tables)
        buf_vec = tables(M.ModelStartBuffersVector, buffers)
        desc = b.CreateString("checkpoint test model")
        M.ModelStart(b)
        M.ModelAddVersion(b, 3)
        M.ModelAddOperatorCodes(b, oc_vec)
        M.ModelAddSubgraphs(b, sg_vec)
        M.ModelAddDescription(b, desc)
        M.ModelAddBuffers(b, buf_vec)
        b.Finish(M.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    @staticmethod
    def _options(b: flatbuffers.Builder, op: dict) -> tuple[int, int | None]:
        opts = op["options"]
        if opts is None:
            return 0, None
        if opts[0] == "conv":
            _, padding, stride, act, dilation = opts
            CONV.Conv2DOptionsStart(b)
            CONV.Conv2DOptionsAddPadding(b, padding)
            CONV.Conv2DOptionsAddStrideW(b, stride)
            CONV.Conv2DOptionsAddStrideH(b, stride)
            CONV.Conv2DOptionsAddFusedActivationFunction(b, act)
            CONV.Conv2DOptionsAddDilationWFactor(b, dilation)
            CONV.Conv2DOptionsAddDilationHFactor(b, dilation)
            return Opts.Conv2DOptions, CONV.Conv2DOptionsEnd(b)
        if opts[0] == "dw":
            _, padding, stride, act, dilation, multiplier = opts
            DW.DepthwiseConv2DOptionsStart(b)
            DW.DepthwiseConv2DOptionsAddPadding(b, padding)
            DW.DepthwiseConv2DOptionsAddStrideW(b, stride)
            DW.DepthwiseConv2DOptionsAddStrideH(b, stride)
            DW.DepthwiseConv2DOptionsAddDepthMultiplier(b, multiplier)
            DW.DepthwiseConv2DOptionsAddFusedActivationFunction(b, act)
            DW.DepthwiseConv2DOptionsAddDilationWFactor(b, dilation)
            DW.DepthwiseConv2DOptionsAddDilationHFactor(b, dilation)
            return Opts.DepthwiseConv2DOptions, DW.DepthwiseConv2DOptionsEnd(b)
        if opts[0] == "act":
            mod, name, kind = {
                Op.ADD: (ADD, "AddOptions", Opts.AddOptions),
                Op.SUB: (SUB, "SubOptions", Opts.SubOptions),
                Op.MUL: (MUL, "MulOptions", Opts.MulOptions),
            }[op["code"]]
            getattr(mod, f"{name}Start")(b)
            getattr(mod, f"{name}AddFusedActivationFunction")(b, opts[1])
            return kind, getattr(mod, f"{name}End")(b)
        shape = b.CreateNumpyVector(np.asarray(opts[1], np.int32))
        RESHAPE.ReshapeOptionsStart(b)
        RESHAPE.ReshapeOptionsAddNewShape(b, shape)
        return Opts.ReshapeOptions, RESHAPE.ReshapeOptionsEnd(b)


def ref_conv(x, w, b, stride, padding, dilation, depthwise):
    """TFLite's CONV_2D / DEPTHWISE_CONV_2D on NHWC, written out: SAME pads ceil(in / stride) outputs,
    the odd pixel of padding at the end (bottom, right)."""
    n, h, wd, c = x.shape
    kh, kw = w.shape[1], w.shape[2]
    eh, ew = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
    if padding == Padding.SAME:
        oh, ow = -(-h // stride), -(-wd // stride)
        ph, pw = max((oh - 1) * stride + eh - h, 0), max((ow - 1) * stride + ew - wd, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (h - eh) // stride + 1, (wd - ew) // stride + 1
    out_c = w.shape[3] if depthwise else w.shape[0]
    y = np.zeros((n, oh, ow, out_c))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dilation : i * dilation + (oh - 1) * stride + 1 : stride, j * dilation :][
                :, :, : (ow - 1) * stride + 1 : stride
            ]
            if depthwise:
                # Output channel c * multiplier + m reads input channel c.
                y += np.repeat(patch, out_c // c, axis=3) * w[0, i, j]
            else:
                y += patch @ w[:, i, j, :].T
    return y + b


def ref_act(y, act):
    return {
        Act.NONE: y,
        Act.RELU: np.maximum(y, 0),
        Act.RELU6: np.clip(y, 0, 6),
        Act.RELU_N1_TO_1: np.clip(y, -1, 1),
    }[act]


def tiny_mobilefacenet(batch: int = 2, rng=None) -> TinyTflite:
    """MobileFaceNet's ops in miniature: a stride-2 SAME conv on an odd size, TOCO's PReLU, a depthwise
    conv with a multiplier and dilation, a residual ADD, 1x1 convs, a global depthwise conv (VALID),
    the fused activations, and the batch-fixing RESHAPE."""
    rng = rng or np.random.default_rng(0)

    def r(*shape):
        return rng.normal(0, 0.5, shape).astype(np.float32)

    m = TinyTflite((batch, 9, 9, 3))
    x = m.conv(m.input, r(8, 3, 3, 3), r(8), stride=2, act=Act.RELU)  # 9 -> 5, pads 1 / 1
    x = m.prelu(x, r(8))
    y = m.conv(x, r(1, 3, 3, 16), r(16), depthwise=True, dilation=2)  # multiplier 2
    y = m.prelu(y, r(16))
    y = m.conv(y, r(8, 1, 1, 16), r(8), padding=Padding.VALID)
    x = m.binary(Op.ADD, x, y, act=Act.RELU_N1_TO_1)  # residual
    x = m.conv(x, r(8, 2, 2, 8), r(8), stride=2, act=Act.RELU6)  # 5 -> 3, pads 0 / 1
    x = m.conv(x, r(1, 3, 3, 8), r(8), padding=Padding.VALID, depthwise=True)  # global: 3 -> 1
    x = m.conv(x, r(6, 1, 1, 8), r(6), padding=Padding.VALID)
    m.outputs = [m.reshape(x, [batch, 6])]
    return m


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# ---- tests ---------------------------------------------------------------------------------------


def test_tiny_mobilefacenet_matches_the_numpy_reference():
    tiny = tiny_mobilefacenet()
    model = convert_tflite(tiny.build(), "tiny.tflite")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 9, 9, 3)).astype(np.float32)
    want = tiny.evaluate(x)
    got = run_onnx(model, x)
    assert got.shape == (2, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The reference is not trivially zero or saturated, so the comparison means something.
    assert np.abs(want).max() > 0.1 and len(np.unique(np.round(want, 4))) > 6


def test_the_batch_is_freed():
    """The source fixes the batch at 2 (input and RESHAPE); the ONNX model takes any batch, each face
    getting what it gets alone."""
    tiny = tiny_mobilefacenet(batch=2)
    model = convert_tflite(tiny.build())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [9, 9, 3]
    x = np.random.default_rng(2).uniform(-1, 1, (5, 9, 9, 3)).astype(np.float32)
    together = run_onnx(model, x)
    assert together.shape == (5, 6)
    alone = np.concatenate([run_onnx(model, x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(together[:2], tiny.evaluate(x[:2]), rtol=1e-5, atol=1e-5)


def test_a_conv_output_is_given_back_in_tflites_layout():
    """A 4-d graph output computed in NCHW is transposed back to NHWC, as TFLite returns it."""
    m = TinyTflite((1, 6, 7, 2))
    m.outputs = [m.conv(m.input, np.ones((3, 3, 3, 2), np.float32), np.arange(3.0), stride=2)]
    x = np.random.default_rng(3).uniform(-1, 1, (1, 6, 7, 2)).astype(np.float32)
    got = run_onnx(convert_tflite(m.build()), x)
    assert got.shape == (1, 3, 4, 3)
    np.testing.assert_allclose(got, m.evaluate(x), rtol=1e-5, atol=1e-5)


def test_an_unsupported_op_is_refused_by_name():
    m = TinyTflite((1, 4, 4, 2))
    m.outputs = [m.op(Op.SOFTMAX, [m.input], (1, 4, 4, 2))]
    with pytest.raises(TfliteConversionError, match="SOFTMAX"):
        convert_tflite(m.build(), "soft.tflite")


def test_an_unsupported_fused_activation_is_refused():
    m = TinyTflite((1, 4, 4, 2))
    m.outputs = [m.conv(m.input, np.ones((2, 1, 1, 2), np.float32), np.zeros(2), act=Act.TANH)]
    with pytest.raises(TfliteConversionError, match="TANH"):
        convert_tflite(m.build())


def test_a_quantised_model_is_refused():
    m = TinyTflite((1, 4, 4, 2))
    m.tensors[m.input]["type"] = tflite.TensorType.UINT8
    m.outputs = [m.unary(Op.RELU, m.input)]
    with pytest.raises(TfliteConversionError, match="UINT8.*float32"):
        convert_tflite(m.build())


def test_a_reshape_across_the_batch_is_refused():
    m = TinyTflite((2, 1, 1, 4))
    m.outputs = [m.reshape(m.input, [1, 8])]
    with pytest.raises(TfliteConversionError, match="batch"):
        convert_tflite(m.build())


def test_not_a_tflite_file():
    with pytest.raises(TfliteConversionError, match="not a TFLite model"):
        convert_tflite(b"\x00" * 64, "junk.bin")
