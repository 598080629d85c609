"""How closely engines.landmarks and engines.align reproduce dlib, and how fast they are.

For a sample of LAG photos (30 px reflected margin; the box is dlib's HOG detection where it
finds one, else the central 80% of the crop), runs both pipelines from the same box:

    dlib:  dlib.shape_predictor -> dlib.get_face_chip(size=150, padding=0.25)
    ours:  ShapePredictor.predict -> dlib_chip_transform + extract_chip

and compares the landmarks (pixels), the chips (mean absolute difference in grey levels)
and dlib's ResNet embedding of each chip (cosine). Also times the landmark model, one face
per call and eight per call, against dlib's C++.

    python bench/alignment_parity.py                    # 100 photos, about a minute
    python bench/alignment_parity.py --limit 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, list_photos, require_data
from bench.machine import describe_machine, machine_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="LAG-layout folder (default ../shared/data/lag-dev)"
    )
    ap.add_argument("--limit", type=int, default=100, help="photos to use, an even spread over the set (default 100)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    require_data(args.data)
    try:
        import dlib
    except ImportError:
        sys.exit("needs the dlib python module to compare with: pip install dlib-bin")
    import cv2
    import face_recognition_models

    from engines.align import dlib_chip_transform, extract_chip
    from engines.image import load_image
    from engines.landmarks import ShapePredictor, default_model_path

    photos = sorted(list_photos(args.data), key=lambda p: zlib.crc32(str(p.path.relative_to(args.data)).encode()))
    photos = photos[: args.limit]
    t = time.perf_counter()
    ours_sp = ShapePredictor.load(default_model_path())
    load_s = time.perf_counter() - t
    dlib_sp = dlib.shape_predictor(str(default_model_path()))
    facerec = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
    hog = dlib.get_frontal_face_detector()

    point_diff, chip_diff, identical, cosines = [], [], 0, []
    t_ours = t_dlib = t_batch = 0.0
    for photo in photos:
        img = cv2.copyMakeBorder(load_image(photo.path), 30, 30, 30, 30, cv2.BORDER_REFLECT_101)
        rects = hog(img, 1)
        r = max(rects, key=lambda r: r.area()) if rects else dlib.rectangle(40, 40, 119, 119)
        box = (r.left(), r.top(), r.right(), r.bottom())

        t0 = time.perf_counter()
        shape = dlib_sp(img, r)
        t1 = time.perf_counter()
        pts = ours_sp.predict(img, box)
        t2 = time.perf_counter()
        ours_sp.predict_many(img, [box] * 8)
        t3 = time.perf_counter()
        t_dlib += t1 - t0
        t_ours += t2 - t1
        t_batch += (t3 - t2) / 8

        ref = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        point_diff.append(float(np.abs(pts - ref).max()))
        theirs = dlib.get_face_chip(img, shape, size=150, padding=0.25)
        mine = extract_chip(img, dlib_chip_transform(pts, 150, 0.25), 150)
        d = np.abs(mine.astype(int) - theirs.astype(int))
        chip_diff.append(float(d.mean()))
        identical += int(not d.any())
        u, v = (np.asarray(facerec.compute_face_descriptor(c)) for c in (mine, theirs))
        cosines.append(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))

    n = len(photos)
    res = {
        "photos": n,
        "model_load_s": load_s,
        "landmark_max_abs_diff_px": max(point_diff),
        "landmarks_identical": sum(d == 0 for d in point_diff),
        "chip_mean_abs_diff_mean": float(np.mean(chip_diff)),
        "chip_mean_abs_diff_max": float(np.max(chip_diff)),
        "chips_identical": identical,
        "cosine_min": float(np.min(cosines)),
        "cosine_mean": float(np.mean(cosines)),
        "ms_per_face_ours": t_ours / n * 1e3,
        "ms_per_face_ours_batch8": t_batch / n * 1e3,
        "ms_per_face_dlib": t_dlib / n * 1e3,
        "machine": describe_machine(),
    }
    print(machine_summary(res["machine"]))
    print(f"{n} photos; model load {load_s:.2f} s")
    print(
        f"landmarks: identical to dlib's on {res['landmarks_identical']}/{n}, largest difference "
        f"{res['landmark_max_abs_diff_px']:.3f} px"
    )
    print(
        f"chips: identical on {identical}/{n}; mean abs difference mean {res['chip_mean_abs_diff_mean']:.4f}, "
        f"max {res['chip_mean_abs_diff_max']:.4f} grey levels"
    )
    print(f"dlib embedding of our chip vs dlib's: cosine min {res['cosine_min']:.6f}, mean {res['cosine_mean']:.6f}")
    print(f"{'landmarks, ms per face':<28}{'ours 1/call':>12}{'ours 8/call':>12}{'dlib C++':>10}")
    print(
        f"{'':<28}{res['ms_per_face_ours']:>12.2f}{res['ms_per_face_ours_batch8']:>12.2f}{res['ms_per_face_dlib']:>10.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
