"""Measure the quality gate's inputs on LAG photos, and how often each threshold rejects.

Runs the MTCNN detector on every photo (30 px reflected margin, as bench/accuracy.py's first
try), takes the central face, and records what engines.quality.assess measures: eye distance,
box height, sharpness, yaw, nose height, detector score. Prints their percentiles, the
fraction of faces each threshold of QualityConfig() (the defaults) rejects, and -- to show the
checks catch what they should -- the same for copies of the faces blurred with a Gaussian
(sigma 2.5 px) and shrunk to 0.4 of their size. The detector looks for faces from 20 px
up so that the shrunk ones are found.

    python bench/quality_thresholds.py                  # all of lag-dev, a few minutes
    python bench/quality_thresholds.py --limit 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, list_photos, require_data
from bench.machine import describe_machine, machine_summary

PERCENTILES = (0.2, 0.5, 1, 5, 50, 95, 99, 99.5, 99.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="LAG-layout folder (default ../shared/data/lag-dev)"
    )
    ap.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements summary here")
    args = ap.parse_args()
    require_data(args.data)

    import cv2

    from engines.detector import MtcnnConfig, MtcnnDetector
    from engines.image import load_image
    from engines.mtcnn_convert import convert_mtcnn, find_mtcnn_weights
    from engines.quality import REASONS, QualityConfig, assess, face_geometry

    cfg = QualityConfig()
    with tempfile.TemporaryDirectory() as tmp:
        detector = MtcnnDetector(convert_mtcnn(Path(tmp), find_mtcnn_weights()), MtcnnConfig(min_face_size=20))
    photos = list_photos(args.data)[: args.limit]
    t0 = time.perf_counter()
    variants: dict[str, list] = {"original": [], "blurred": [], "shrunk": []}
    no_face = 0
    for photo in photos:
        img = cv2.copyMakeBorder(load_image(photo.path), 30, 30, 30, 30, cv2.BORDER_REFLECT_101)
        for name, view in (
            ("original", img),
            ("blurred", cv2.GaussianBlur(img, (0, 0), 2.5)),
            ("shrunk", cv2.resize(img, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)),
        ):
            dets = detector.detect(view)
            if not dets:
                no_face += name == "original"
                continue
            cy, cx = view.shape[0] / 2, view.shape[1] / 2
            d = min(dets, key=lambda d: ((d.box[0] + d.box[2]) / 2 - cx) ** 2 + ((d.box[1] + d.box[3]) / 2 - cy) ** 2)
            q = assess(view, d.box, d.landmarks, d.score, cfg)
            nose_height = face_geometry(d.landmarks)[3]
            variants[name].append((q, nose_height))
    seconds = time.perf_counter() - t0

    orig = variants["original"]
    fields = {
        "eye_distance_px": [q.eye_distance_px for q, _ in orig],
        "face_height_px": [q.face_height_px for q, _ in orig],
        "sharpness": [q.sharpness for q, _ in orig],
        "yaw": [q.yaw for q, _ in orig],
        "nose_height": [h for _, h in orig],
        "detector_score": [q.detector_score for q, _ in orig],
    }
    summary: dict = {
        "photos": len(photos),
        "no_face": no_face,
        "seconds": seconds,
        "config": cfg.model_dump(),
        "machine": describe_machine(),
        "percentiles": {},
        "reject_rate": {},
    }
    print(machine_summary(summary["machine"]))
    print(f"{len(photos)} photos, {len(orig)} with a face ({no_face} without), {seconds:.0f} s")
    print(f"{'measure':<18}" + "".join(f"{'p' + str(p):>9}" for p in PERCENTILES))
    for k, v in fields.items():
        pct = np.percentile(np.asarray(v), PERCENTILES)
        summary["percentiles"][k] = dict(zip(map(str, PERCENTILES), pct.tolist(), strict=True))
        print(f"{k:<18}" + "".join(f"{x:>9.3f}" for x in pct))
    print(f"{'sharpness, by copy':<18}" + "".join(f"{'p' + str(p):>9}" for p in PERCENTILES))
    for name, rows in variants.items():
        pct = np.percentile(np.asarray([q.sharpness for q, _ in rows]), PERCENTILES)
        summary["percentiles"][f"sharpness_{name}"] = dict(zip(map(str, PERCENTILES), pct.tolist(), strict=True))
        print(f"{name:<18}" + "".join(f"{x:>9.3f}" for x in pct))
    print(f"\nrejected by the default QualityConfig ({', '.join(f'{k}={v}' for k, v in cfg.model_dump().items())})")
    print(f"{'faces':<10}{'n':>6}" + "".join(f"{r:>13}" for r in REASONS) + f"{'any':>9}")
    for name, rows in variants.items():
        n = max(len(rows), 1)
        rates = {r: sum(r in q.reasons for q, _ in rows) / n for r in REASONS}
        rates["any"] = sum(not q.ok for q, _ in rows) / n
        summary["reject_rate"][name] = rates | {"faces": len(rows)}
        print(f"{name:<10}{len(rows):>6}" + "".join(f"{rates[r]:>13.3f}" for r in REASONS) + f"{rates['any']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
