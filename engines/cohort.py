"""Photos of distinct people, one folder per identity, embedded one face per photo.

Used to measure how a model scores strangers (`engines calibrate`) and by the accuracy benchmarks.
A folder's photos may sit in subfolders (the LAG layout keeps young photos in `<identity>/y/`):
every photo under an identity's folder belongs to that identity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.errors import ImageError

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class CohortError(ValueError):
    """A folder of identities cannot be used as a cohort (missing, empty, too few people)."""


@dataclass(frozen=True)
class CohortPhoto:
    path: Path
    identity: str
    young: bool  # True for photos in a LAG-layout `y/` subfolder


def list_cohort(root: str | Path, min_identities: int = 2) -> list[CohortPhoto]:
    """Every photo under `root`, labelled with its identity (the first folder level), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise CohortError(f"{root}: no such folder; give a folder holding one subfolder of photos per person")
    photos = []
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(ident.rglob("*")):
            if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES:
                photos.append(CohortPhoto(f, ident.name, f.parent.name == "y" and f.parent != ident))
    people = {p.identity for p in photos}
    if len(people) < min_identities:
        raise CohortError(
            f"{root}: found photos of {len(people)} people; needs at least {min_identities} "
            "(one subfolder of photos per person, each a different person)"
        )
    return photos


def _with_margins(image: np.ndarray) -> Iterator[np.ndarray]:
    """The image itself, then ways to give the detector room around a tight crop, tried in order."""
    import cv2

    yield image
    yield cv2.copyMakeBorder(image, 30, 30, 30, 30, cv2.BORDER_REFLECT_101)
    big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    yield cv2.copyMakeBorder(big, 60, 60, 60, 60, cv2.BORDER_REFLECT_101)
    yield cv2.copyMakeBorder(image, 50, 50, 50, 50, cv2.BORDER_CONSTANT, value=(128, 128, 128))


def central_face(engine, image: np.ndarray, tight: bool = False):
    """(image, detection) for the face nearest the centre of a photo, or None when no face is found.

    With `tight` (crops cut close around the face, as in LAG), the bare image is not tried: a
    margin is always added first, because detectors miss faces that touch the border.
    """
    tries = _with_margins(image)
    if tight:
        next(tries)
    for padded in tries:
        dets = engine.detect(padded)
        if dets:
            cy, cx = padded.shape[0] / 2, padded.shape[1] / 2
            best = min(
                dets, key=lambda d: ((d.box[0] + d.box[2]) / 2 - cx) ** 2 + ((d.box[1] + d.box[3]) / 2 - cy) ** 2
            )
            return padded, best
    return None


def stranger_scores(
    emb: np.ndarray, ok: np.ndarray, photos: list[CohortPhoto], block: int = 1024
) -> dict[str, np.ndarray]:
    """Cosine scores of every pair of photos of different people, per cohort.

    With young photos (LAG layout): "cross_age" (adult photo against young photo) and "adult_adult";
    otherwise "all" (every pair once). Photos without a face take no part.
    """
    idx = np.flatnonzero(ok)
    ident = np.array([photos[i].identity for i in idx])
    young = np.array([photos[i].young for i in idx], bool)
    X = emb[idx].astype(np.float32)

    def pairs(a: np.ndarray, b: np.ndarray, same_set: bool) -> np.ndarray:
        out = []
        for s in range(0, len(a), block):
            rows = a[s : s + block]
            S = X[rows] @ X[b].T
            keep = ident[rows][:, None] != ident[b][None, :]
            if same_set:
                keep &= rows[:, None] < b[None, :]
            out.append(S[keep])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    everyone = np.arange(len(idx))
    if young.any() and (~young).any():
        adults, youngs = everyone[~young], everyone[young]
        return {"cross_age": pairs(adults, youngs, False), "adult_adult": pairs(adults, adults, True)}
    return {"all": pairs(everyone, everyone, True)}


def calibrate_folder(
    folder: str | Path,
    config_path: str | Path | None = None,
    tight_crops: bool = False,
    command: str = "",
    note: str = "",
):
    """The Calibration of the engine that `config_path`'s [engine] table describes (defaults when None),
    measured on a folder of photos of strangers (one subfolder per person); `command` is recorded with it."""
    from engines.calibration import Calibration
    from engines.config import EngineConfig, load_engine_config
    from engines.face_engine import FaceEngine
    from engines.image import load_image

    config = load_engine_config(config_path) if config_path else EngineConfig()
    photos = list_cohort(folder)
    engine = FaceEngine.load(config)
    emb = np.zeros((len(photos), engine.embedding_dim), np.float32)
    ok = np.zeros(len(photos), bool)
    for i, p in enumerate(photos):
        try:
            img = load_image(p.path)
        except ImageError as exc:
            log.warning("skipping %s: %s", p.path, exc)
            continue
        found = central_face(engine, img, tight=tight_crops)
        if found is not None:
            emb[i] = engine.embed([found])[0]
            ok[i] = True
    scores = stranger_scores(emb, ok, photos)
    description = {
        "cohort": f"folder {Path(folder).name!r}: photos of distinct people, pairs of different people",
        "people": len({p.identity for p in photos}),
        "photos_used": int(ok.sum()),
        "photos_no_face": int((~ok).sum()),
        "model_id": engine.model_id,
        "command": command,
    }
    if note:
        description["note"] = note
    return Calibration.from_scores(engine.model_id.split(":", 1)[0], config.flip_average, scores, description)
