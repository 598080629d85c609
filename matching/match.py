"""The matcher's answer for one embedded face."""

from __future__ import annotations

import math
from dataclasses import dataclass


class MatchError(ValueError):
    """A match was built with a value out of range."""


@dataclass(frozen=True)
class Match:
    """The best watchlist person for one embedded face, and how far ahead of the next one they are."""

    person_id: str
    score: float  # cosine similarity of the best template, in [-1, 1]
    threshold: float  # the threshold that applied to this person
    second_score: float  # best score of any other person (-1 when there is none)

    def __post_init__(self) -> None:
        if not self.person_id:
            raise MatchError("match: person_id must not be empty")
        for name in ("score", "threshold", "second_score"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or not -1.0001 <= v <= 1.0001:
                raise MatchError(f"match for {self.person_id}: {name} must be a cosine similarity in [-1, 1], got {v}")

    @property
    def margin(self) -> float:
        return float(self.score - self.second_score)

    @property
    def is_hit(self) -> bool:
        return self.score >= self.threshold
