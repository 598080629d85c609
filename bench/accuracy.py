"""Cross-age accuracy on a LAG-layout folder, ours and the face_recognition package side by side.

Protocol (../shared/data/README.md): the watchlist holds every young photo, a person's template is
all of their young photos (score = best photo); probes are the adult photos; every (adult, young)
pair of one identity is genuine, every other pair an impostor. A photo where no face is found is a
miss. Our detector runs on each photo after a margin is added (the crops are tight); the peer is
run as in the data README's reference figures (face box = central 80% of the crop, 5-point landmarks).

Example:
    python bench/accuracy.py --data ../shared/data/lag-dev --json out/accuracy.json
    python bench/accuracy.py --config /etc/checkpoint/unit.toml --json out/accuracy-mymodel.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, Photo, evaluate, list_photos, require_data
from bench.machine import describe_machine, machine_summary


def run_ours(photos: list[Photo], flip: bool, config=None) -> tuple[list, dict]:
    """Our engine (the `[engine]` settings of `config`, defaults when None) on each photo's central face."""
    from engines.cohort import central_face
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine
    from engines.image import load_image

    engine = FaceEngine.load((config or EngineConfig()).model_copy(update={"flip_average": flip}))
    embs: list[np.ndarray | None] = []
    # An ensemble's members alone, on the same faces (their flip as the engine's flip_average).
    members: dict[str, list[np.ndarray | None]] = {m.name: [] for m in engine.members} if engine.is_ensemble else {}
    no_face = 0
    t_det = t_emb = 0.0
    for p in photos:
        img = load_image(p.path)
        t0 = time.perf_counter()
        found = central_face(engine, img, tight=True)
        t1 = time.perf_counter()
        t_det += t1 - t0
        if found is None:
            no_face += 1
            embs.append(None)
            for alone in members.values():
                alone.append(None)
            continue
        embs.append(engine.embed([found])[0])
        t_emb += time.perf_counter() - t1
        if members:
            for m, chips in zip(engine.members, engine.member_chips([found])):
                members[m.name].append(m.embedder.embed_chips(chips)[0])
    n = len(photos)
    return embs, {
        "members_embeddings": members,
        "no_face": no_face,
        "no_face_rate": no_face / n,
        "model_id": engine.model_id,
        "flip_average": flip,
        "detect_ms_per_image": 1000 * t_det / n,
        "embed_ms_per_face": 1000 * t_emb / max(1, n - no_face),
    }


def run_peer(photos: list[Photo]) -> tuple[list, dict] | None:
    try:
        import face_recognition
    except ImportError:
        return None
    from engines.image import load_image

    embs = []
    t0 = time.perf_counter()
    for p in photos:
        img = load_image(p.path)
        h, w = img.shape[:2]
        box = (int(0.1 * h), int(0.9 * w), int(0.9 * h), int(0.1 * w))  # top, right, bottom, left
        enc = face_recognition.face_encodings(img, known_face_locations=[box], num_jitters=1, model="small")
        embs.append(np.asarray(enc[0], np.float32) if enc else None)
    dt = time.perf_counter() - t0
    return embs, {
        "no_face": sum(e is None for e in embs),
        "faces_per_s": len(photos) / dt,
        "method": "face_recognition (dlib ResNet), box = central 80% of the crop, 5-point landmarks, Euclidean distance",
    }


def _cosine(A, B):
    return A @ B.T


def _neg_euclid(A, B):
    d2 = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2 * A @ B.T
    return -np.sqrt(np.maximum(d2, 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder in the LAG layout")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N identities (quick runs)")
    ap.add_argument(
        "--half", choices=("a", "b"), help="only one fixed half of the identities (bench/openset.py identity_half)"
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the face_recognition comparison")
    ap.add_argument("--config", type=Path, help="unit config file; its [engine] table is used (default: defaults)")
    args = ap.parse_args(argv)

    from bench.openset import select_half
    from engines.config import EngineConfig, EngineConfigError, load_engine_config

    try:
        config = load_engine_config(args.config) if args.config else EngineConfig()
    except EngineConfigError as exc:
        sys.exit(f"error: {exc}")

    root = require_data(args.data)
    photos = select_half(list_photos(root), args.half)
    if args.limit:
        keep = sorted({p.identity for p in photos})[: args.limit]
        photos = [p for p in photos if p.identity in keep]
    results: dict = {
        "data": str(root),
        "images": len(photos),
        "identities": len({p.identity for p in photos}),
        "identity_half": args.half or "all",
        "machine": describe_machine(),
        "citation": "S. Bianco, Large Age-Gap Face Verification by Feature Injection in Deep Networks, PRL 90, 2017",
    }
    rows = []
    for flip in (False, True):
        embs, info = run_ours(photos, flip, config)
        members = info.pop("members_embeddings")
        info.update(evaluate(photos, embs, _cosine))
        key = "ours_flip" if flip else "ours"
        results[key] = info
        rows.append((key, info))
        for name, alone in members.items():
            r = {"no_face": sum(e is None for e in alone), **evaluate(photos, alone, _cosine)}
            results.setdefault("members", {})[f"{name}{'_flip' if flip else ''}"] = r
            rows.append((f"{name}{' +flip' if flip else ''}", r))
    # The headline figures are the configuration's own flip setting; `ours_flip` / `ours` show the other.
    chosen = "ours_flip" if config.flip_average else "ours"
    for k in ("no_face", "tar_at_far", "rank1", "rank5"):
        results[k] = results[chosen][k]
    results["configuration"] = (
        f"{chosen}: engine config {'from ' + str(args.config) if args.config else 'defaults'}"
        f" (flip_average = {str(config.flip_average).lower()})"
    )
    if not args.no_peer:
        peer = run_peer(photos)
        if peer is None:
            print(
                "face_recognition is not installed: peer comparison skipped (pip install --no-deps face_recognition dlib-bin)"
            )
        else:
            embs, info = peer
            info.update(evaluate(photos, embs, _neg_euclid))
            results["peer_face_recognition"] = info
            rows.append(("face_recognition", info))

    print(f"\n{len(photos)} images, {results['identities']} identities ({root})")
    print(machine_summary(results["machine"]))
    print(f"{'method':<30}{'no_face':>8}{'TAR@1e-2':>10}{'TAR@1e-3':>10}{'TAR@1e-4':>10}{'rank-1':>8}{'rank-5':>8}")
    for name, r in rows:
        t = r["tar_at_far"]
        print(
            f"{name:<30}{r['no_face']:>8}{t['1e-2']:>10.3f}{t['1e-3']:>10.3f}{t['1e-4']:>10.3f}{r['rank1']:>8.3f}{r['rank5']:>8.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
