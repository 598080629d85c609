"""What flows between a camera's analysis and the embedder: a track's face to embed, why that face,
and the track's evidence once it is embedded."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from edge.frame import Frame


@dataclass(frozen=True)
class Candidate:
    """A detected face kept by a track: the frame it is in and the engine's detection."""

    frame: Frame
    detection: Any
    quality: float
    rejected: str = ""  # why the face may not be embedded ("" when it may)


class EmbedReason(Enum):
    """Why a track's face is embedded now; the value is how the log and the track's story say it."""

    FIRST = "first face"
    MORE_FACES = "more faces for the track's mean"
    BETTER = "better face"
    CHANGE = "re-check"  # the tracker saw a sign of another person (the request's detail says which)
    PERIODIC = "re-check: periodic"

    @property
    def is_recheck(self) -> bool:
        """Whether the embedding checks a track that is still there, rather than adding to its budget."""
        return self in (EmbedReason.CHANGE, EmbedReason.PERIODIC)


@dataclass(frozen=True)
class EmbedRequest:
    """A track's face sent to the embedder, and why this face."""

    camera_id: str
    track_id: int
    candidate: Candidate
    reason: EmbedReason = EmbedReason.FIRST
    detail: str = ""  # what the tracker saw, for EmbedReason.CHANGE ("gap 0.40 s")

    @property
    def why(self) -> str:
        """The reason in words: ``first face``, ``re-check: gap 0.40 s`` ..."""
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


@dataclass(frozen=True)
class Evidence:
    """What a track has shown after one more embedding: its probe (the mean of its best faces) and how many."""

    track_id: int  # the track the face belongs to now (a new one when it was split off)
    faces: int
    probe: np.ndarray  # unit length
    split_from: int | None = None

    def __post_init__(self) -> None:
        if self.faces < 1 or np.ndim(self.probe) != 1:
            raise ValueError(
                f"evidence of track {self.track_id}: {self.faces} faces, probe of shape {np.shape(self.probe)}"
            )
