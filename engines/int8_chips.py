"""Face chips to calibrate an int8 embedder with, made without the evaluation data.

Static quantisation needs the range of every activation on inputs like the real ones: aligned
face chips. The default source is the public-domain photos shipped with scikit-image that hold a
frontal face (`astronaut`, Eileen Collins; `camera`, the cameraman), each turned into many
different chips by random jitter: rotation, scale and shift of the photo before detection (so the
detector, landmarks and alignment run as they do on a camera frame), mirror images, brightness,
contrast, gamma, colour cast, blur and sensor noise. An operator can give a folder of their own
face photos instead (more people calibrate better).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engines.errors import ModelError

log = logging.getLogger(__name__)

# Bump when the chips made from the same photos change, so cached int8 models are made again.
CHIPS_VERSION = 2
PUBLIC_DOMAIN_PHOTOS = ("astronaut", "camera")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Detect = Callable[[np.ndarray], Sequence]
Align = Callable[[np.ndarray, Sequence], np.ndarray]


def public_domain_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-image's public-domain photos with a face, as RGB uint8."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ModelError(
            "int8 calibration needs face photos: install scikit-image (`pip install scikit-image`) for its "
            "public-domain photos, or set engine.int8_calibration_photos to a folder of face photos"
        ) from exc
    photos = []
    for name in PUBLIC_DOMAIN_PHOTOS:
        img = getattr(data, name)()
        photos.append((name, np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]))
    return photos


def folder_photos(folder: Path, limit: int = 256) -> list[tuple[str, np.ndarray]]:
    """Up to `limit` images found under `folder` (recursively), evenly spread over them in path
    order, as (relative path, RGB uint8): many people calibrate better than many copies of few."""
    from engines.image import load_image

    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
    if not paths:
        raise ModelError(
            f"engine.int8_calibration_photos: no images ({', '.join(_IMAGE_SUFFIXES)}) under {folder}; "
            "give a folder of face photos"
        )
    if len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    return [(str(p.relative_to(folder)), load_image(p)) for p in paths]


def photos_key(photos: Sequence[tuple[str, np.ndarray]], count: int, seed: int) -> str:
    """A short key for the chips these photos give, for naming the cached int8 model."""
    h = hashlib.sha256(f"chips-v{CHIPS_VERSION}:{count}:{seed}".encode())
    for name, img in photos:
        h.update(name.encode())
        h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()[:12]


def public_photos_key(count: int, seed: int) -> str:
    """`photos_key` of the public-domain set, from the photos' names: scikit-image ships them
    unchanged, and a unit with the int8 model already cached then needs no scikit-image."""
    h = hashlib.sha256(f"chips-v{CHIPS_VERSION}:{count}:{seed}:skimage:{','.join(PUBLIC_DOMAIN_PHOTOS)}".encode())
    return h.hexdigest()[:12]


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly moved, mirrored and relit copy of an RGB uint8 photo, with a mirrored margin
    of a fifth of its size on every side (tightly cropped faces need one to be detected)."""
    import cv2

    m = max(image.shape[:2]) // 5
    image = cv2.copyMakeBorder(image, m, m, m, m, cv2.BORDER_REFLECT_101)
    h, w = image.shape[:2]
    centre = (w / 2 + rng.uniform(-0.04, 0.04) * w, h / 2 + rng.uniform(-0.04, 0.04) * h)
    m = cv2.getRotationMatrix2D(centre, rng.uniform(-15, 15), rng.uniform(0.6, 1.3))
    out = cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    f = out.astype(np.float32) * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40)
    f = 255 * (np.clip(f, 0, 255) / 255) ** rng.uniform(0.7, 1.4)
    f *= rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    if rng.random() < 0.3:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.5, 2.0))
    if rng.random() < 0.3:
        f += rng.normal(0, rng.uniform(2, 8), f.shape).astype(np.float32)
    return np.clip(f, 0, 255).astype(np.uint8)


def calibration_chips(
    photos: Sequence[tuple[str, np.ndarray]], detect: Detect, align: Align, count: int = 256, seed: int = 0
) -> np.ndarray:
    """`count` aligned chips (N, H, W, 3) uint8 from jittered copies of `photos`, taken in turn.

    detect(image) -> detections and align(image, detections) -> chips are the engine's own, so
    the chips are what the embedder sees on a unit. Jittered copies in which no face is found
    are skipped; a photo that gives no face at all is an error.
    """
    if not photos:
        raise ModelError("int8 calibration needs at least one face photo")
    rng = np.random.default_rng(seed)
    chips: list[np.ndarray] = []
    tries = [0] * len(photos)
    found = [0] * len(photos)
    turn = 0
    while len(chips) < count:
        i = turn % len(photos)
        turn += 1
        name, img = photos[i]
        if tries[i] >= 20 and found[i] == 0:
            raise ModelError(f"int8 calibration photo {name!r}: no face found in 20 jittered copies; remove it")
        tries[i] += 1
        moved = jitter(img, rng)
        dets = detect(moved)
        if dets:
            found[i] += 1
            chips.append(align(moved, [dets[0]])[0])
    log.info("made %d calibration chips from %d photos", len(chips), len(photos))
    return np.stack(chips)
