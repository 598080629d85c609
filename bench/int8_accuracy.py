"""The int8 embedder's accuracy guard: int8 against float32 on the same lag-dev faces.

Each photo is detected and aligned once (as bench/accuracy.py does: engines.cohort.central_face,
margins tried in turn, the face nearest the centre); the same chips are embedded by the float32 and the int8 embedder, so
the figures differ only by quantisation. Reported for both: TAR at FAR 1e-2/1e-3/1e-4, rank-1 and
rank-5 (protocol of ../shared/data/README.md), open-set FNIR at FPIR = 0.01 (every adult photo
searched once with its own person in the watchlist and once without), and per face the cosine
between the int8 and float32 embeddings (the engine's final 129-d output, and dlib's raw 128-d
descriptor). The guard (docs/engine.md): TAR@1e-3 and rank-1 of int8 no more than 0.005 below
float32's, FNIR no more than 0.005 above, and cosine >= 0.99 on every face.

Data: LAG, S. Bianco, "Large Age-Gap Face Verification by Feature Injection in Deep Networks",
Pattern Recognition Letters 90, 2017 (evaluation use only).

Whether another CPU computes the same embeddings is bench/cpu_agreement.py's question.

Example:
    python bench/int8_accuracy.py --json out/int8_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, Photo, evaluate, list_photos, require_data
from bench.machine import describe_machine, machine_summary

GUARD_DELTA = 0.005
GUARD_COSINE = 0.99


def fnir_at_fpir(photos: list[Photo], emb: list[np.ndarray | None], fpir: float = 0.01) -> dict:
    """Open-set identification: each adult photo searched against the young-photo watchlist (a
    person's score is their best photo) with its person enrolled (mated) and without (non-mated,
    the same search with that person's column removed). The threshold lets `fpir` of non-mated
    searches raise a candidate; FNIR is the share of mated searches whose person is not the top
    candidate above it. A photo without a face never hits."""
    adults = [i for i, p in enumerate(photos) if not p.young]
    persons = sorted({p.identity for p in photos if p.young})
    col = {name: j for j, name in enumerate(persons)}
    dim = next(e.shape[0] for e in emb if e is not None)
    gallery = [(col[p.identity], emb[i]) for i, p in enumerate(photos) if p.young and emb[i] is not None]
    g = np.stack([e for _, e in gallery]) if gallery else np.zeros((0, dim), np.float32)
    g_col = np.array([c for c, _ in gallery], dtype=np.intp)
    scores = np.full((len(adults), len(persons)), -np.inf)
    for r, i in enumerate(adults):
        if emb[i] is None:
            continue
        s = g @ emb[i]
        np.maximum.at(scores[r], g_col, s)
    truth = np.array([col.get(photos[i].identity, -1) for i in adults])
    mated = truth >= 0
    non_mated = []
    for r in np.nonzero(mated)[0]:
        row = scores[r].copy()
        row[truth[r]] = -np.inf
        non_mated.append(row.max())
    non_mated = np.sort(np.asarray(non_mated))[::-1]
    allowed = int(np.floor(fpir * len(non_mated)))
    thr = non_mated[allowed] if allowed < len(non_mated) else -np.inf
    hits = [
        np.isfinite(scores[r, truth[r]]) and scores[r, truth[r]] > thr and scores[r].argmax() == truth[r]
        for r in np.nonzero(mated)[0]
    ]
    return {"fpir": fpir, "fnir": 1.0 - float(np.mean(hits)), "threshold": float(thr), "mated_searches": len(hits)}


def _scores(photos: list[Photo], final: dict[str, np.ndarray], have: list[int], keep: set[str] | None) -> dict:
    """Protocol figures of each embedder on the photos of the `keep` identities (all when None)."""
    idx = [i for i, p in enumerate(photos) if keep is None or p.identity in keep]
    subset = [photos[i] for i in idx]
    row = {i: j for j, i in enumerate(have)}
    out = {}
    for name, emb_all in final.items():
        emb = [emb_all[row[i]] if i in row else None for i in idx]
        res = evaluate(subset, emb, lambda a, b: a @ b.T)
        res["open_set"] = fnir_at_fpir(subset, emb)
        out[name] = res
    f, q = out["fp32"], out["int8"]
    out["deltas"] = {
        "tar_at_far_1e-3": q["tar_at_far"]["1e-3"] - f["tar_at_far"]["1e-3"],
        "rank1": q["rank1"] - f["rank1"],
        "fnir_at_fpir_0.01": q["open_set"]["fnir"] - f["open_set"]["fnir"],
    }
    out["photos"] = len(subset)
    return out


def _print_scores(title: str, res: dict) -> None:
    print(f"\n{title}: {res['photos']} photos")
    print(f"{'embedder':<10}{'TAR@1e-2':>10}{'TAR@1e-3':>10}{'TAR@1e-4':>10}{'rank-1':>8}{'rank-5':>8}{'FNIR@.01':>10}")
    for name in ("fp32", "int8"):
        r = res[name]
        t = r["tar_at_far"]
        print(
            f"{name:<10}{t['1e-2']:>10.3f}{t['1e-3']:>10.3f}{t['1e-4']:>10.3f}{r['rank1']:>8.3f}{r['rank5']:>8.3f}"
            f"{r['open_set']['fnir']:>10.3f}"
        )
    print("deltas int8 - fp32: " + ", ".join(f"{k} {v:+.4f}" for k, v in res["deltas"].items()))


def _guard(res: dict, min_cosine: float) -> bool:
    """int8 no worse than float32 by more than GUARD_DELTA (FNIR: no higher), and every cosine >= 0.99."""
    d = res["deltas"]
    return bool(
        d["tar_at_far_1e-3"] >= -GUARD_DELTA
        and d["rank1"] >= -GUARD_DELTA
        and d["fnir_at_fpir_0.01"] <= GUARD_DELTA
        and min_cosine >= GUARD_COSINE
    )


def _noise_control(
    photos: list[Photo], final: dict, raw: dict, have: list[int], anchor: float | None, seeds: int = 5
) -> dict:
    """How far the guard's figures move when float32 descriptors get random noise as large, on
    average, as int8's error: the figures' own noise floor at this change of the embeddings."""
    f = raw["fp32"]
    err = np.linalg.norm(raw["int8"] - f, axis=1).mean() / np.sqrt(f.shape[1])
    ranges: dict[str, list[float]] = {}
    for seed in range(seeds):
        noisy = f + np.random.default_rng(seed).normal(0, err, f.shape).astype(np.float32)
        if anchor:
            noisy = np.hstack([noisy, np.full((len(noisy), 1), anchor, np.float32)])
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        deltas = _scores(photos, {"fp32": final["fp32"], "int8": noisy}, have, None)["deltas"]
        for k, v in deltas.items():
            lo, hi = ranges.get(k, [v, v])
            ranges[k] = [min(lo, v), max(hi, v)]
    return {"seeds": seeds, "noise_sigma": float(err), "delta_ranges": ranges}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder in the LAG layout")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N identities (quick runs)")
    ap.add_argument(
        "--calibration",
        choices=("public", "lag-holdout"),
        default="public",
        help="public: the engine's default (scikit-image's public-domain photos); lag-holdout: photos of every "
        "other lag-dev identity (int8_calibration_photos), the guard then also reported on the identities "
        "calibration never saw",
    )
    args = ap.parse_args(argv)

    from engines.cohort import central_face
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine
    from engines.image import load_image

    photos = list_photos(require_data(args.data))
    if args.limit:
        keep = sorted({p.identity for p in photos})[: args.limit]
        photos = [p for p in photos if p.identity in keep]
    identities = sorted({p.identity for p in photos})
    held_out = set(identities[0::2])
    with tempfile.TemporaryDirectory(prefix="int8-calibration-") as tmp:
        calib_dir = None
        if args.calibration == "lag-holdout":
            calib_dir = Path(tmp)
            for p in photos:
                if p.identity not in held_out:
                    link = calib_dir / f"{p.identity}{'-y' if p.young else ''}-{p.path.name}"
                    link.symlink_to(p.path.resolve())
        # dlib's ResNet alone, whatever the default model is: the guard is about its int8 copy.
        dlib = ("dlib-resnet-v1",)
        fp32 = FaceEngine.load(EngineConfig(ensemble=dlib, precision="fp32", backend="onnxruntime"))
        int8 = FaceEngine.load(
            EngineConfig(ensemble=dlib, precision="int8", backend="onnxruntime", int8_calibration_photos=calib_dir)
        )

    chips: list[np.ndarray | None] = []
    for p in photos:
        found = central_face(fp32, load_image(p.path), tight=True)
        chips.append(fp32.align(found[0], [found[1]])[0] if found else None)
    have = [i for i, c in enumerate(chips) if c is not None]
    batch = np.stack([chips[i] for i in have])
    final, raw = {}, {}
    for name, engine in (("fp32", fp32), ("int8", int8)):
        final[name] = engine.embedder.embed_chips(batch)
        raw[name] = engine.embedder.raw(batch)
    cos_final = np.sum(final["fp32"] * final["int8"], axis=1)
    cos_raw = np.sum(raw["fp32"] * raw["int8"], axis=1)
    cos_raw /= np.linalg.norm(raw["fp32"], axis=1) * np.linalg.norm(raw["int8"], axis=1)
    results: dict = {
        "command": " ".join(["python", "bench/int8_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "calibration": args.calibration,
        "photos": len(photos),
        "no_face": len(photos) - len(have),
        "model_id": fp32.model_id,
        "backends": {"fp32": fp32.embedder.backend.name, "int8": int8.embedder.backend.name},
        "machine": describe_machine(),
        "int8_self_check": int8.precision_fallback or "passed",
        "cosine_int8_vs_fp32": {
            "faces": len(have),
            "final_129d": {
                "min": float(cos_final.min()),
                "mean": float(cos_final.mean()),
                "below_0.99": int((cos_final < GUARD_COSINE).sum()),
            },
            "raw_128d": {
                "min": float(cos_raw.min()),
                "mean": float(cos_raw.mean()),
                "below_0.99": int((cos_raw < GUARD_COSINE).sum()),
            },
        },
        "all": _scores(photos, final, have, None),
    }
    # After a failed self-check the "int8" engine runs float32: its figures would prove nothing.
    results["guard_held"] = int8.precision_fallback is None and _guard(results["all"], float(cos_final.min()))
    results["noise_control"] = _noise_control(photos, final, raw, have, fp32.embedder.spec.norm_anchor)
    print(f"{len(photos)} lag-dev photos, {results['no_face']} without a face; the same chips for both embedders")
    print(machine_summary(results["machine"]))
    print(f"int8 calibration: {args.calibration}")
    if int8.precision_fallback:
        print(f"int8 engine fell back to float32: {int8.precision_fallback}")
    _print_scores("all identities", results["all"])
    if args.calibration == "lag-holdout":
        results["held_out"] = _scores(photos, final, have, held_out)
        held = [j for j, i in enumerate(have) if photos[i].identity in held_out]
        results["held_out"]["cosine_final_min"] = float(cos_final[held].min())
        results["held_out"]["guard_held"] = int8.precision_fallback is None and _guard(
            results["held_out"], float(cos_final[held].min())
        )
        _print_scores("identities calibration never saw", results["held_out"])
    c = results["cosine_int8_vs_fp32"]
    print(
        f"\ncosine int8 vs fp32 over {c['faces']} faces: final 129-d min {c['final_129d']['min']:.4f} "
        f"mean {c['final_129d']['mean']:.5f} ({c['final_129d']['below_0.99']} below 0.99); raw 128-d min "
        f"{c['raw_128d']['min']:.4f} mean {c['raw_128d']['mean']:.5f} ({c['raw_128d']['below_0.99']} below 0.99)"
    )
    nc = results["noise_control"]
    print(
        f"noise control ({nc['seeds']} seeds of random noise giving float32 the int8 mean error): "
        + ", ".join(f"{k} {lo:+.4f}..{hi:+.4f}" for k, (lo, hi) in nc["delta_ranges"].items())
    )
    print(f"guard held (all identities): {results['guard_held']}")
    if "held_out" in results:
        print(f"guard held (identities calibration never saw): {results['held_out']['guard_held']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
