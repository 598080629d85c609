"""The quality gate: is a detected face good enough to embed and match?

Four checks, each with a reason code when it fails:

- ``too_small``: eye distance (between the detector's eye centres) or box height below a floor;
  the embedder needs detail a few pixels cannot hold.
- ``blurred``: sharpness below a floor. Sharpness is the variance of the Laplacian of the face
  (a square over eyes, nose and mouth, resampled to 64x64 grey) divided by the grey-level
  variance of the same square, so it depends neither on the face's size nor its contrast.
- ``not_frontal``: yaw or pitch estimated from the 5 landmarks too large. Both are ratios, not
  angles: yaw is how far the nose tip sits from the eye-mouth midline, in eye distances
  (0 frontal, about +-0.5 in profile); pitch is how far down from the eye line to the mouth
  line the nose tip sits, minus its typical value for a level face.
- ``low_score``: the detector's own confidence below a floor.

`assess` also returns a scalar `score` in [0, 1] (higher = better) to choose the best face of
a track. Default thresholds come from bench/quality_thresholds.py on lag-dev (see
docs/alignment.md): each rejects clearly bad faces and all together reject under 1% of that set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from common.config import StrictModel
from engines.image import check_image

REASONS = ("too_small", "blurred", "not_frontal", "low_score")

# Side of the grey square sharpness is measured on, and its size relative to the face.
_PATCH = 64
_PATCH_PER_FACE = 1.6  # patch side / larger of (eye distance, eye-to-mouth distance)
# Where the score's size and sharpness factors reach 1, as multiples of their thresholds:
# twice the least eye distance; ten times the least sharpness (about lag-dev's median).
_GOOD_EYES = 2.0
_GOOD_SHARPNESS = 10.0
# Grey-level variance added before dividing, so a nearly flat patch does not score as sharp.
_VAR_FLOOR = 25.0


class QualityConfig(StrictModel):
    """Thresholds of the quality gate (the `[engine.quality]` table of the unit's TOML)."""

    min_eye_distance_px: float = Field(20.0, ge=0, description="least distance between the eye centres, pixels")
    min_face_height_px: float = Field(40.0, ge=0, description="least detector box height, pixels")
    min_sharpness: float = Field(0.015, ge=0, description="least sharpness (Laplacian variance / grey variance)")
    max_yaw: float = Field(0.50, gt=0, description="largest |yaw|: nose offset from the midline, in eye distances")
    max_pitch: float = Field(
        0.30, gt=0, description="largest |pitch|: nose height between eyes and mouth, minus the typical one"
    )
    typical_nose_height: float = Field(
        0.58, gt=0, lt=1, description="where the nose tip sits between eye line (0) and mouth line (1) in a level face"
    )
    min_detector_score: float = Field(0.85, ge=0, le=1, description="least detector confidence")


@dataclass(frozen=True)
class Quality:
    """The gate's verdict on one face, with what it measured."""

    ok: bool
    reasons: tuple[str, ...]  # from REASONS, empty when ok
    score: float  # in [0, 1], higher = better; for choosing the best face of a track
    eye_distance_px: float
    face_height_px: float
    sharpness: float
    yaw: float
    pitch: float
    detector_score: float
    # Each failed check in words, naming the measured value and the limit ("face 36.4 px, needs at least 40";
    # "blurred: sharpness 0.0102, needs at least 0.015"), for logs, `edge analyse` and enrolment reports: a bare "too small" says nothing to act on.
    failures: tuple[str, ...] = ()


def _ramp(value: float, threshold: float, good: float) -> float:
    """0 at nothing, 0.5 at the threshold, 1 from `good` up, linear in between."""
    if threshold <= 0:
        return 1.0
    if value < threshold:
        return 0.5 * max(value, 0.0) / threshold
    if value >= good:
        return 1.0
    return 0.5 + 0.5 * (value - threshold) / (good - threshold)


def face_geometry(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """(eye distance, eye-to-mouth distance, yaw, nose height) from MTCNN-order 5 landmarks.

    yaw: signed offset of the nose tip from the line through the eye and mouth midpoints,
    along the eye line, in eye distances. nose height: the nose tip's position from the eye
    line (0) to the mouth line (1) along that midline.
    """
    p = np.asarray(landmarks, dtype=np.float64)
    eyes = (p[0] + p[1]) / 2
    mouth = (p[3] + p[4]) / 2
    eye_dist = float(np.hypot(*(p[1] - p[0])))
    down = mouth - eyes
    mouth_dist = float(np.hypot(*down))
    if eye_dist < 1e-6 or mouth_dist < 1e-6:
        return eye_dist, mouth_dist, math.inf, math.inf
    uy = down / mouth_dist
    ux = np.array([uy[1], -uy[0]])  # perpendicular to the midline, pointing to the image right
    rel = p[2] - eyes
    return eye_dist, mouth_dist, float(rel @ ux) / eye_dist, float(rel @ uy) / mouth_dist


def sharpness(image: np.ndarray, landmarks: np.ndarray) -> float:
    """Variance of the Laplacian over grey-level variance on a 64x64 square over the face."""
    import cv2

    p = np.asarray(landmarks, dtype=np.float64)
    eye_dist, mouth_dist, _, _ = face_geometry(p)
    centre = ((p[0] + p[1]) / 2 + (p[3] + p[4]) / 2) / 2
    side = _PATCH_PER_FACE * max(eye_dist, mouth_dist, 1.0)
    x0, y0 = centre - side / 2
    # Cut the square (edges replicated where it leaves the image), then resample: area
    # averaging when shrinking so that large faces do not gain aliasing "detail".
    ix0, iy0 = int(math.floor(x0)), int(math.floor(y0))
    n = int(math.ceil(side)) + 1
    h, w = image.shape[:2]
    crop = image[max(iy0, 0) : min(iy0 + n, h), max(ix0, 0) : min(ix0 + n, w)]
    if crop.size == 0:
        return 0.0
    crop = cv2.copyMakeBorder(
        crop, max(-iy0, 0), max(iy0 + n - h, 0), max(-ix0, 0), max(ix0 + n - w, 0), cv2.BORDER_REPLICATE
    )
    grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    interp = cv2.INTER_AREA if n > _PATCH else cv2.INTER_LINEAR
    patch = cv2.resize(grey, (_PATCH, _PATCH), interpolation=interp).astype(np.float64)
    lap = cv2.Laplacian(patch, cv2.CV_64F)
    return float(lap.var() / (patch.var() + _VAR_FLOOR))


def assess(
    image: np.ndarray,
    box: Sequence[float],
    landmarks: np.ndarray,
    score: float,
    config: QualityConfig | None = None,
) -> Quality:
    """Judge one detected face: RGB uint8 image, detector box (x1, y1, x2, y2), its 5
    landmarks in MTCNN order and the detector's score."""
    cfg = config or QualityConfig()
    check_image(image, "quality input")
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise ValueError(f"landmarks must be a finite (5, 2) array in MTCNN order, got shape {lm.shape}")
    if len(box) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), got {box!r}")

    eye_dist, _, yaw, nose_height = face_geometry(lm)
    pitch = nose_height - cfg.typical_nose_height
    height = float(box[3]) - float(box[1])
    sharp = sharpness(image, lm)
    det = float(score)

    reasons, failures = [], []
    if eye_dist < cfg.min_eye_distance_px or height < cfg.min_face_height_px:
        reasons.append("too_small")
        if height < cfg.min_face_height_px:
            failures.append(f"face {height:.1f} px, needs at least {cfg.min_face_height_px:g}")
        if eye_dist < cfg.min_eye_distance_px:
            failures.append(f"eyes {eye_dist:.1f} px apart, needs at least {cfg.min_eye_distance_px:g}")
    if sharp < cfg.min_sharpness:
        reasons.append("blurred")
        failures.append(f"blurred: sharpness {sharp:.4f}, needs at least {cfg.min_sharpness:g}")
    if not (abs(yaw) <= cfg.max_yaw and abs(pitch) <= cfg.max_pitch):
        reasons.append("not_frontal")
        failures.append(
            f"not frontal: yaw {yaw:+.2f} (limit +-{cfg.max_yaw:g}), pitch {pitch:+.2f} (limit +-{cfg.max_pitch:g})"
        )
    if det < cfg.min_detector_score:
        reasons.append("low_score")
        failures.append(f"detector confidence {det:.2f}, needs at least {cfg.min_detector_score:g}")

    size_q = _ramp(eye_dist, cfg.min_eye_distance_px, _GOOD_EYES * cfg.min_eye_distance_px)
    sharp_q = _ramp(sharp, cfg.min_sharpness, _GOOD_SHARPNESS * cfg.min_sharpness)
    pose_q = 0.0
    if math.isfinite(yaw) and math.isfinite(pitch):
        pose_q = max(0.0, 1 - 0.5 * abs(yaw) / cfg.max_yaw) * max(0.0, 1 - 0.5 * abs(pitch) / cfg.max_pitch)
    total = float(np.clip(size_q * sharp_q * pose_q * min(max(det, 0.0), 1.0), 0.0, 1.0))
    return Quality(
        ok=not reasons,
        reasons=tuple(reasons),
        score=total,
        eye_distance_px=eye_dist,
        face_height_px=height,
        sharpness=sharp,
        yaw=yaw,
        pitch=pitch,
        detector_score=det,
        failures=tuple(failures),
    )
