"""Faces per second on this CPU: our detection and embedding (batch 1, 8, 32) against the
face_recognition package on the same images in the same run.

Images: lag-dev photos (margin added) when the evaluation data is present, else the public-domain
astronaut photo shipped with scikit-image, at several scales.

Example:
    python bench/throughput.py --json out/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, list_photos  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--images", type=int, default=96, help="number of images")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args(argv)

    from engines.face_engine import FaceEngine

    images, source = _images(args.images)
    engine = FaceEngine.load()
    # Warm up so one-off initialisation is not timed.
    engine.analyze(images[0])

    t0 = time.perf_counter()
    items = []
    for img in images:
        dets = engine.detect(img)
        items += [(img, d) for d in dets[:1]]
    det_s = time.perf_counter() - t0
    res: dict = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "images": source,
        "model_id": engine.model_id,
        "backend": engine.embedder.backend.name,
        "detection": {"images_per_s": _rate(len(images), det_s), "faces_found": len(items)},
        "embedding": {},
    }
    faces = items * max(1, 64 // max(1, len(items)))
    faces = faces[: max(64, len(items))]
    for batch in (1, 8, 32):
        t0 = time.perf_counter()
        for start in range(0, len(faces), batch):
            engine.embed(faces[start : start + batch])
        dt = time.perf_counter() - t0
        res["embedding"][f"batch_{batch}"] = {"faces_per_s": _rate(len(faces), dt), "faces": len(faces)}

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
            best = max(v["faces_per_s"] for v in res["embedding"].values())
            res["embed_ratio_vs_peer"] = best / res["peer_face_recognition"]["embedding"]["faces_per_s"]
            res["detect_ratio_vs_peer"] = (
                res["detection"]["images_per_s"] / res["peer_face_recognition"]["detection"]["images_per_s"]
            )

    print(f"\n{source}; backend {res['backend']}")
    print(f"{'what':<34}{'ours':>12}{'face_recognition':>18}")
    peer = res.get("peer_face_recognition")
    print(
        f"{'detection images/s':<34}{res['detection']['images_per_s']:>12.1f}{(peer['detection']['images_per_s'] if peer else float('nan')):>18.1f}"
    )
    for batch in (1, 8, 32):
        p = peer["embedding"]["faces_per_s"] if peer and batch == 1 else float("nan")
        print(
            f"{'embedding faces/s, batch ' + str(batch):<34}{res['embedding'][f'batch_{batch}']['faces_per_s']:>12.1f}{p:>18.1f}"
        )
    if "embed_ratio_vs_peer" in res:
        print(f"embed_ratio_vs_peer = {res['embed_ratio_vs_peer']:.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
