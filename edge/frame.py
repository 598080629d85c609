"""The records that flow through the unit: Frame -> Face -> Match -> Hit.

Each checks its shapes on construction, so a bad value fails where it is made,
not three threads later.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

import numpy as np


class RecordError(ValueError):
    """A record was built with a value of the wrong shape, type or range."""


def _check_box(box: tuple[float, float, float, float], what: str) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise RecordError(f"{what}: box must be (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise RecordError(f"{what}: box must have x2 > x1 and y2 > y1 and finite values, got {box!r}")
    return (x1, y1, x2, y2)


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
            raise RecordError(
                f"camera {self.camera_id}: frame image must be a uint8 array of shape (H, W, 3), "
                f"got {getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}"
            )
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise RecordError(f"camera {self.camera_id}: frame image is empty ({img.shape})")

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True)
class Face:
    """A face found in a frame: where it is, its landmarks, and (once embedded) its embedding."""

    camera_id: str
    frame_seq: int
    captured_at: float
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray  # (5, 2) float32, in frame pixels
    track_id: int = -1
    quality: float = 0.0
    embedding: np.ndarray | None = None  # (D,) float32, unit length

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", _check_box(self.box, f"camera {self.camera_id} face"))
        lm = np.asarray(self.landmarks, dtype=np.float32)
        if lm.shape != (5, 2):
            raise RecordError(f"camera {self.camera_id}: face landmarks must have shape (5, 2), got {lm.shape}")
        object.__setattr__(self, "landmarks", lm)
        if self.embedding is not None:
            emb = np.asarray(self.embedding, dtype=np.float32)
            if emb.ndim != 1 or emb.size == 0 or not np.all(np.isfinite(emb)):
                raise RecordError(
                    f"camera {self.camera_id}: face embedding must be a finite 1-d vector, got shape {emb.shape}"
                )
            object.__setattr__(self, "embedding", emb)


@dataclass(frozen=True)
class Match:
    """The best watchlist person for one embedded face, and how far ahead of the next one they are."""

    person_id: str
    score: float  # cosine similarity of the best template, in [-1, 1]
    threshold: float  # the threshold that applied to this person
    second_score: float  # best score of any other person (-1 when there is none)

    def __post_init__(self) -> None:
        if not self.person_id:
            raise RecordError("match: person_id must not be empty")
        for name in ("score", "threshold", "second_score"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or not -1.0001 <= v <= 1.0001:
                raise RecordError(f"match for {self.person_id}: {name} must be a cosine similarity in [-1, 1], got {v}")

    @property
    def margin(self) -> float:
        return float(self.score - self.second_score)

    @property
    def is_hit(self) -> bool:
        return self.score >= self.threshold


@dataclass(frozen=True)
class Hit:
    """A match worth an operator's attention; what the unit reports."""

    unit_id: str
    camera_id: str
    captured_at: float
    person_id: str
    score: float
    threshold: float
    margin: float
    box: tuple[float, float, float, float]
    model_id: str
    watchlist_version: int
    track_id: int = -1
    crop_jpeg: bytes | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        for name in ("unit_id", "camera_id", "person_id", "model_id", "id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RecordError(f"hit: {name} must be a non-empty string, got {getattr(self, name)!r}")
        object.__setattr__(self, "box", _check_box(self.box, f"hit {self.id}"))
        if self.crop_jpeg is not None and not bytes(self.crop_jpeg[:3]) == b"\xff\xd8\xff":
            raise RecordError(f"hit {self.id}: crop_jpeg must be JPEG bytes (starting FF D8 FF)")
        if not math.isfinite(self.captured_at) or self.captured_at <= 0:
            raise RecordError(f"hit {self.id}: captured_at must be seconds since the epoch, got {self.captured_at}")
        if int(self.watchlist_version) < 0:
            raise RecordError(f"hit {self.id}: watchlist_version must be >= 0")
