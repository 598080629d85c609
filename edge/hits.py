"""Turn matches into hits: once per (track, person), then quiet for that person on that camera.

A person who stands in front of a camera matches on many frames and, as tracks break and
restart, on several tracks. Operators need one alert per appearance, so a hit is emitted the
first time a track matches a person, and after that no hit for that person on that camera is
emitted until ``cooldown_s`` has passed since the last one. Time is the frames' capture time,
so the rule holds however far analysis lags behind.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np
from pydantic import Field

from common.config import StrictModel
from matching.match import Match
from wire.records import CANARY_PERSON_ID, Hit

log = logging.getLogger(__name__)


class CropConfig(StrictModel):
    """The pictures a hit carries (``[matching.crop]`` in the unit config): the face crop, and the
    context frame where it is turned on."""

    margin: float = Field(0.25, ge=0.0, le=2.0, description="margin around the face box, in box sizes")
    max_px: int = Field(256, ge=32, le=2048, description="longest side of the JPEG, pixels")
    jpeg_quality: int = Field(90, ge=30, le=100)
    # Off by default: the whole frame shows everyone else in view (docs/privacy.md says who should turn it on).
    context_frame: bool = Field(
        False,
        description="also send the whole frame, downscaled, with the face's box drawn (shows bystanders: see "
        "docs/privacy.md before turning it on)",
    )
    context_max_px: int = Field(640, ge=160, le=1920, description="longest side of the context frame, pixels")
    context_jpeg_quality: int = Field(75, ge=30, le=100)


class HitEmitter:
    """Decides which matches become hits and builds them. Thread-safe."""

    def __init__(self, unit_id: str, cooldown_s: float = 60.0, crop: CropConfig | None = None) -> None:
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.unit_id = unit_id
        self.cooldown_s = float(cooldown_s)
        self.crop = crop or CropConfig()
        self._lock = threading.Lock()
        self._hit_tracks: set[tuple[str, int, str]] = set()
        self._last_hit: dict[tuple[str, str], float] = {}
        self.suppressed = 0

    def offer(
        self,
        *,
        camera_id: str,
        track_id: int,
        match: Match,
        box: tuple[float, float, float, float],
        captured_at: float,
        image: np.ndarray | None,
        model_id: str,
        watchlist_version: int,
        stranger_rate: float | None = None,
    ) -> Hit | None:
        """Return a new Hit for this match, or None if it is below threshold, a repeat, or in cooldown.
        `stranger_rate`: the calibrated figure the hit carries (`stranger_rate()`), None when there is none.

        The hit is made before its cooldown is recorded, so one that cannot be made (a RecordError
        from an id the wire refuses) raises without silencing the person's later hits; a crop that
        cannot be cut or encoded is logged and the hit goes without it."""
        if not match.is_hit:
            return None
        track_key = (camera_id, track_id, match.person_id)
        person_key = (camera_id, match.person_id)
        with self._lock:
            if self._repeat(track_key, person_key, captured_at):
                return None
        crop = context = None
        if image is not None:
            try:
                crop = encode_crop(image, box, self.crop)
            except (ValueError, RuntimeError) as exc:
                log.warning("camera %s: hit for %r sent without a crop: %s", camera_id, match.person_id, exc)
            if self.crop.context_frame:
                try:
                    context = encode_context(image, box, self.crop)
                except (ValueError, RuntimeError) as exc:
                    log.warning(
                        "camera %s: hit for %r sent without a context frame: %s", camera_id, match.person_id, exc
                    )
        hit = Hit(
            unit_id=self.unit_id,
            camera_id=camera_id,
            captured_at=captured_at,
            person_id=match.person_id,
            score=float(match.score),
            threshold=float(match.threshold),
            margin=float(match.margin),
            box=box,
            model_id=model_id,
            watchlist_version=int(watchlist_version),
            track_id=track_id,
            crop_jpeg=crop,
            canary=match.person_id == CANARY_PERSON_ID,
            stranger_rate=stranger_rate,
            context_jpeg=context,
        )
        with self._lock:
            # Another thread may have hit the same person while the crop was encoded.
            if self._repeat(track_key, person_key, captured_at):
                return None
            self._hit_tracks.add(track_key)
            self._last_hit[person_key] = captured_at
            self._prune(captured_at)
        return hit

    def _repeat(self, track_key: tuple[str, int, str], person_key: tuple[str, str], captured_at: float) -> bool:
        """Whether this track already hit this person, or the person is in cooldown at this camera
        (then the track is remembered, so its later frames are not weighed again). Under the lock."""
        if track_key in self._hit_tracks:
            return True
        last = self._last_hit.get(person_key)
        # The canary comes back every interval on purpose; once per track is its only limit.
        if last is not None and captured_at - last < self.cooldown_s and person_key[1] != CANARY_PERSON_ID:
            self._hit_tracks.add(track_key)
            self.suppressed += 1
            return True
        return False

    def forget_track(self, camera_id: str, track_id: int) -> None:
        """Drop what is remembered about a track that ended (its person cooldowns stay)."""
        with self._lock:
            self._hit_tracks = {k for k in self._hit_tracks if not (k[0] == camera_id and k[1] == track_id)}

    def _prune(self, now: float) -> None:
        stale = [k for k, t in self._last_hit.items() if now - t >= self.cooldown_s]
        for k in stale:
            del self._last_hit[k]


def stranger_rate(calibration: Any, score: float, persons: int, templates: int) -> float | None:
    """The share of faces of people not on the list that score at least `score` against someone on a
    list of `persons` persons holding `templates` templates, by the model's `calibration`
    (engines.calibration.Calibration; its worst cohort): the expected false-alert rate per face were
    `score` the threshold. None without a calibration or a list, or where the calibration cannot place it.

    The whole list's rate, not the matched person's alone: the unit compared the face with every
    person on the list, so a stranger reaches this score against *someone* about `persons` times as
    often as against one given person, and the smaller figure would overstate the evidence."""
    if calibration is None or persons < 1:
        return None
    try:
        rate = calibration.expected_rates(float(score), persons, max(1.0, templates / persons)).fpir
    except Exception as exc:  # the figure is an aid: the hit goes without it rather than not at all
        log.warning("hit sent without a calibrated stranger rate: %s: %s", type(exc).__name__, exc)
        return None
    # Clamped into the wire's [0, 1]: the figure comes from interpolated logarithms.
    return min(1.0, max(0.0, float(rate))) if math.isfinite(rate) else None


def crop_box(
    shape: tuple[int, ...], box: tuple[float, float, float, float], margin: float
) -> tuple[int, int, int, int]:
    """The face box grown by `margin` box sizes on each side and clipped to the image, as ints."""
    h, w = int(shape[0]), int(shape[1])
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    cx1, cy1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
    cx2, cy2 = min(w, int(np.ceil(x2 + mx))), min(h, int(np.ceil(y2 + my)))
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"face box {box} lies outside the {w}x{h} image")
    return cx1, cy1, cx2, cy2


def encode_crop(image: np.ndarray, box: tuple[float, float, float, float], config: CropConfig) -> bytes:
    """JPEG bytes of the face (with margin) cut from an RGB uint8 image."""
    import cv2

    from engines.image import encode_jpeg

    x1, y1, x2, y2 = crop_box(image.shape, box, config.margin)
    crop = image[y1:y2, x1:x2]
    longest = max(crop.shape[0], crop.shape[1])
    if longest > config.max_px:
        s = config.max_px / longest
        crop = cv2.resize(
            crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))), interpolation=cv2.INTER_AREA
        )
    return encode_jpeg(crop, config.jpeg_quality)


CONTEXT_BOX_RGB = (255, 48, 32)
"""The face's box on a context frame: a red that stays visible on grey station scenes."""


def encode_context(image: np.ndarray, box: tuple[float, float, float, float], config: CropConfig) -> bytes:
    """JPEG bytes of the whole RGB uint8 frame, downscaled to `context_max_px` on its longest side,
    with the face's `box` drawn: what stood around the face (clothing, companions) for the operator."""
    import cv2

    from engines.image import encode_jpeg

    h, w = int(image.shape[0]), int(image.shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"no frame to send as context ({w}x{h})")
    s = min(1.0, config.context_max_px / max(h, w))
    frame = image
    if s < 1.0:
        frame = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    else:
        frame = image.copy()  # drawn on: never the camera's own frame, which other hits may still use
    x1, y1, x2, y2 = (round(v * s) for v in box)
    thick = max(2, round(max(frame.shape[:2]) / 320))
    cv2.rectangle(frame, (x1, y1), (x2, y2), CONTEXT_BOX_RGB, thick)
    return encode_jpeg(frame, config.context_jpeg_quality)
