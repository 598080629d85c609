"""A decoded camera picture, the first record of the unit's flow (Frame -> faces -> Match -> Hit).

It checks its shape on construction, so a bad value fails where it is made, not three threads later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class FrameError(ValueError):
    """A frame was built with an image of the wrong type or shape."""


@dataclass(frozen=True)
class Frame:
    """One decoded picture from a camera, RGB uint8 (H, W, 3)."""

    camera_id: str
    seq: int
    captured_at: float  # seconds since the epoch, UTC, when the unit received it
    image: np.ndarray

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise FrameError(
                f"camera {self.camera_id}: frame image must be a uint8 array of shape (H, W, 3), "
                f"got {getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}"
            )
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise FrameError(f"camera {self.camera_id}: frame image is empty ({img.shape})")

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])
