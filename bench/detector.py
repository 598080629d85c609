"""Face detector benchmark: recall on LAG crops and speed on synthetic 1080p/720p frames.

Example:
    python bench/detector.py --data ../shared/data --json bench/results/detector.json

Recall: the fraction of lag-dev images (100x100, tightly cropped) in which at least one
face is found, for several ways of giving the detector a margin around the face.
Speed: milliseconds per frame on a 1920x1080 and a 1280x720 frame (a real photo as
background, lag-dev faces pasted at 40..250 px heights), min face 40 px, one thread;
also how many of the pasted faces were found. Both wall-clock and the thread's CPU time are
reported: the development machine is shared, and CPU time is less disturbed by other jobs.
Scenes (--scenes N): N frames per size, each with 7 different lag-dev faces of 40..250 px on
one of scikit-image's photos without faces, to count how many of the pasted faces the
MTCNN settings find; and the per-frame cost over all of them.
Stream (--stream SECONDS): bench/detector_stream.py's synthetic 720p and 1080p sequences at 5 analysed
fps from a static camera, detected whole every frame and gated (edge.regions), side by side: per-frame
cost and recall; runs alone (lag-dev faces, or scikit-image's astronaut without the data).
To compare with an older version of the detector, run this script with PYTHONPATH pointing
at that version's checkout (it only uses MtcnnDetector, MtcnnConfig and convert_mtcnn). dlib's HOG detector is measured the same way;
with --mmod also dlib's MMOD CNN (face_recognition's "cnn" model), upsampled once so it
reaches 40 px faces, timed once per frame since one run takes tens of seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

# Run as a script (python bench/detector.py), the checkout's root is not on the path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine, machine_summary
from engines.detector import MtcnnConfig, MtcnnDetector
from engines.mtcnn_convert import convert_mtcnn

PASTE_HEIGHTS = (40, 55, 75, 100, 140, 190, 250)
Detect = Callable[[np.ndarray], list[tuple[float, float, float, float]]]


def _pad(name: str) -> Callable[[np.ndarray], np.ndarray]:
    def none(img):
        return img

    def border(kind: int, px: int, value=(128, 128, 128)):
        return lambda img: cv2.copyMakeBorder(img, px, px, px, px, kind, value=value)

    def upscale_reflect(img):
        big = cv2.resize(img, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
        return cv2.copyMakeBorder(big, 60, 60, 60, 60, cv2.BORDER_REFLECT_101)

    return {
        "none": none,
        "constant30": border(cv2.BORDER_CONSTANT, 30),
        "constant50": border(cv2.BORDER_CONSTANT, 50),
        "replicate30": border(cv2.BORDER_REPLICATE, 30),
        "reflect30": border(cv2.BORDER_REFLECT_101, 30),
        "upscale2x_reflect60": upscale_reflect,
    }[name]


PADDINGS = ("none", "constant30", "constant50", "replicate30", "reflect30", "upscale2x_reflect60")


def _load_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _mtcnn(model_dir: Path, min_face: int, **settings) -> Detect:
    det = MtcnnDetector(model_dir, MtcnnConfig(min_face_size=min_face, intra_op_threads=1, **settings))
    return lambda img: [d.box for d in det.detect(img)]


def _hog(upsample: int) -> Detect:
    import dlib

    hog = dlib.get_frontal_face_detector()
    return lambda img: [(r.left(), r.top(), r.right(), r.bottom()) for r in hog(img, upsample)]


def _mmod(upsample: int) -> Detect:
    import dlib
    import face_recognition_models

    cnn = dlib.cnn_face_detection_model_v1(face_recognition_models.cnn_face_detector_model_location())
    return lambda img: [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in cnn(img, upsample)]


def _recall(detect: Detect, images: list[np.ndarray], pad: Callable[[np.ndarray], np.ndarray]) -> dict:
    found = 0
    t0 = time.perf_counter()
    for img in images:
        found += bool(detect(pad(img)))
    dt = time.perf_counter() - t0
    return {
        "recall": found / len(images),
        "found": found,
        "images": len(images),
        "ms_per_image": 1000 * dt / len(images),
    }


SCENE_BACKGROUNDS = ("coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def _paste(frame: np.ndarray, faces: list[np.ndarray], heights, rng: np.random.Generator | None = None):
    """Paste faces left to right at the given heights; rows alternate above and below the middle
    (or, with rng, lie anywhere that keeps the face inside the frame)."""
    height = frame.shape[0]
    rects = []
    x = 20
    for face, h in zip(faces, heights):
        patch = cv2.resize(face, (h, h), interpolation=cv2.INTER_AREA if h < face.shape[0] else cv2.INTER_LINEAR)
        if rng is None:
            y = (height - h) // 2 + (60 if len(rects) % 2 else -60)
        else:
            y = int(rng.integers(10, height - h - 10))
        frame[y : y + h, x : x + h] = patch
        rects.append((x, y, x + h, y + h))
        x += h + 25
    return frame, rects


def _synthetic_frame(
    width: int, height: int, faces: list[np.ndarray]
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A cluttered real-photo background with faces pasted at PASTE_HEIGHTS, left to right."""
    from skimage import data as skdata

    frame = cv2.resize(skdata.coffee(), (width, height), interpolation=cv2.INTER_LINEAR)
    return _paste(frame, faces, PASTE_HEIGHTS)


def _scenes(width: int, height: int, images: list[np.ndarray], count: int, seed: int = 0):
    """`count` frames, each with 7 different lag-dev faces at PASTE_HEIGHTS (shuffled) on one of
    scikit-image's photos, yielded as (frame, rects)."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    backgrounds = [getattr(skdata, name)() for name in SCENE_BACKGROUNDS]
    for i in range(count):
        bg = backgrounds[i % len(backgrounds)]
        frame = cv2.resize(bg, (width, height), interpolation=cv2.INTER_LINEAR)
        faces = [images[j] for j in rng.choice(len(images), size=len(PASTE_HEIGHTS), replace=False)]
        yield _paste(frame, faces, [int(v) for v in rng.permutation(PASTE_HEIGHTS)], rng)


def _found(rects, boxes) -> list[bool]:
    return [
        any(x1 <= (b[0] + b[2]) / 2 <= x2 and y1 <= (b[1] + b[3]) / 2 <= y2 for b in boxes) for x1, y1, x2, y2 in rects
    ]


def _timed(detect: Detect, frame: np.ndarray) -> tuple[list, float, float]:
    """Boxes, wall-clock ms and this thread's CPU ms (the detector runs in the calling thread)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    boxes = detect(frame)
    return boxes, 1000 * (time.perf_counter() - t0), 1000 * (time.thread_time() - c0)


def _speed(detect: Detect, frame: np.ndarray, rects, repeats: int, warmup: bool = True) -> dict:
    if warmup:
        detect(frame)
    times, cpu = [], []
    for _ in range(repeats):
        boxes, ms, cpu_ms = _timed(detect, frame)
        times.append(ms)
        cpu.append(cpu_ms)
    return {
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "cpu_ms_median": statistics.median(cpu),
        "pasted_faces": len(rects),
        "pasted_found": sum(_found(rects, boxes)),
        "detections": len(boxes),
    }


def _scene_recall(detect: Detect, images: list[np.ndarray], count: int) -> dict:
    out = {}
    for w, h in ((1920, 1080), (1280, 720)):
        found = total = 0
        missed: list[int] = []
        times, cpu = [], []
        for frame, rects in _scenes(w, h, images, count):
            boxes, ms, cpu_ms = _timed(detect, frame)
            times.append(ms)
            cpu.append(cpu_ms)
            hits = _found(rects, boxes)
            found += sum(hits)
            total += len(hits)
            missed += [int(r[3] - r[1]) for r, hit in zip(rects, hits) if not hit]
        out[f"{w}x{h}"] = {
            "faces": total,
            "found": found,
            "recall": found / total,
            "missed_heights": sorted(missed),
            "ms_median": statistics.median(times),
            "cpu_ms_median": statistics.median(cpu),
        }
    return out


def _recall_table(results: dict, images: list[np.ndarray], runs: list[tuple[str, Detect, tuple[str, ...]]]) -> None:
    print(f"recall on {len(images)} lag-dev images (>= 1 face found)")
    print(f"{'detector':<22}{'padding':<22}{'recall':>8}{'ms/img':>9}")
    for name, detect, pads in runs:
        for pad in pads:
            r = _recall(detect, images, _pad(pad))
            results["recall"].setdefault(name, {})[pad] = r
            print(f"{name:<22}{pad:<22}{r['recall']:>8.3f}{r['ms_per_image']:>9.1f}")


def _gating(settings: list[str]):
    from edge.regions import GatingConfig

    pairs = [item.split("=", 1) for item in settings]
    bad = [item for item, pair in zip(settings, pairs) if len(pair) != 2]
    if bad:
        raise SystemExit(f"--gating wants KEY=VALUE, got {' '.join(bad)}")
    return GatingConfig.model_validate({k: v for k, v in pairs}, strict=False)


def _stream_main(args: argparse.Namespace, faces: list[np.ndarray]) -> int:
    from bench.detector_stream import run_stream

    with tempfile.TemporaryDirectory(prefix="mtcnn-bench-") as tmp:
        convert_mtcnn(Path(tmp))
        det = MtcnnDetector(
            Path(tmp),
            MtcnnConfig(
                min_face_size=args.min_face, factor=args.factor, thresholds=tuple(args.thresholds), intra_op_threads=1
            ),
        )
    source = f"{len(faces)} lag-dev faces"
    if not faces:
        from skimage import data as skdata

        # No evaluation data: the astronaut's face, cut as tightly as lag-dev's crops are.
        astronaut = skdata.astronaut()
        x1, y1, x2, y2 = (int(v) for v in det.detect(astronaut)[0].box)
        faces, source = [astronaut[max(0, y1) : y2, max(0, x1) : x2]], "scikit-image astronaut"
    results = {
        "command": " ".join(["python", "bench/detector.py", *sys.argv[1:]]),
        "label": args.label,
        "machine": {**describe_machine(), "load_average": os.getloadavg()},
        "mtcnn_settings": {"min_face_size": args.min_face, "factor": args.factor, "thresholds": args.thresholds},
        "faces": source,
        "stream": run_stream(det.detect, args.min_face, faces, args.stream, _gating(args.gating), det.confirm),
    }
    results["machine"]["load_average_after"] = os.getloadavg()
    print(machine_summary(results["machine"]))
    print(f"load average before {results['machine']['load_average']}, after {os.getloadavg()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data",
        help="evaluation data root holding lag-dev/ (default ../shared/data)",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N lag-dev images (0 = all)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per frame")
    ap.add_argument("--no-recall", action="store_true", help="measure speed only")
    ap.add_argument("--mmod", action="store_true", help="also time dlib's MMOD CNN (about a minute per 1080p frame)")
    ap.add_argument("--mtcnn-only", action="store_true", help="measure only MTCNN with the settings below")
    ap.add_argument("--scenes", type=int, default=0, help="also count faces found in N scenes per frame size")
    defaults = MtcnnConfig()
    ap.add_argument("--min-face", type=int, default=defaults.min_face_size, help="MTCNN min_face_size")
    ap.add_argument("--factor", type=float, default=defaults.factor, help="MTCNN pyramid factor")
    ap.add_argument(
        "--thresholds", type=float, nargs=3, default=defaults.thresholds, help="MTCNN P-, R-, O-Net thresholds"
    )
    ap.add_argument(
        "--paddings", nargs="+", choices=PADDINGS, default=PADDINGS, help="margins to measure MTCNN's recall with"
    )
    ap.add_argument(
        "--stream", type=float, default=0.0, help="only the stream measurement, a sequence of this many seconds"
    )
    ap.add_argument(
        "--gating",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="with --stream: [analysis.gating] settings other than the defaults (e.g. motion_growth=0.5)",
    )
    ap.add_argument("--label", default="", help="a name for this run in the JSON (e.g. the commit measured)")
    args = ap.parse_args()

    lag = args.data / "lag-dev" if (args.data / "lag-dev").is_dir() else args.data
    paths = sorted(lag.rglob("*.png"))
    if args.stream:
        return _stream_main(args, [_load_rgb(p) for p in paths[:: max(1, len(paths) // 40)]])
    if not paths:
        print(f"SKIP: no lag-dev images under {args.data} (needs ../shared/data/lag-dev, see its README.md)")
        return 0
    if args.limit:
        paths = paths[: args.limit]
    images = [_load_rgb(p) for p in paths]

    settings = {"factor": args.factor, "thresholds": tuple(args.thresholds)}
    name = f"mtcnn min{args.min_face}"
    with tempfile.TemporaryDirectory(prefix="mtcnn-bench-") as tmp:
        # Sessions read the files when they are created, so the directory can go afterwards.
        model_dir = Path(tmp)
        convert_mtcnn(model_dir)
        mtcnn = _mtcnn(model_dir, args.min_face, **settings)
        mtcnn20 = None if args.mtcnn_only else _mtcnn(model_dir, 20)
    hog0, hog1 = (None, None) if args.mtcnn_only else (_hog(0), _hog(1))

    results: dict = {
        "command": " ".join(["python", "bench/detector.py", *sys.argv[1:]]),
        "label": args.label,
        "machine": {**describe_machine(), "load_average": os.getloadavg()},
        "mtcnn_settings": {"min_face_size": args.min_face, **settings},
        "recall": {},
        "speed": {},
    }
    print(machine_summary(results["machine"]))
    if not args.no_recall:
        runs = [(name, mtcnn, tuple(args.paddings))]
        if not args.mtcnn_only:
            runs += [("hog up0", hog0, PADDINGS)]
            runs += [
                (n, d, ("none", "reflect30", "constant30")) for n, d in (("mtcnn min20", mtcnn20), ("hog up1", hog1))
            ]
        _recall_table(results, images, runs)

    faces = [images[i] for i in np.linspace(0, len(images) - 1, len(PASTE_HEIGHTS)).astype(int)]
    print(f"\nspeed, one thread, median of {args.repeats} (lag-dev faces pasted at {PASTE_HEIGHTS} px)")
    print(f"{'detector':<22}{'frame':<12}{'ms':>9}{'cpu ms':>9}{'found':>9}{'dets':>6}")
    for w, h in ((1920, 1080), (1280, 720)):
        frame, rects = _synthetic_frame(w, h, faces)
        runs = [(name, mtcnn, args.repeats)]
        if not args.mtcnn_only:
            runs += [("hog up1 (40px)", hog1, args.repeats), ("hog up0 (80px)", hog0, args.repeats)]
        if args.mmod:
            runs.append(("mmod up1 (40px)", _mmod(1), 1))
        for label, detect, repeats in runs:
            r = _speed(detect, frame, rects, repeats, warmup=repeats > 1)
            results["speed"].setdefault(label, {})[f"{w}x{h}"] = r
            print(
                f"{label:<22}{f'{w}x{h}':<12}{r['ms_median']:>9.1f}{r['cpu_ms_median']:>9.1f}"
                f"{r['pasted_found']:>5}/{r['pasted_faces']:<3}{r['detections']:>6}"
            )

    if args.scenes:
        print(f"\n{name}: {args.scenes} scenes per size, 7 faces each at {PASTE_HEIGHTS} px")
        print(f"{'frame':<12}{'found':>12}{'recall':>8}{'ms':>9}{'cpu ms':>9}  missed heights")
        results["scenes"] = _scene_recall(mtcnn, images, args.scenes)
        for size, r in results["scenes"].items():
            print(
                f"{size:<12}{r['found']:>7}/{r['faces']:<4}{r['recall']:>8.3f}{r['ms_median']:>9.1f}"
                f"{r['cpu_ms_median']:>9.1f}  {r['missed_heights']}"
            )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
