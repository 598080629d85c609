"""Test clips composed from real face images, encoded as H.264 into temporary folders.

Faces come from the licensed evaluation set (../shared/data/lag-dev, read at test time only, never
copied into the repository) where present, otherwise from scikit-image's astronaut photo (public
domain, ships with scikit-image).

    from testing.media import astronaut_face, make_face_clip
    clip = make_face_clip(tmp_path / "walk.mp4",
                          [(astronaut_face(), 1.0, 4.0, 500, 200, 220)],   # image, from s, to s, x, y, height px
                          size=(1280, 720), fps=10, seconds=6)
"""

from __future__ import annotations

import os
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DATA_DIR = pathlib.Path(
    os.environ.get("CHECKPOINT_DATA") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
)
"""The evaluation data: ../shared/data beside the checkout, or the folder CHECKPOINT_DATA names. CI
points it at an empty folder for a second pass of the tests whose people come from it, so the
fallback to scikit-image's photos that a fresh machine takes is tested too."""
LAG_DIR = DATA_DIR / "lag-dev"

# (image RGB uint8 or path, appear_from_s, appear_to_s, x, y, height_px); x, y is the top-left corner.
FacePlacement = tuple["np.ndarray | str | pathlib.Path", float, float, int, int, int]


class ClipError(ValueError):
    """A clip could not be composed from the given faces and sizes."""


def load_rgb(image: np.ndarray | str | pathlib.Path) -> np.ndarray:
    """An image as RGB uint8 (H, W, 3), from an array or an image file."""
    if isinstance(image, np.ndarray):
        arr = image
    else:
        from PIL import Image

        with Image.open(image) as im:
            arr = np.asarray(im.convert("RGB"))
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ClipError(f"face image must be RGB uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def astronaut_face() -> np.ndarray:
    """The face of scikit-image's astronaut photo (Eileen Collins, NASA, public domain), loosely cropped."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[0:250, 115:335])


def lfw_face(index: int, height: int = 220, flip: bool = False) -> np.ndarray:
    """Face `index` (0-99) of the Labeled Faces in the Wild subset that ships with scikit-image
    (``skimage.data.lfw_subset``: 25x25 grey crops), as RGB, scaled up to `height` px with a margin
    of repeated border so a detector sees head and background. `flip`: mirrored (a second rendering
    of the same person, e.g. to enrol from)."""
    import cv2
    from skimage import data

    faces = data.lfw_subset()
    if not 0 <= index < 100:
        raise ClipError(f"lfw_subset holds faces 0-99 (100-199 are not faces), got {index}")
    grey = np.round(faces[index] * 255).astype(np.uint8)
    if flip:
        grey = grey[:, ::-1]
    inner = round(height / 1.6)
    grey = cv2.resize(grey, (inner, inner), interpolation=cv2.INTER_CUBIC)
    m = (height - inner) // 2
    grey = cv2.copyMakeBorder(grey, m, m, m, m, cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(np.stack([grey] * 3, axis=-1))


def walk(
    image: np.ndarray | str | pathlib.Path,
    t0: float,
    t1: float,
    x0: int,
    x1: int,
    y: int,
    height: int,
    fps: int,
) -> list[FacePlacement]:
    """Placements of a face walking from x0 to x1 between t0 and t1, a step per frame (for make_face_clip)."""
    n = max(1, round((t1 - t0) * fps))
    img = load_rgb(image)
    # Half a frame early: frame i is shown at i / fps, and float sums of steps must not fall between frames.
    half = 0.5 / fps
    return [
        (img, t0 + k / fps - half, t0 + (k + 1) / fps - half, round(x0 + (x1 - x0) * k / max(1, n - 1)), y, height)
        for k in range(n)
    ]


def astronaut() -> np.ndarray:
    """The whole astronaut photo (512x512 RGB), face and shoulders."""
    from skimage import data

    return data.astronaut()


@dataclass(frozen=True)
class LagPerson:
    """One identity of the cross-age set: young (child) photos and adult photos, as file paths."""

    name: str
    young: tuple[pathlib.Path, ...]
    adult: tuple[pathlib.Path, ...]


def lag_people(n: int, seed: int = 0, lag_dir: pathlib.Path = LAG_DIR) -> list[LagPerson]:
    """`n` identities of lag-dev that have both young and adult photos, chosen reproducibly by `seed`.

    Returns [] where the evaluation data is absent; callers fall back to `astronaut_face()` or skip.
    """
    if not lag_dir.is_dir():
        return []
    people = []
    for d in sorted(p for p in lag_dir.iterdir() if p.is_dir()):
        # The twins' photos show two people under one name: no use as a single identity.
        if "olsen" in d.name:
            continue
        young = tuple(sorted((d / "y").glob("*.png")))
        adult = tuple(sorted(d.glob("*.png")))
        if young and adult:
            people.append(LagPerson(d.name, young, adult))
    random.Random(seed).shuffle(people)
    return people[:n]


def with_margin(image: np.ndarray, margin: float = 0.4) -> np.ndarray:
    """`image` with `margin` x its size added on each side by repeating its border.

    lag-dev crops are tight around the face; detectors want some head and background around it.
    """
    import cv2

    img = load_rgb(image)
    dy, dx = round(img.shape[0] * margin), round(img.shape[1] * margin)
    return cv2.copyMakeBorder(img, dy, dy, dx, dx, cv2.BORDER_REPLICATE)


def background(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A still scene without faces: smooth gradient with a few flat shapes (compresses well)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([90 + 60 * xx / w, 100 + 40 * yy / h, 120 - 30 * xx / w], axis=-1)
    img = base.astype(np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - w // 8)), int(rng.integers(0, h - h // 8))
        img[y0 : y0 + h // 8, x0 : x0 + w // 8] = rng.integers(40, 200, 3, dtype=np.uint8)
    return img


def _resize_to_height(img: np.ndarray, height: int) -> np.ndarray:
    import cv2

    width = max(1, round(img.shape[1] * height / img.shape[0]))
    interp = cv2.INTER_AREA if height < img.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(img, (width, height), interpolation=interp)


def compose_frame(bg: np.ndarray, faces: Sequence[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """`bg` with each (already sized) face pasted with its top-left corner at (x, y), clipped to the frame."""
    out = bg.copy()
    h, w = out.shape[:2]
    for face, x, y in faces:
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + face.shape[1], w), min(y + face.shape[0], h)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = face[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


def make_face_clip(
    path: str | pathlib.Path,
    faces: Sequence[FacePlacement],
    size: tuple[int, int] = (1280, 720),
    fps: int = 10,
    seconds: float = 6.0,
    keyframe_s: float = 1.0,
    seed: int = 0,
) -> pathlib.Path:
    """Encode an H.264 clip (mp4 or mkv by suffix, yuv420p) of a still scene where faces come and go.

    Each face is (image, appear_from_s, appear_to_s, x, y, height_px): shown from `appear_from_s`
    (inclusive) to `appear_to_s` (exclusive), its top-left corner at (x, y), scaled to `height_px`
    keeping its aspect. A key frame every `keyframe_s` lets RTSP clients start quickly.
    Returns the path.
    """
    import av

    path = pathlib.Path(path)
    w, h = size
    if w % 2 or h % 2 or w <= 0 or h <= 0:
        raise ClipError(f"size must be positive even numbers (yuv420p), got {size}")
    if fps <= 0 or seconds <= 0:
        raise ClipError(f"fps and seconds must be positive, got fps={fps} seconds={seconds}")
    placed = []
    for i, (image, t0, t1, x, y, height) in enumerate(faces):
        if height <= 0 or t1 <= t0:
            raise ClipError(f"face {i}: needs height_px > 0 and appear_to_s > appear_from_s, got {height}, {t0}..{t1}")
        placed.append((_resize_to_height(load_rgb(image), int(height)), float(t0), float(t1), int(x), int(y)))

    bg = background(size, seed)
    n_frames = max(1, round(seconds * fps))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        gop = max(1, round(keyframe_s * fps))
        stream.options = {"g": str(gop), "keyint_min": str(gop), "preset": "veryfast", "crf": "20", "bf": "0"}
        for i in range(n_frames):
            t = i / fps
            visible = [(f, x, y) for f, t0, t1, x, y in placed if t0 <= t < t1]
            frame = av.VideoFrame.from_ndarray(compose_frame(bg, visible), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
