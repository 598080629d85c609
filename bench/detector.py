"""Face detector benchmark: recall on LAG crops and speed on synthetic 1080p/720p frames.

Example:
    python bench/detector.py --data ../shared/data --json bench/results/detector.json

Recall: the fraction of lag-dev images (100x100, tightly cropped) in which at least one
face is found, for several ways of giving the detector a margin around the face.
Speed: milliseconds per frame on a 1920x1080 and a 1280x720 frame (a real photo as
background, lag-dev faces pasted at 40..250 px heights), min face 40 px, one thread;
also how many of the pasted faces were found. dlib's HOG detector is measured the same way;
with --mmod also dlib's MMOD CNN (face_recognition's "cnn" model), upsampled once so it
reaches 40 px faces, timed once per frame since one run takes tens of seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

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


def _mtcnn(model_dir: Path, min_face: int) -> Detect:
    det = MtcnnDetector(model_dir, MtcnnConfig(min_face_size=min_face, intra_op_threads=1))
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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def _synthetic_frame(
    width: int, height: int, faces: list[np.ndarray]
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A cluttered real-photo background with faces pasted at PASTE_HEIGHTS, left to right."""
    from skimage import data as skdata

    frame = cv2.resize(skdata.coffee(), (width, height), interpolation=cv2.INTER_LINEAR)
    rects = []
    x = 20
    for face, h in zip(faces, PASTE_HEIGHTS):
        patch = cv2.resize(face, (h, h), interpolation=cv2.INTER_AREA if h < face.shape[0] else cv2.INTER_LINEAR)
        y = (height - h) // 2 + (60 if len(rects) % 2 else -60)
        frame[y : y + h, x : x + h] = patch
        rects.append((x, y, x + h, y + h))
        x += h + 25
    return frame, rects


def _speed(detect: Detect, frame: np.ndarray, rects, repeats: int, warmup: bool = True) -> dict:
    if warmup:
        detect(frame)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        boxes = detect(frame)
        times.append(1000 * (time.perf_counter() - t0))
    hit = 0
    for x1, y1, x2, y2 in rects:
        hit += any(x1 <= (b[0] + b[2]) / 2 <= x2 and y1 <= (b[1] + b[3]) / 2 <= y2 for b in boxes)
    return {
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "pasted_faces": len(rects),
        "pasted_found": hit,
        "detections": len(boxes),
    }


def _recall_table(
    results: dict, images: list[np.ndarray], mtcnn40: Detect, mtcnn20: Detect, hog0: Detect, hog1: Detect
) -> None:
    print(f"recall on {len(images)} lag-dev images (>= 1 face found)")
    print(f"{'detector':<22}{'padding':<22}{'recall':>8}{'ms/img':>9}")
    runs = [("mtcnn min40", mtcnn40, p) for p in PADDINGS]
    runs += [("hog up0", hog0, p) for p in PADDINGS]
    runs += [
        (name, det, p)
        for name, det in (("mtcnn min20", mtcnn20), ("hog up1", hog1))
        for p in ("none", "reflect30", "constant30")
    ]
    for name, detect, pad in runs:
        r = _recall(detect, images, _pad(pad))
        results["recall"].setdefault(name, {})[pad] = r
        print(f"{name:<22}{pad:<22}{r['recall']:>8.3f}{r['ms_per_image']:>9.1f}")


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
    args = ap.parse_args()

    lag = args.data / "lag-dev" if (args.data / "lag-dev").is_dir() else args.data
    paths = sorted(lag.rglob("*.png"))
    if not paths:
        print(f"SKIP: no lag-dev images under {args.data} (needs ../shared/data/lag-dev, see its README.md)")
        return 0
    if args.limit:
        paths = paths[: args.limit]
    images = [_load_rgb(p) for p in paths]

    with tempfile.TemporaryDirectory(prefix="mtcnn-bench-") as tmp:
        # Sessions read the files when they are created, so the directory can go afterwards.
        model_dir = Path(tmp)
        convert_mtcnn(model_dir)
        mtcnn40 = _mtcnn(model_dir, 40)
        mtcnn20 = _mtcnn(model_dir, 20)
    hog0, hog1 = _hog(0), _hog(1)

    results: dict = {
        "command": " ".join(["python", "bench/detector.py", *sys.argv[1:]]),
        "machine": {"cpu": _cpu_name(), "python": platform.python_version()},
        "recall": {},
        "speed": {},
    }
    if not args.no_recall:
        _recall_table(results, images, mtcnn40, mtcnn20, hog0, hog1)

    faces = [images[i] for i in np.linspace(0, len(images) - 1, len(PASTE_HEIGHTS)).astype(int)]
    print(f"\nspeed, one thread, median of {args.repeats} (lag-dev faces pasted at {PASTE_HEIGHTS} px)")
    print(f"{'detector':<22}{'frame':<12}{'ms':>9}{'found':>9}{'dets':>6}")
    for w, h in ((1920, 1080), (1280, 720)):
        frame, rects = _synthetic_frame(w, h, faces)
        runs = [
            ("mtcnn min40", mtcnn40, args.repeats),
            ("hog up1 (40px)", hog1, args.repeats),
            ("hog up0 (80px)", hog0, args.repeats),
        ]
        if args.mmod:
            runs.append(("mmod up1 (40px)", _mmod(1), 1))
        for name, detect, repeats in runs:
            r = _speed(detect, frame, rects, repeats, warmup=repeats > 1)
            results["speed"].setdefault(name, {})[f"{w}x{h}"] = r
            print(
                f"{name:<22}{f'{w}x{h}':<12}{r['ms_median']:>9.1f}{r['pasted_found']:>5}/{r['pasted_faces']:<3}{r['detections']:>6}"
            )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
