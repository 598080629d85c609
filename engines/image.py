"""Loading and checking the images the engine works on: RGB, uint8, (H, W, 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.errors import ImageError


def check_image(image: object, what: str = "image") -> np.ndarray:
    """Return `image` if it is an RGB uint8 array of shape (H, W, 3); raise ImageError naming the problem."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{what}: expected a numpy array (H, W, 3) of uint8 RGB, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(
            f"{what}: expected dtype uint8, got {image.dtype}; convert with np.clip(img, 0, 255).astype(np.uint8)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            f"{what}: expected shape (H, W, 3) RGB, got {image.shape}; convert greyscale/RGBA to RGB first"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{what}: image is empty ({image.shape})")
    return image


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file into an RGB uint8 array; raise ImageError if it is missing or unreadable.

    Example: ``img = load_image("photos/case-1041.jpg")``
    """
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such image file")
    data = np.fromfile(str(p), dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{p}: file is empty")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(
            f"{p}: not a readable image (JPEG, PNG, BMP, TIFF, WebP); the file may be corrupt or truncated"
        )
    return np.ascontiguousarray(bgr[:, :, ::-1])


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 image as JPEG bytes."""
    import cv2

    check_image(image)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageError("could not encode image as JPEG")
    return buf.tobytes()
