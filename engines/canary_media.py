"""The canary's pictures: a public-domain photo fetched from a pinned package, never committed.

The canary person is scikit-image's astronaut photo (Eileen Collins, NASA, public domain), as the
wheel of scikit-image `CANARY_PICTURE.version` ships it at `CANARY_PICTURE.member`. The picture is
pinned by the SHA-256 of the extracted file (the same PNG is in every platform's wheel), so it is
taken from wherever it is found -- a wheel copied by hand (`engines build --models-from DIR`), the
installed scikit-image, or a wheel `pip download` fetches -- and refused when its bytes differ.
`engines build` puts it into the cache (``<cache>/canary/``), the unit and HQ's `watchlist
enrol-canary` read it from there. docs/edge.md, "The canary", says what the unit does with it.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import atomic_write
from engines.errors import ModelError

log = logging.getLogger(__name__)

# pip download of one wheel without dependencies; a stuck index should not hang the installer.
PIP_TIMEOUT_S = 600
# The picture is 0.8 MB; anything far larger in its place is not it.
MAX_PICTURE_BYTES = 8 << 20
# The frames the unit feeds its pipeline: a camera's size, the photo's height in it, and how far
# (pixels, scale) each frame moves it, so detection, quality and tracking see a moving face.
FRAME_SIZE = (1280, 720)
PHOTO_HEIGHT_PX = 420
STEP_PX = 6
STEP_SCALE = 0.01


class CanaryPictureError(ModelError):
    """The canary's picture could not be found or is not the pinned one; the message says what to do."""


@dataclass(frozen=True)
class PinnedPicture:
    """A picture inside a pinned PyPI package."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted file

    @property
    def cache_name(self) -> str:
        return f"{Path(self.member).stem}-{self.sha256[:16]}{Path(self.member).suffix}"


CANARY_PICTURE = PinnedPicture(
    package="scikit-image",
    version="0.26.0",
    member="skimage/data/astronaut.png",
    sha256="88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
)


def cached_picture_path(cache_dir: Path, picture: PinnedPicture = CANARY_PICTURE) -> Path:
    """Where `engines build` keeps the picture."""
    return Path(cache_dir) / "canary" / picture.cache_name


def _checked(data: bytes, picture: PinnedPicture, source: str) -> bytes | None:
    digest = hashlib.sha256(data).hexdigest()
    if digest == picture.sha256:
        return data
    log.warning("%s: %s has SHA-256 %s, not the pinned %s; not used", source, picture.member, digest, picture.sha256)
    return None


def _from_wheel(wheel: Path, picture: PinnedPicture) -> bytes | None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(picture.member)
            if info.file_size > MAX_PICTURE_BYTES:
                return None
            return _checked(zf.read(info), picture, str(wheel))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("%s: cannot take %s out of it: %s", wheel, picture.member, exc)
        return None


def _wheel_glob(picture: PinnedPicture) -> str:
    return f"{picture.package.replace('-', '_')}-{picture.version}-*.whl"


def _from_installed(picture: PinnedPicture) -> bytes | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(picture.package)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(picture.member)))
    try:
        if path.stat().st_size > MAX_PICTURE_BYTES:
            return None
        return _checked(path.read_bytes(), picture, f"installed {picture.package} {dist.version}")
    except OSError:
        return None


def _from_pip(picture: PinnedPicture) -> bytes | None:
    with tempfile.TemporaryDirectory(prefix="checkpoint-canary-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            tmp,
            f"{picture.package}=={picture.version}",
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CanaryPictureError(f"`{' '.join(cmd[2:])}` did not run: {exc}") from exc
        if done.returncode != 0:
            raise CanaryPictureError(
                f"`pip download {picture.package}=={picture.version}` failed: {done.stderr.strip()[-400:]}; on a "
                f"machine without the package index copy a {_wheel_glob(picture)} into a folder and give "
                "--models-from FOLDER"
            )
        for wheel in sorted(Path(tmp).glob(_wheel_glob(picture))):
            data = _from_wheel(wheel, picture)
            if data is not None:
                return data
    return None


def ensure_canary_picture(
    cache_dir: Path, *, models_from: Path | None = None, fetch: bool = True, picture: PinnedPicture = CANARY_PICTURE
) -> Path:
    """The cached canary picture, put there first if missing: from a wheel in `models_from`, the
    installed package, or (`fetch`) `pip download`. Raises CanaryPictureError naming what to do."""
    path = cached_picture_path(cache_dir, picture)
    if path.is_file() and _checked(path.read_bytes(), picture, str(path)) is not None:
        return path
    data = None
    if models_from is not None:
        for wheel in sorted(Path(models_from).glob(_wheel_glob(picture))):
            data = data or _from_wheel(wheel, picture)
    data = data or _from_installed(picture)
    if data is None and fetch:
        data = _from_pip(picture)
    if data is None:
        where = f"no {_wheel_glob(picture)} in {models_from} holds it, " if models_from else ""
        raise CanaryPictureError(
            f"the canary picture ({picture.member} of {picture.package} {picture.version}, SHA-256 "
            f"{picture.sha256[:16]}...) is not in the cache {path.parent}: {where}run `engines build` "
            "(or `engines build --models-from FOLDER` with that wheel in FOLDER)"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise CanaryPictureError(f"cannot write the canary picture to {path}: {exc}; make the cache writable") from exc
    log.info("canary picture %s cached at %s", picture.member, path)
    return path


def load_canary_picture(path: Path, picture: PinnedPicture = CANARY_PICTURE) -> np.ndarray:
    """The picture as RGB uint8, after checking its bytes against the pin once more."""
    import cv2

    data = path.read_bytes()
    if _checked(data, picture, str(path)) is None:
        raise CanaryPictureError(f"{path} is not the pinned canary picture: delete it and run `engines build`")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:  # the pinned bytes: only an OpenCV built without its PNG codec gets here
        raise CanaryPictureError(f"{path}: this OpenCV cannot decode the canary picture (a PNG)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def enrolment_pictures(photo: np.ndarray) -> list[np.ndarray]:
    """What HQ enrols the canary person from: the photo and its mirror image (two templates)."""
    return [np.ascontiguousarray(photo), np.ascontiguousarray(photo[:, ::-1])]


def canary_frames(photo: np.ndarray, n: int = 5) -> list[np.ndarray]:
    """`n` camera-sized frames of the photo on a grey ground, each moved and scaled a little further,
    so the unit's detector, quality gate and tracker work on them as on a person walking by."""
    import cv2

    width, height = FRAME_SIZE
    frames = []
    for i in range(n):
        scale = PHOTO_HEIGHT_PX * (1.0 + STEP_SCALE * i) / photo.shape[0]
        pic = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        frame = np.full((height, width, 3), 118, np.uint8)
        x, y = 360 + STEP_PX * i, (height - pic.shape[0]) // 2
        h, w = min(pic.shape[0], height - y), min(pic.shape[1], width - x)
        frame[y : y + h, x : x + w] = pic[:h, :w]
        frames.append(frame)
    return frames
