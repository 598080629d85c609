"""The cross-age protocol of ../shared/data/README.md: loading a LAG-layout folder and scoring it.

Layout: DIR/<identity>/*.png are adult probes, DIR/<identity>/y/*.png young (watchlist) photos.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lag-dev"


@dataclass(frozen=True)
class Photo:
    path: Path
    identity: str
    young: bool


def list_photos(root: Path) -> list[Photo]:
    """Every photo of a LAG-layout folder, adult and young, in a stable order."""
    photos: list[Photo] = []
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        photos += [Photo(f, ident.name, False) for f in sorted(ident.glob("*.png"))]
        photos += [Photo(f, ident.name, True) for f in sorted((ident / "y").glob("*.png"))]
    return photos


def require_data(root: Path) -> Path:
    """Exit with a clear message when the evaluation data is absent."""
    if not root.is_dir():
        sys.exit(
            f"needs evaluation data in the LAG layout at {root} (../shared/data/lag-dev beside the checkout); "
            "pass --data DIR"
        )
    return root


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float]:
    """True-accept rate at the threshold where the false-accept rate is `far`.

    The threshold is the smallest score that accepts at most far * len(impostor) impostors;
    missing faces score -inf and so are rejected at any threshold.
    """
    imp = np.sort(impostor)[::-1]
    allowed = int(np.floor(far * len(imp)))
    thr = imp[allowed] if allowed < len(imp) else -np.inf
    # Accept strictly above the (allowed+1)-th highest impostor score.
    tar = float(np.mean(genuine > thr)) if len(genuine) else 0.0
    return tar, float(thr)


def identification(scores: np.ndarray, truth: np.ndarray, ranks=(1, 5)) -> dict[int, float]:
    """Rank-k hit rates. scores: (probes, persons); truth: the true person column per probe
    (-1 where that person has no usable watchlist photo, which is always a miss)."""
    out = {}
    order = np.argsort(-scores, axis=1)
    for k in ranks:
        hit = [(t >= 0 and t in order[i, :k] and np.isfinite(scores[i, t])) for i, t in enumerate(truth)]
        out[k] = float(np.mean(hit)) if len(hit) else 0.0
    return out


def evaluate(photos: list[Photo], emb: list[np.ndarray | None], similarity) -> dict:
    """Verification and identification figures for one method.

    emb[i] is photo i's embedding or None where no face was found (a miss, never skipped).
    similarity(A (n, d), B (m, d)) -> (n, m) scores, higher = more alike.
    """
    adults = [i for i, p in enumerate(photos) if not p.young]
    youngs = [i for i, p in enumerate(photos) if p.young]
    dim = next(e.shape[0] for e in emb if e is not None)

    def stack(idx):
        ok = np.array([emb[i] is not None for i in idx])
        m = np.zeros((len(idx), dim), np.float32)
        for j, i in enumerate(idx):
            if emb[i] is not None:
                m[j] = emb[i]
        return m, ok

    A, a_ok = stack(adults)
    Y, y_ok = stack(youngs)
    S = similarity(A, Y).astype(np.float64)
    S[~a_ok, :] = -np.inf
    S[:, ~y_ok] = -np.inf
    a_id = np.array([photos[i].identity for i in adults])
    y_id = np.array([photos[i].identity for i in youngs])
    same = a_id[:, None] == y_id[None, :]
    genuine, impostor = S[same], S[~same]
    tars = {}
    thresholds = {}
    for key, far in (("1e-2", 1e-2), ("1e-3", 1e-3), ("1e-4", 1e-4)):
        tars[key], thresholds[key] = tar_at_far(genuine, impostor, far)
    persons = sorted(set(y_id))
    col = {p: j for j, p in enumerate(persons)}
    P = np.full((len(adults), len(persons)), -np.inf)
    for j, p in enumerate(persons):
        P[:, j] = S[:, y_id == p].max(axis=1)
    truth = np.array([col.get(i, -1) for i in a_id])
    ident = identification(P, truth)
    return {
        "tar_at_far": tars,
        "thresholds": thresholds,
        "rank1": ident[1],
        "rank5": ident[5],
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": int((~same).sum()),
        "probes": len(adults),
        "gallery_photos": len(youngs),
    }
