"""Run a TF.js graph model in TensorFlow itself and compare it with our ONNX conversion's outputs.

The check behind engines/tfjs_convert.py on real models (docs/models.md). TensorFlow is not a project
dependency: run this in a throwaway virtual environment that has it (`pip install tensorflow-cpu`).
model.json's topology is a TensorFlow GraphDef written as JSON; it is read back into one, the weights
(read by engines.tfjs_convert.read_weights, which needs only numpy) are put into its Const nodes, and
the TF.js converter's fused ops are written out as TensorFlow's own (FusedDepthwiseConv2dNative exists
only in TF.js): the convolution or MatMul, then BiasAdd, then the activation. The inputs and our
outputs come in an .npz (`x`, `onnx`), made in the project's environment.

Example:
    /tmp/tf/bin/python tests/tfjs_reference.py package/models/faceres.json global_pooling/Mean /tmp/faceres.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.tfjs_convert import read_weights

_CORE = {"FusedDepthwiseConv2dNative": "DepthwiseConv2dNative", "_FusedConv2D": "Conv2D", "_FusedMatMul": "MatMul"}
_NOT_MATMUL = ("explicit_paddings", "use_cudnn_on_gpu", "padding", "strides", "dilations", "data_format")


def tf_graph(model_json: Path):
    """A TensorFlow GraphDef of the TF.js model, weights inlined, fused ops written out."""
    import tensorflow as tf
    from google.protobuf import json_format

    model = json.loads(model_json.read_text())
    weights = read_weights(model["weightsManifest"], lambda p: (model_json.parent / p).read_bytes(), str(model_json))
    topo = {k: v for k, v in model["modelTopology"].items() if k == "node"}
    graph = json_format.ParseDict(topo, tf.compat.v1.GraphDef())
    out = tf.compat.v1.GraphDef()

    def add(name: str, op: str, inputs: list[str], like) -> None:
        n = out.node.add()
        n.name, n.op = name, op
        n.input.extend(inputs)
        n.attr["T"].type = like.attr["T"].type

    for n in graph.node:
        if n.op == "Const" and n.name in weights:
            n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(weights[n.name]))
            n.attr["dtype"].type = tf.as_dtype(weights[n.name].dtype).as_datatype_enum
        if n.op not in _CORE:
            out.node.add().CopyFrom(n)
            continue
        fused = [s.decode() for s in n.attr["fused_ops"].list.s]
        ins = list(n.input)
        core = out.node.add()
        core.CopyFrom(n)
        core.name, core.op = f"{n.name}/core", _CORE[n.op]
        del core.input[:]
        core.input.extend(ins[:2])
        drop = ("fused_ops", "num_args", "epsilon", "leakyrelu_alpha")
        drop += _NOT_MATMUL if core.op == "MatMul" else ("use_cudnn_on_gpu",) if "Depthwise" in core.op else ()
        for k in drop:
            if k in core.attr:
                del core.attr[k]
        last, extra = core.name, ins[2:]
        for i, f in enumerate(fused):
            name = n.name if i == len(fused) - 1 else f"{n.name}/{f}"
            if f == "BiasAdd":
                add(name, "BiasAdd", [last, extra.pop(0)], n)
            elif f == "Prelu":  # relu(x) + alpha * min(x, 0)
                zero = out.node.add()
                zero.name, zero.op = f"{name}/zero", "Const"
                zero.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.float32(0)))
                zero.attr["dtype"].type = tf.float32.as_datatype_enum
                add(f"{name}/neg", "Minimum", [last, zero.name], n)
                add(f"{name}/mul", "Mul", [extra.pop(0), f"{name}/neg"], n)
                add(f"{name}/pos", "Relu", [last], n)
                add(name, "AddV2", [f"{name}/pos", f"{name}/mul"], n)
            else:
                add(name, f, [last], n)
            last = name
    return out


def run(model_json: Path, output: str, x: np.ndarray) -> np.ndarray:
    """The TF.js model's `output` (a node name) on NHWC input `x`, computed by TensorFlow."""
    import tensorflow as tf

    graph_def = tf_graph(model_json)
    (inp,) = [n.name for n in graph_def.node if n.op == "Placeholder"]
    with tf.Graph().as_default() as g:
        tf.graph_util.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as s:
            return s.run(f"{output.split(':')[0]}:0", {f"{inp}:0": x})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_json", type=Path, help="the TF.js model.json (its shards beside it)")
    ap.add_argument("output", help="the output node, as given to the converter")
    ap.add_argument("npz", type=Path, help="arrays x (the model's input) and onnx (our conversion's output on x)")
    args = ap.parse_args(argv)
    d = np.load(args.npz)
    ref, ours = run(args.model_json, args.output, d["x"]), d["onnx"]
    cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    print(
        f"{len(ref)} inputs: largest difference {np.abs(ref - ours).max():.3g} on values up to "
        f"{np.abs(ref).max():.3g}; lowest cosine similarity {cos.min():.7f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
