"""Where to look for faces on each analysed frame of a static camera (``[analysis.gating]``).

A checkpoint camera does not move, and most of its picture does not change between two analysed
frames; running the detector on all of it every time spends most of the unit's CPU on a wall. So
the whole frame is searched now and then (on schedule, on the first frame, after a gap, when much
of the picture changed), and otherwise only

  - where the picture differs from both of the camera's two previous analysed frames (grey, shrunk
    by `motion_scale`, absolute difference above `motion_threshold`, dilated): where something is
    now, and
  - around each face being followed (its last box and where it is heading, grown by about its size),

each region grown so a face in it is whole with context around it, overlapping regions merged into
disjoint rectangles (so one face is not found twice) and clipped to the frame. When the regions
would cover most of the frame, the whole frame is searched instead: cutting it up would cost more.
Regions holding only followed faces may be searched shrunk (`max_shrink`, off by default).

Followed faces are first confirmed where they are heading with the detector's last two stages alone
(`confirm_followed`): a face found so needs no region, motion close to it is its own, and the searches
(regions, or a scheduled whole frame) leave it out.

The planner holds two small grey images per camera and no threads; `detect_in_regions` runs any
detector on the crops and moves what it finds back into frame coordinates. docs/detector.md
("Motion and track gating") says what this may miss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from common.config import StrictModel
from edge.tracker import iou

# Capture times are floats: 1.2 - 0.2 is just under 1.0, and a full frame due must not wait a frame longer.
_SLACK_S = 0.001

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels, x2/y2 exclusive
Box = tuple[float, float, float, float]
# Looks for faces in an image at given boxes only: a detection (with .box and .score) or None per box.
Confirm = Callable[[np.ndarray, Sequence[Box]], Sequence[Any]]
# Boxes overlapping this much are taken for one face: two faces seldom overlap so, and a face that moved half
# its width between analysed frames still does.
_FOUND_IOU = 0.3
# Followed boxes this alike are asked about once.
_SAME_BOX_IOU = 0.8


class GatingConfig(StrictModel):
    """Where the detector runs on each analysed frame (``[analysis.gating]`` in the unit config)."""

    enabled: bool = Field(True, description="search only changed areas and followed faces between full-frame passes")
    full_frame_interval_s: float = Field(
        1.0, gt=0.0, le=60.0, description="the whole frame is searched at least this often (seconds of capture time)"
    )
    max_gap_s: float = Field(
        1.0, gt=0.0, le=60.0, description="a frame this long after the camera's previous analysed one is searched whole"
    )
    motion_scale: int = Field(
        8, ge=2, le=32, description="frames are compared shrunk by this factor (one grey cell per N x N pixels)"
    )
    motion_threshold: int = Field(
        12, ge=1, le=255, description="change of a cell's grey level (0-255) between two analysed frames that is motion"
    )
    max_motion_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="more of the frame changed than this (light change, camera moved): the whole frame is searched",
    )
    max_region_share: float = Field(
        0.6, gt=0.0, le=1.0, description="regions covering more of the frame than this: the whole frame is searched"
    )
    track_growth: float = Field(
        0.75, ge=0.5, le=5.0, description="a followed face's region: its box grown by this many face sizes on each side"
    )
    motion_growth: float = Field(
        0.5,
        ge=0.25,
        le=5.0,
        description="a changed area is grown on each side by this share of its smaller side, so a face in it has "
        "context around it",
    )
    track_missed_frames: int = Field(
        1,
        ge=0,
        le=100,
        description="a followed face keeps its region while it was missed on at most this many analysed frames "
        "in a row",
    )
    confirm_followed: bool = Field(
        True,
        description="look for each followed face first where it is heading with the detector's last two stages "
        "alone (one crop each), and search its region only when it is not found there",
    )
    own_motion_growth: float = Field(
        0.5,
        ge=0.0,
        le=5.0,
        description="motion wholly inside a confirmed face's box grown by this many face sizes on each side is taken "
        "for that face's own (a step, a turn of the head) and not searched",
    )
    min_region_px: int = Field(96, ge=48, le=4096, description="a region is at least this wide and high")
    max_shrink: float = Field(
        1.0,
        ge=1.0,
        le=8.0,
        description="a region holding only followed faces is searched shrunk, its smallest possible face down to "
        "the detector's smallest, by this factor at most (1: never; a small face next to a followed one may "
        "then wait for the next full frame)",
    )


@dataclass(frozen=True)
class Plan:
    """Where to detect on one frame: the whole frame (`full`) or `regions` (disjoint, maybe none)."""

    full: bool
    regions: tuple[Rect, ...]
    share: float  # of the frame's area searched
    reason: str  # why the whole frame, or "regions"
    # Per region, the factor it is shrunk by before the detector sees it (1: not shrunk).
    shrink: tuple[float, ...] = ()
    # Followed faces found again where they were heading (MtcnnDetector.confirm), in frame pixels.
    confirmed: tuple[Any, ...] = ()


class RegionPlanner:
    """Plans the detector's regions for one camera's analysed frames, in capture order. Not thread-safe:
    one camera, one caller at a time (the pipeline's slots see to that)."""

    def __init__(self, config: GatingConfig, min_face_size: int = 0, phase: float = 0.0) -> None:
        """`min_face_size`: the detector's smallest face, px, down to which regions of followed faces are
        shrunk (0: never shrink). `phase` (0 to 1): how far into its schedule this camera starts, so the
        cameras of one unit, started together, take their scheduled full frames in turn instead of all on
        the same round (the first scheduled one then comes `1 - phase` intervals after the first frame)."""
        if not 0.0 <= phase < 1.0:
            raise ValueError(f"phase must be in [0, 1), got {phase}")
        self.config = config
        self.min_face_size = min_face_size
        self.phase = phase
        self._previous: np.ndarray | None = None
        self._before_previous: np.ndarray | None = None
        self._last_t = float("-inf")
        self._last_full_t = float("-inf")

    def plan(self, image: np.ndarray, t: float, faces: Sequence[Box] = (), confirm: Confirm | None = None) -> Plan:
        """Where to detect in `image` (RGB, captured at `t`), given the boxes of the faces followed now.

        `confirm(image, boxes)`: the detector's look at given boxes only (engines.detector.MtcnnDetector.confirm: a
        detection or None per box). With it (and ``confirm_followed``), a frame that is not searched whole
        first looks for the followed faces where they are; only the regions of faces not found there are
        searched, and motion around a face found is taken for its own. A frame searched whole on schedule, or
        because its regions would cover most of it, is searched for everyone but the faces found so. The faces
        found are the plan's `confirmed` (run the plan with `detect_in_regions`)."""
        c = self.config
        h, w = image.shape[:2]
        small = _shrunk_grey(image, c.motion_scale)
        before, previous = self._before_previous, self._previous
        self._before_previous, self._previous = previous, small
        last_t, self._last_t = self._last_t, t
        reason = ""
        changed = None
        if previous is None or previous.shape != small.shape:
            reason = "first frame"
        elif t - last_t > c.max_gap_s:
            reason = "gap"
        elif t - self._last_full_t >= c.full_frame_interval_s - _SLACK_S:
            reason = "schedule"
        else:
            changed = _motion_mask(previous, small, c.motion_threshold, before)
            if float(changed.mean()) > c.max_motion_share:
                reason = "big change"
        regions: list[tuple[Rect, float]] = []
        shrink: list[float] = []
        share = 0.0
        confirmed: list[Any] = []
        # After a gap, on a first frame or a big change, the followed boxes say little of where faces are now.
        if confirm is not None and c.confirm_followed and faces and reason in ("", "schedule"):
            confirmed = _confirmed(confirm, image, faces)
        if changed is not None and not reason:
            if confirmed:
                # A followed box is found when a confirmed face lies over it: a track's last box and where it
                # is heading are both asked about, and a face that moved may be confirmed from one only.
                faces = [b for b in faces if not any(iou(b, d.box) >= _FOUND_IOU for d in confirmed)]
            tracked = [(self._face_region(b, w, h), 0.5 * min(b[2] - b[0], b[3] - b[1])) for b in faces]
            own = [self._own_area(d.box, w, h) for d in confirmed]
            # Motion wholly inside a followed face's region is taken for that face's own (a walk, a turn
            # of the head): the region is searched for faces of about its size only. Around a confirmed
            # face, only motion close to it is its own; anything reaching further is searched.
            motion = [
                (r, 0.0)
                for r in self._motion_regions(changed, w, h)
                if not any(_within(r, region) for region, _ in tracked) and not any(_within(r, a) for a in own)
            ]
            regions = merge_regions(motion + tracked)
            shrink = [self._shrink(smallest) for _, smallest in regions]
            areas = [(x2 - x1) * (y2 - y1) for (x1, y1, x2, y2), _ in regions]
            share = sum(areas) / float(w * h)
            # What the detector's work follows: the area it sees, after shrinking.
            if sum(a / f**2 for a, f in zip(areas, shrink)) > c.max_region_share * w * h:
                reason = "regions too large"
        if reason:
            self._last_full_t = t - (self.phase * c.full_frame_interval_s if reason == "first frame" else 0.0)
            return Plan(True, ((0, 0, w, h),), 1.0, reason, (1.0,), tuple(confirmed))
        return Plan(False, tuple(r for r, _ in regions), share, "regions", tuple(shrink), tuple(confirmed))

    def _shrink(self, smallest: float) -> float:
        """The factor a region whose smallest possible face is `smallest` px is shrunk by (1: not at all)."""
        if self.min_face_size <= 0 or smallest <= 0:
            return 1.0
        f = min(self.config.max_shrink, smallest / self.min_face_size)
        return f if f > 1.25 else 1.0  # below that, shrinking costs about what it saves

    def _motion_regions(self, changed: np.ndarray, w: int, h: int) -> list[Rect]:
        import cv2

        count, _, stats, _ = cv2.connectedComponentsWithStats(changed, connectivity=8)
        sx, sy = w / changed.shape[1], h / changed.shape[0]
        out = []
        for x, y, bw, bh, _area in stats[1:count]:
            x1, y1, x2, y2 = x * sx, y * sy, (x + bw) * sx, (y + bh) * sy
            # A face in a changed area is at most as large as the area's smaller side.
            margin = self.config.motion_growth * min(x2 - x1, y2 - y1)
            out.append(self._grown(x1 - margin, y1 - margin, x2 + margin, y2 + margin, w, h))
        return out

    def _own_area(self, box: Box, w: int, h: int) -> Rect:
        x1, y1, x2, y2 = box
        margin = self.config.own_motion_growth * max(x2 - x1, y2 - y1)
        return _clip((int(x1 - margin), int(y1 - margin), int(np.ceil(x2 + margin)), int(np.ceil(y2 + margin))), w, h)

    def _face_region(self, box: Box, w: int, h: int) -> Rect:
        x1, y1, x2, y2 = box
        # Between analysed frames a face moves by about its own size at most (a walk at 5 fps).
        margin = self.config.track_growth * max(x2 - x1, y2 - y1)
        return self._grown(x1 - margin, y1 - margin, x2 + margin, y2 + margin, w, h)

    def _grown(self, x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> Rect:
        """The rectangle widened about its centre to at least min_region_px, clipped to the frame."""
        m = self.config.min_region_px
        cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        half_w, half_h = max(x2 - x1, m) / 2.0, max(y2 - y1, m) / 2.0
        return _clip((int(cx - half_w), int(cy - half_h), int(np.ceil(cx + half_w)), int(np.ceil(cy + half_h))), w, h)


def _confirmed(confirm: Confirm, image: np.ndarray, faces: Sequence[Box]) -> list[Any]:
    """The faces `confirm` finds at the followed boxes, each once: boxes nearly the same (a face standing
    still is where it is heading) are asked about once, and two boxes finding one face give it once."""
    asked: list[Box] = []
    for b in faces:
        if not any(iou(b, a) >= _SAME_BOX_IOU for a in asked):
            asked.append(b)
    found = sorted((d for d in confirm(image, asked) if d is not None), key=lambda d: d.score, reverse=True)
    out: list[Any] = []
    for d in found:
        if not any(iou(d.box, o.box) >= _FOUND_IOU for o in out):
            out.append(d)
    return out


def followed_boxes(tracks: Sequence[Any], t: float, max_missed: int) -> list[Box]:
    """The boxes to plan regions around for `tracks` (edge.tracker.Track) at time `t`: each track's last box
    and where it is heading, for tracks missed on at most `max_missed` analysed frames in a row. (A face
    that walks faster than the tracker follows leaves a trail of tracks that live on for max_age_s; their
    regions would only cover where it was.)"""
    return [box for tr in tracks if tr.missed <= max_missed for box in (tr.box, tr.predicted_box(t))]


def merge_regions(regions: Sequence[tuple[Rect, float]]) -> list[tuple[Rect, float]]:
    """(rectangle, smallest face) pairs whose rectangles overlap or touch replaced by their bounding
    rectangle and the smaller of the two faces, until none do; the result is disjoint, so a face lies whole
    in at most one of them."""
    out = [(r, f) for r, f in regions if r[2] > r[0] and r[3] > r[1]]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                (a, fa), (b, fb) = out[i], out[j]
                if a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]:
                    out[i] = ((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])), min(fa, fb))
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return sorted(out)


def detect_in_regions(detect: Callable[..., list[Any]], image: np.ndarray, plan: Plan) -> list:
    """Run `detect` on each of the plan's regions of `image`; its detections (engines.detector.Detection)
    moved into frame coordinates, with the plan's confirmed faces, highest score first.

    A region the plan shrinks is resized first: the detector's pyramid then starts nearer the size of the
    smallest face the region may hold, and its levels for smaller faces are never computed. Confirmed faces
    inside a region are passed to `detect(crop, exclude=boxes)` (MtcnnDetector.detect's signature), so they are
    not found again.
    """
    import cv2

    shrink = plan.shrink or (1.0,) * len(plan.regions)
    found = []
    for (x1, y1, x2, y2), f in zip(plan.regions, shrink):
        crop = image[y1:y2, x1:x2]
        if f > 1.0:
            size = (max(1, round((x2 - x1) / f)), max(1, round((y2 - y1) / f)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        sx, sy = (x2 - x1) / crop.shape[1], (y2 - y1) / crop.shape[0]
        scale = np.array([sx, sy], dtype=np.float32)
        known = [
            ((b[0] - x1) / sx, (b[1] - y1) / sy, (b[2] - x1) / sx, (b[3] - y1) / sy)
            for b in (c.box for c in plan.confirmed)
            if b[0] < x2 and b[2] > x1 and b[1] < y2 and b[3] > y1
        ]
        for det in detect(crop, exclude=known):
            bx1, by1, bx2, by2 = det.box
            found.append(
                dataclasses.replace(
                    det,
                    box=(bx1 * sx + x1, by1 * sy + y1, bx2 * sx + x1, by2 * sy + y1),
                    landmarks=(det.landmarks * scale + np.array([x1, y1], dtype=np.float32)).astype(np.float32),
                )
            )
    # A face confirmed where it was heading may also lie in a region searched for someone else: it counts once.
    found = [d for d in found if not any(iou(d.box, c.box) >= _FOUND_IOU for c in plan.confirmed)]
    found.extend(plan.confirmed)
    found.sort(key=lambda d: d.score, reverse=True)
    return found


def _within(inner: Rect, outer: Rect) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _clip(r: Rect, w: int, h: int) -> Rect:
    return (max(0, r[0]), max(0, r[1]), min(w, r[2]), min(h, r[3]))


def _shrunk_grey(image: np.ndarray, scale: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    # Every other pixel's green (most of the luminance) then area-averaged: a fifth of the cost of greying
    # and shrinking the whole frame, and the averaging still smooths sensor noise.
    green = np.ascontiguousarray(image[::2, ::2, 1] if image.ndim == 3 else image[::2, ::2])
    return cv2.resize(green, (max(1, w // scale), max(1, h // scale)), interpolation=cv2.INTER_AREA)


def _motion_mask(
    previous: np.ndarray, current: np.ndarray, threshold: int, before: np.ndarray | None = None
) -> np.ndarray:
    import cv2

    changed = cv2.absdiff(previous, current) >= threshold
    if before is not None and before.shape == current.shape:
        # Only what differs from both earlier frames is where something is now: where a walking face
        # was a frame ago differs from the previous frame alone, and its track's region covers it.
        changed &= cv2.absdiff(before, current) >= threshold
    # One cell around each changed one: a moving face's edge may change less than its inside.
    return cv2.dilate(changed.astype(np.uint8), np.ones((3, 3), np.uint8))
