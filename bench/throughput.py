"""Faces per second on this CPU: our detection, alignment and embedding (batch 1, 8, 32; float32 and int8)
against the face_recognition package on the same images in the same run, and what fraction of
the CPU's measured peak the embedder uses.

Peak: the best of 15 runs of a float32 matrix product (2048 x 2048, numpy's BLAS and ONNX Runtime's MatMul)
timed on this machine with one thread and with every core; int8 peak the same with ONNX
Runtime's MatMulInteger (uint8 x int8). Work per face: multiply-adds of every Conv and MatMul in
the embedder's ONNX graph at batch 1, times two (GFLOP per face). Used fraction = GFLOP per face x
faces/s / peak of all cores (the embedder runs on all of them).

Images: lag-dev photos (margin added) when the evaluation data is present, else the public-domain
astronaut photo shipped with scikit-image, at several scales.

Example:
    python bench/throughput.py --json out/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, list_photos
from bench.machine import describe_machine, machine_summary


def _images(n: int) -> tuple[list[np.ndarray], str]:
    import cv2

    from engines.image import load_image

    if DEFAULT_DATA.is_dir():
        photos = list_photos(DEFAULT_DATA)[:: max(1, len(list_photos(DEFAULT_DATA)) // n)][:n]
        imgs = [cv2.copyMakeBorder(load_image(p.path), 30, 30, 30, 30, cv2.BORDER_REFLECT_101) for p in photos]
        return imgs, f"{len(imgs)} lag-dev photos with a 30 px margin (160x160)"
    from skimage import data

    base = data.astronaut()
    imgs = [cv2.resize(base, None, fx=s, fy=s) for s in np.linspace(0.4, 1.0, n)]
    return imgs, f"{n} scaled copies of skimage's astronaut photo"


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def gflop_per_face(onnx_path: Path) -> float:
    """2 x multiply-adds of every Conv and MatMul/Gemm of a model at batch 1, in GFLOP."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(onnx_path))
    for inp in model.graph.input:
        dim = inp.type.tensor_type.shape.dim
        if dim and not dim[0].HasField("dim_value"):
            dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            w = weights[node.input[1]]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            out = shapes[node.output[0]]
            w = weights.get(node.input[1]) or shapes[node.input[1]]
            k = (
                w[0]
                if node.op_type == "MatMul" or not any(a.name == "transB" and a.i for a in node.attribute)
                else w[1]
            )
            macs += int(np.prod(out)) * int(k)
    return 2 * macs / 1e9


def _ort_matmul_session(threads: int, integer: bool, n: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if integer:
        b = numpy_helper.from_array(rng.integers(-100, 100, (n, n), dtype=np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["C"])
        a_type, c_type = TensorProto.UINT8, TensorProto.INT32
    else:
        b = numpy_helper.from_array(rng.normal(size=(n, n)).astype(np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["C"])
        a_type = c_type = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "peak",
        [helper.make_tensor_value_info("A", a_type, [n, n])],
        [helper.make_tensor_value_info("C", c_type, [n, n])],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 255, (n, n), dtype=np.uint8) if integer else rng.normal(size=(n, n)).astype(np.float32)
    return lambda: session.run(None, {"A": a})


def _best_gflops(run, flop: float, repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return flop / best / 1e9


def _numpy_sgemm_gflops(threads: int, n: int, repeats: int) -> float:
    """numpy's float32 matrix product in a child process, whose BLAS thread count is set at start."""
    code = (
        "import time, numpy as np\n"
        f"a = np.random.default_rng(0).normal(size=({n}, {n})).astype(np.float32)\n"
        "a @ a\n"
        "best = float('inf')\n"
        f"for _ in range({repeats}):\n"
        "    t0 = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t0)\n"
        "print(best)\n"
    )
    env = dict(os.environ, **{v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return 2.0 * n**3 / float(out.stdout.strip()) / 1e9


def measure_peak(threads: int, n: int = 2048, repeats: int = 15) -> dict:
    """Best float32 and int8 matrix-product rates (GFLOP/s, GOP/s) on `threads` threads."""
    flop = 2.0 * n**3
    rates = {
        "onnxruntime_matmul_fp32": _best_gflops(_ort_matmul_session(threads, False, n), flop, repeats),
        "numpy_sgemm": _numpy_sgemm_gflops(threads, n, repeats),
    }
    int8 = _best_gflops(_ort_matmul_session(threads, True, n), flop, repeats)
    return {"threads": threads, "fp32_gflops": max(rates.values()), "int8_gops": int8, "measured": rates}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--images", type=int, default=96, help="number of images")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 embedder")
    ap.add_argument("--no-peak", action="store_true", help="skip measuring the CPU's peak")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="embedder threads (0: ONNX Runtime chooses, all cores); 1 is steadier on a shared machine",
    )
    args = ap.parse_args(argv)

    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine

    images, source = _images(args.images)
    # dlib's ResNet alone, whatever the default model is: the peer's face_encodings runs the same network.
    dlib = ("dlib-resnet-v1",)
    engine = FaceEngine.load(EngineConfig(ensemble=dlib, threads=args.threads))
    # Warm up so one-off initialisation is not timed.
    engine.analyze(images[0])
    embedders = {"float32": engine}
    if not args.no_int8:
        embedders["int8"] = FaceEngine.load(EngineConfig(ensemble=dlib, precision="int8", threads=args.threads))

    t0 = time.perf_counter()
    items = []
    for img in images:
        dets = engine.detect(img)
        items += [(img, d) for d in dets[:1]]
    det_s = time.perf_counter() - t0
    res: dict = {
        "machine": {
            **describe_machine(),
            "load_average_before": os.getloadavg(),
        },
        "images": source,
        "model_id": engine.model_id,
        "backend": engine.embedder.backend.name,
        "embedder_threads": args.threads or "all",
        "detection": {"images_per_s": _rate(len(images), det_s), "faces_found": len(items)},
        "embedding": {},
    }
    faces = items * max(1, 64 // max(1, len(items)))
    faces = faces[: max(64, len(items))]
    # Chips aligned once, for the embedder alone: alignment (landmarks, chip) is the same for both.
    chips = np.concatenate([engine.align(img, [d]) for img, d in faces])
    # Alignment alone (landmarks and chip, FaceEngine.align_many), per face, one face per call and 32 per call.
    res["alignment_ms_per_face"] = {}
    for batch in (1, 32):
        t0 = time.perf_counter()
        for start in range(0, len(faces), batch):
            engine.align_many(faces[start : start + batch])
        res["alignment_ms_per_face"][f"batch_{batch}"] = 1000 * (time.perf_counter() - t0) / len(faces)
    res["embedder_only"] = {}
    for name, eng in embedders.items():
        eng.embed(faces[:8])  # warm-up
        for batch in (1, 8, 32):
            key = f"batch_{batch}" if name == "float32" else f"{name}_batch_{batch}"
            t0 = time.perf_counter()
            for start in range(0, len(faces), batch):
                eng.embed(faces[start : start + batch])
            dt = time.perf_counter() - t0
            res["embedding"][key] = {"faces_per_s": _rate(len(faces), dt), "faces": len(faces)}
            t0 = time.perf_counter()
            for start in range(0, len(chips), batch):
                eng.embedder.embed_chips(chips[start : start + batch])
            dt = time.perf_counter() - t0
            res["embedder_only"][key] = {"faces_per_s": _rate(len(chips), dt), "faces": len(chips)}

    if not args.no_peer:
        try:
            import face_recognition
        except ImportError:
            face_recognition = None
            print("face_recognition not installed: peer skipped")
        if face_recognition is not None:
            t0 = time.perf_counter()
            locs = [face_recognition.face_locations(img, model="hog") for img in images]
            peer_det = time.perf_counter() - t0
            # The peer embeds the same faces our detector found (same boxes), one call per face as its API does.
            boxes = [(img, (int(d.box[1]), int(d.box[2]), int(d.box[3]), int(d.box[0]))) for img, d in faces]
            t0 = time.perf_counter()
            for img, box in boxes:
                face_recognition.face_encodings(img, known_face_locations=[box], model="small")
            peer_emb = time.perf_counter() - t0
            res["peer_face_recognition"] = {
                "detection": {"images_per_s": _rate(len(images), peer_det), "faces_found": sum(1 for lc in locs if lc)},
                "embedding": {"faces_per_s": _rate(len(boxes), peer_emb), "faces": len(boxes)},
            }
            peer_rate = res["peer_face_recognition"]["embedding"]["faces_per_s"]
            best = max(v["faces_per_s"] for k, v in res["embedding"].items() if k.startswith("batch_"))
            res["embed_ratio_vs_peer"] = best / peer_rate
            if "int8_batch_32" in res["embedding"]:
                res["int8_embed_ratio_vs_peer"] = res["embedding"]["int8_batch_32"]["faces_per_s"] / peer_rate
            # The embedder alone against the peer's whole face_encodings call (which also aligns).
            res["embedder_only_ratio_vs_peer"] = {
                k: v["faces_per_s"] / peer_rate for k, v in res["embedder_only"].items() if k.endswith("_32")
            }
            res["detect_ratio_vs_peer"] = (
                res["detection"]["images_per_s"] / res["peer_face_recognition"]["detection"]["images_per_s"]
            )

    if not args.no_peak:
        from engines.cache import ensure_default_models

        gflop = gflop_per_face(ensure_default_models().embedder)
        peak = {"one_thread": measure_peak(1), "all_cores": measure_peak(os.cpu_count() or 1)}
        res["peak"] = {"gflop_per_face": gflop, **peak}
        # Against the peak of the threads the embedder ran on.
        top = peak["one_thread"] if args.threads == 1 else peak["all_cores"]
        for key, row in res["embedder_only"].items():
            achieved = gflop * row["faces_per_s"]
            row["gflops"] = achieved
            row["fraction_of_fp32_peak"] = achieved / top["fp32_gflops"]
            if key.startswith("int8"):
                row["fraction_of_int8_peak"] = achieved / top["int8_gops"]
    res["machine"]["load_average_after"] = os.getloadavg()

    print("\n" + machine_summary(res["machine"]))
    print(f"{source}; backend {res['backend']}; load average {res['machine']['load_average_before'][0]:.2f}")
    print(f"{'what':<34}{'ours':>12}{'face_recognition':>18}{'GFLOP/s':>10}{'of peak':>9}")
    peer = res.get("peer_face_recognition")
    print(
        f"{'detection images/s':<34}{res['detection']['images_per_s']:>12.1f}"
        f"{(peer['detection']['images_per_s'] if peer else float('nan')):>18.1f}"
    )
    for key, row in res["embedding"].items():
        label = "align+embed faces/s, " + key.replace("_batch_", " batch ").replace("batch_", "batch ")
        p = peer["embedding"]["faces_per_s"] if peer and key == "batch_1" else float("nan")
        print(f"{label:<34}{row['faces_per_s']:>12.1f}{p:>18.1f}")
    for key, ms in res["alignment_ms_per_face"].items():
        print(f"{'alignment ms/face, ' + key.replace('_', ' '):<34}{ms:>12.2f}")
    for key, row in res["embedder_only"].items():
        label = "embedder faces/s, " + key.replace("_batch_", " batch ").replace("batch_", "batch ")
        frac = row.get("fraction_of_int8_peak", row.get("fraction_of_fp32_peak", float("nan")))
        print(f"{label:<34}{row['faces_per_s']:>12.1f}{'':>18}{row.get('gflops', float('nan')):>10.1f}{frac:>9.1%}")
    if "peak" in res:
        pk = res["peak"]
        print(
            f"peak, all {pk['all_cores']['threads']} cores: float32 {pk['all_cores']['fp32_gflops']:.0f} GFLOP/s, "
            f"int8 {pk['all_cores']['int8_gops']:.0f} GOP/s; one thread: {pk['one_thread']['fp32_gflops']:.0f} / "
            f"{pk['one_thread']['int8_gops']:.0f}; embedder {pk['gflop_per_face']:.3f} GFLOP per face "
            f"(fraction of the {'one-thread' if args.threads == 1 else 'all-core'} peak; int8 rows: of the int8 peak)"
        )
    for key in ("embed_ratio_vs_peer", "int8_embed_ratio_vs_peer"):
        if key in res:
            print(f"{key} = {res[key]:.1f}x")
    for key, ratio in res.get("embedder_only_ratio_vs_peer", {}).items():
        print(f"embedder only, {key} vs peer = {ratio:.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
