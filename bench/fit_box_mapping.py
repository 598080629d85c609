"""Fit the box that dlib's 5-point landmark model expects from MTCNN's 5 landmarks.

dlib's shape_predictor_5_face_landmarks was trained on boxes from dlib's HOG face detector;
the unit's detector is MTCNN, whose boxes sit differently on the face. This script runs both
detectors on the LAG photos (30 px reflected margin, as bench/accuracy.py's first try),
keeps the faces both find, and fits engines.landmarks.dlib_box_from_points by least squares
on the even-numbered identities: in the face's frame (origin at the eye midpoint, x along
the eyes, y square to it) the HOG box centre and side as linear combinations of the eye
distance E and the eye-to-mouth distance M. It then checks the fit on the odd-numbered
identities: IoU with the HOG box, and how far dlib's landmarks (and the dlib embedding of
the chip) move when the fitted box replaces the HOG box -- the number that matters.

    python bench/fit_box_mapping.py                      # all of lag-dev, about 10 minutes
    python bench/fit_box_mapping.py --limit 400 --json out.json

Paste the printed constants into engines/landmarks.py when they change.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, list_photos, require_data
from bench.machine import describe_machine, machine_summary


def _frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Eye midpoint, unit eye direction, its perpendicular, eye distance, eye-mouth distance."""
    eyes = (points[0] + points[1]) / 2
    mouth = (points[3] + points[4]) / 2
    across = points[1] - points[0]
    e = float(np.hypot(*across))
    ux = across / e
    uy = np.array([-ux[1], ux[0]])
    return eyes, ux, uy, e, float(np.hypot(*(mouth - eyes)))


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def collect(photos, limit: int | None):
    import cv2
    import dlib

    from engines.detector import MtcnnConfig, MtcnnDetector
    from engines.image import load_image
    from engines.mtcnn_convert import convert_mtcnn, find_mtcnn_weights

    tmp = tempfile.TemporaryDirectory()
    detector = MtcnnDetector(convert_mtcnn(Path(tmp.name), find_mtcnn_weights()), MtcnnConfig(min_face_size=40))
    hog = dlib.get_frontal_face_detector()
    rows = []
    skipped = {"no_mtcnn": 0, "no_hog": 0}
    for photo in photos[:limit]:
        img = cv2.copyMakeBorder(load_image(photo.path), 30, 30, 30, 30, cv2.BORDER_REFLECT_101)
        dets = detector.detect(img)
        if not dets:
            skipped["no_mtcnn"] += 1
            continue
        cy, cx = img.shape[0] / 2, img.shape[1] / 2
        det = min(dets, key=lambda d: ((d.box[0] + d.box[2]) / 2 - cx) ** 2 + ((d.box[1] + d.box[3]) / 2 - cy) ** 2)
        rects = [(r.left(), r.top(), r.right(), r.bottom()) for r in hog(img, 1)]
        best = max(rects, key=lambda r: _iou(r, det.box), default=None)
        if best is None or _iou(best, det.box) < 0.3:
            skipped["no_hog"] += 1
            continue
        rows.append(
            {
                "photo": photo,
                "image": img,
                "points": det.landmarks.astype(np.float64),
                "mtcnn_box": det.box,
                "hog_box": best,
            }
        )
    tmp.cleanup()
    return rows, skipped


def fit(rows) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (centre across, centre down) and side coefficients on [E, M]."""
    a, cx, cy, side = [], [], [], []
    for r in rows:
        eyes, ux, uy, e, m = _frame(r["points"])
        x1, y1, x2, y2 = r["hog_box"]
        centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
        a.append([e, m])
        cx.append(float((centre - eyes) @ ux))
        cy.append(float((centre - eyes) @ uy))
        side.append(((x2 - x1) + (y2 - y1)) / 2)
    a = np.asarray(a)
    centre = np.stack([np.linalg.lstsq(a, np.asarray(v), rcond=None)[0] for v in (cx, cy)])
    side_k = np.linalg.lstsq(a, np.asarray(side), rcond=None)[0]
    return centre, side_k


def evaluate(rows, box_of, sp, facerec) -> dict:
    """IoU with the HOG box; landmark shift (fraction of the eye distance) and embedding cosine
    when dlib's 5-point model and chip use box_of(row) instead of the HOG box."""
    from engines.align import dlib_chip_transform, extract_chip

    ious, shifts, cosines = [], [], []
    for r in rows:
        box = box_of(r)
        ious.append(_iou(box, r["hog_box"]))
        ref = sp.predict(r["image"], r["hog_box"], subpixel=True)
        got = sp.predict(r["image"], box, subpixel=True)
        eye_dist = float(np.hypot(*((ref[0] + ref[1]) / 2 - (ref[2] + ref[3]) / 2)))
        shifts.append(float(np.abs(got - ref).max() / eye_dist))
        if facerec is not None:
            chips = [
                extract_chip(r["image"], dlib_chip_transform(np.floor(p + 0.5), 150, 0.25), 150) for p in (ref, got)
            ]
            u, v = (np.asarray(facerec.compute_face_descriptor(c)) for c in chips)
            cosines.append(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    out = {
        "faces": len(rows),
        "iou_mean": float(np.mean(ious)),
        "iou_p05": float(np.percentile(ious, 5)),
        "landmark_shift_median": float(np.median(shifts)),
        "landmark_shift_p95": float(np.percentile(shifts, 95)),
        "landmark_shift_max": float(np.max(shifts)),
    }
    if cosines:
        out |= {
            "cosine_mean": float(np.mean(cosines)),
            "cosine_p05": float(np.percentile(cosines, 5)),
            "cosine_min": float(np.min(cosines)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="LAG-layout folder (default ../shared/data/lag-dev)"
    )
    ap.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    ap.add_argument("--json", type=Path, default=None, help="write the fit and figures here")
    args = ap.parse_args()
    require_data(args.data)
    try:
        import dlib
    except ImportError:
        sys.exit("needs the dlib python module for its HOG detector: pip install dlib-bin")

    from engines.landmarks import ShapePredictor, default_model_path, dlib_box_from_points

    t0 = time.perf_counter()
    rows, skipped = collect(list_photos(args.data), args.limit)
    t1 = time.perf_counter()
    train = [r for r in rows if zlib.crc32(r["photo"].identity.encode()) % 2 == 0]
    test = [r for r in rows if zlib.crc32(r["photo"].identity.encode()) % 2 == 1]
    centre_k, side_k = fit(train)
    centre = (float(centre_k[0, 0]), float(centre_k[0, 1]), float(centre_k[1, 0]), float(centre_k[1, 1]))
    side = (float(side_k[0]), float(side_k[1]))

    import face_recognition_models

    sp = ShapePredictor.load(default_model_path())
    facerec = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
    results = {
        "faces_used": len(rows),
        "skipped": skipped,
        "train_faces": len(train),
        "test_faces": len(test),
        "box_centre": centre,
        "box_side": side,
        "seconds_detecting": t1 - t0,
        "fitted_box_on_test": evaluate(
            test, lambda r: dlib_box_from_points(r["points"], centre=centre, side=side), sp, facerec
        ),
        "mtcnn_box_on_test": evaluate(test, lambda r: r["mtcnn_box"], sp, facerec),
        "machine": describe_machine(),
    }
    print(machine_summary(results["machine"]))
    print(f"faces used {len(rows)} (fit on {len(train)}, checked on {len(test)}); skipped {skipped}")
    print(f"_BOX_CENTRE = ({', '.join(f'{v:.4f}' for v in centre)})")
    print(f"_BOX_SIDE = ({', '.join(f'{v:.4f}' for v in side)})")
    print(
        f"{'box given to the 5-point model':<32}{'IoU':>7}{'IoU p5':>8}{'shift p50':>11}{'shift p95':>11}"
        f"{'shift max':>11}{'cos mean':>10}{'cos min':>9}"
    )
    for name, key in (("fitted from MTCNN points", "fitted_box_on_test"), ("MTCNN box as is", "mtcnn_box_on_test")):
        r = results[key]
        print(
            f"{name:<32}{r['iou_mean']:>7.3f}{r['iou_p05']:>8.3f}{r['landmark_shift_median']:>11.4f}"
            f"{r['landmark_shift_p95']:>11.4f}{r['landmark_shift_max']:>11.4f}"
            f"{r.get('cosine_mean', float('nan')):>10.5f}"
            f"{r.get('cosine_min', float('nan')):>9.5f}"
        )
    print(
        "shift: largest landmark move vs the HOG box, as a fraction of the eye distance; "
        "cos: dlib embedding of the chip vs the HOG-box chip"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
