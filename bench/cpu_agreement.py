"""Do two CPUs give the same answers? Detections and embeddings of the same photos, compared.

The accuracy figures (bench/accuracy.py, openset.py, int8_accuracy.py) take hours under an
emulator, so they are measured on one machine; they hold on another CPU as far as the engine's
answers agree there. This measures that agreement: run it once on one CPU with --out, then on the
other (or under `qemu-x86_64 -cpu Haswell`, an AVX2 CPU without AVX-512) with --against:

    python bench/cpu_agreement.py --limit 60 --out /tmp/native.npz
    qemu-x86_64 -cpu Haswell .venv/bin/python bench/cpu_agreement.py --limit 60 \\
        --against /tmp/native.npz --json bench/results/cpu_agreement.json

Photos: the first --limit identities of ../shared/data/lag-dev (one adult and one young photo
each; --data DIR), or scikit-image's public-domain photos when the data is absent. Each photo's
central face is detected (margins as bench/accuracy.py) and embedded by the float32 and the int8
embedder (`--precisions`). Reported against the other run: photos found on one CPU and not the
other, the largest box and landmark difference in pixels, chips identical, the lowest cosine
between the two CPUs' embeddings per precision, whether each photo's nearest other photo is the
same, and the network alone: this CPU's embeddings of the other run's very chips against the other
run's, bit for bit (an int8 network whose integer sums are exact gives identical ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, list_photos
from bench.machine import describe_machine, machine_summary


def photos(data: Path, limit: int) -> list[tuple[str, np.ndarray]]:
    """(name, RGB image) of the photos to compare: lag-dev's when present, else scikit-image's."""
    from engines.image import load_image

    if data.is_dir():
        firsts: dict[tuple[str, bool], Path] = {}
        for p in list_photos(data):
            firsts.setdefault((p.identity, p.young), p.path)
        identities = sorted({ident for ident, _ in firsts})[:limit]
        return [
            (str(firsts[(i, young)].relative_to(data)), load_image(firsts[(i, young)]))
            for i in identities
            for young in (False, True)
            if (i, young) in firsts
        ]
    from engines.int8_chips import public_domain_photos

    return public_domain_photos()


def load_engines(precisions: list[str]) -> dict:
    """dlib's ResNet at each precision (ONNX Runtime on this CPU), whatever the default model is: the
    comparison is of one network's kernels across CPUs."""
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine

    return {
        p: FaceEngine.load(EngineConfig(ensemble=("dlib-resnet-v1",), precision=p, backend="onnxruntime"))
        for p in precisions
    }


def measure(images: list[tuple[str, np.ndarray]], engines: dict) -> dict[str, np.ndarray]:
    """Per photo: found flag, box (4), landmarks (10), the aligned chip, and one embedding per
    precision (NaN where no face). Each face is aligned once; every precision embeds that chip."""
    from engines.cohort import central_face

    first = next(iter(engines.values()))
    n = len(images)
    spec = first.embedder.spec
    out: dict[str, np.ndarray] = {
        "found": np.zeros(n, bool),
        "box": np.full((n, 4), np.nan),
        "landmarks": np.full((n, 10), np.nan),
        "chips": np.zeros((n, spec.input_height, spec.input_width, 3), np.uint8),
    }
    for i, (_, img) in enumerate(images):
        found = central_face(first, img, tight=True)
        if found is None:
            continue
        padded, det = found
        out["found"][i] = True
        out["box"][i] = np.asarray(det.box, float)[:4]
        out["landmarks"][i] = np.asarray(det.landmarks, float).reshape(-1)[:10]
        out["chips"][i] = first.align(padded, [det])[0]
    for p, eng in engines.items():
        out[f"emb_{p}"] = np.full((n, eng.embedding_dim), np.nan, np.float32)
        out[f"in_use_{p}"] = np.array(eng.precision)
        if out["found"].any():
            out[f"emb_{p}"][out["found"]] = eng.embedder.embed_chips(out["chips"][out["found"]])
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare(mine: dict[str, np.ndarray], other: dict[str, np.ndarray], engines: dict) -> dict:
    """How far this run's answers are from the other's, on the photos both found a face in: the
    whole path (detection, alignment, network), and the network alone (this CPU embedding the other
    run's chips, against the other run's embeddings of them)."""
    both = mine["found"] & other["found"]
    res: dict = {
        "photos": int(len(mine["found"])),
        "found_here_only": int((mine["found"] & ~other["found"]).sum()),
        "found_there_only": int((~mine["found"] & other["found"]).sum()),
        "box_max_px": float(np.abs(mine["box"][both] - other["box"][both]).max(initial=0.0)),
        "landmarks_max_px": float(np.abs(mine["landmarks"][both] - other["landmarks"][both]).max(initial=0.0)),
        "chips_identical": int(np.all(mine["chips"][both] == other["chips"][both], axis=(1, 2, 3)).sum()),
    }
    for p, eng in engines.items():
        a, b = mine[f"emb_{p}"][both].astype(np.float64), other[f"emb_{p}"][both].astype(np.float64)
        same_chips = (
            eng.embedder.embed_chips(other["chips"][both]) if both.any() else np.zeros((0, a.shape[1]), np.float32)
        )
        theirs = other[f"emb_{p}"][both]
        res[p] = {
            "in_use_here": str(mine[f"in_use_{p}"]),
            "in_use_there": str(other[f"in_use_{p}"]),
            "lowest_cosine": float(_cosines(a, b).min(initial=1.0)),
            "max_abs_diff": float(np.abs(a - b).max(initial=0.0)),
            # Nearest other photo by cosine, on each CPU: the answer a search would give.
            "nearest_photo_same": float(np.mean(_nearest(a) == _nearest(b))) if len(a) else 1.0,
            "network_bit_identical": int(np.all(same_chips == theirs, axis=1).sum()),
            "network_max_abs_diff": float(np.abs(same_chips.astype(np.float64) - theirs).max(initial=0.0)),
        }
    return res


def _nearest(emb: np.ndarray) -> np.ndarray:
    if len(emb) < 2:
        return np.zeros(len(emb), int)
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="LAG-layout folder (default: ../shared/data/lag-dev)"
    )
    ap.add_argument("--limit", type=int, default=60, help="identities to take (an adult and a young photo each)")
    ap.add_argument("--precisions", default="fp32,int8", help="embedder precisions to compare, comma-separated")
    ap.add_argument("--out", type=Path, help="write this run's answers here (.npz) for another CPU to compare with")
    ap.add_argument("--against", type=Path, help="answers of another run (.npz) to compare with")
    ap.add_argument("--json", type=Path, help="write the comparison (and this machine) here")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    images = photos(args.data, args.limit)
    engines = load_engines(precisions)
    mine = measure(images, engines)
    machine = describe_machine()
    print(machine_summary(machine))
    print(f"{len(images)} photos, a face found in {int(mine['found'].sum())}")
    if args.out:
        np.savez(args.out, names=np.array([n for n, _ in images]), **mine)
        print(f"answers written to {args.out}")
    if args.against is None:
        return 0
    with np.load(args.against) as f:
        other = {k: f[k] for k in f.files}
    if list(other["names"]) != [n for n, _ in images]:
        sys.exit(f"{args.against} holds answers for other photos: rerun both with the same --data and --limit")
    res = compare(mine, other, engines)
    print(
        f"found on one side only: {res['found_here_only']} here, {res['found_there_only']} there; "
        f"largest box difference {res['box_max_px']:.4f} px, landmarks {res['landmarks_max_px']:.4f} px; "
        f"chips identical {res['chips_identical']}"
    )
    print(
        f"{'precision':10} {'in use (here/there)':20} {'lowest cosine':>14} {'max |diff|':>11} {'same nearest':>13}"
        f" {'network: same chips bit-identical':>34} {'max |diff|':>11}"
    )
    for p in precisions:
        r = res[p]
        print(
            f"{p:10} {r['in_use_here'] + '/' + r['in_use_there']:20} {r['lowest_cosine']:14.7f} "
            f"{r['max_abs_diff']:11.2e} {r['nearest_photo_same']:13.4f} {r['network_bit_identical']:34d} "
            f"{r['network_max_abs_diff']:11.2e}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "against": str(args.against), **res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
