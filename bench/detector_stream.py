"""The detector on a stream from a static camera: the whole frame every time, and gated (edge.regions).

A synthetic sequence at 5 analysed frames/s: a still scikit-image photo as the background, light
sensor noise on every frame, and faces (lag-dev crops, or scikit-image's astronaut without the data)
of 40..250 px walking in from either side, standing a few seconds and walking out, several at once.
Per frame: the detection cost (wall and this thread's CPU ms, the gating's own planning included, and
the planning alone, its look for followed faces where they are heading included; "conf": faces found so)
and how many of the faces present (whole in the frame, not covered by another) were found; per
face: whether it was ever found; "tracks": how many tracks the tracker started over the sequence (one
per person when each face is followed from entry to exit). Run by bench/detector.py --stream SECONDS.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

STREAM_FPS = 5.0
HEIGHTS = (40, 55, 75, 100, 140, 190, 250)


@dataclass(frozen=True)
class Walker:
    """One face's walk: in from one side to its spot, a stand, out to the other side."""

    face: np.ndarray
    size: int
    y: int
    t0: float
    x_spot: int
    walk_s: float
    stand_s: float
    from_left: bool
    width: int

    def x_at(self, t: float) -> float | None:
        """The face's left edge at time t, or None when it is not on stage."""
        dt = t - self.t0
        start = -self.size if self.from_left else self.width
        end = self.width if self.from_left else -self.size
        if dt < 0 or dt > 2 * self.walk_s + self.stand_s:
            return None
        if dt < self.walk_s:
            return start + (self.x_spot - start) * dt / self.walk_s
        if dt < self.walk_s + self.stand_s:
            return float(self.x_spot)
        return self.x_spot + (end - self.x_spot) * (dt - self.walk_s - self.stand_s) / self.walk_s


def walkers(faces: list[np.ndarray], width: int, height: int, seconds: float, seed: int = 0) -> list[Walker]:
    """A new face every 1-2.5 s, each with its own size, row, spot, pace and stand."""
    rng = np.random.default_rng(seed)
    out: list[Walker] = []
    t = 0.2
    while t < seconds - 1.0:
        size = int(rng.choice(HEIGHTS))
        out.append(
            Walker(
                face=faces[len(out) % len(faces)],
                size=size,
                y=int(rng.integers(10, height - size - 10)),
                t0=t,
                x_spot=int(rng.integers(10, width - size - 10)),
                walk_s=float(rng.uniform(1.0, 2.5)),
                stand_s=float(rng.uniform(1.0, 4.0)),
                from_left=bool(rng.integers(0, 2)),
                width=width,
            )
        )
        t += float(rng.uniform(1.0, 2.5))
    return out


def frames(
    background: np.ndarray, people: list[Walker], seconds: float, seed: int = 1
) -> Iterator[tuple[float, np.ndarray, dict[int, tuple[int, int, int, int]]]]:
    """(t, RGB frame, {walker index: rect}) at STREAM_FPS; rects of faces whole in the frame and not
    covered by a face pasted after them."""
    rng = np.random.default_rng(seed)
    h, w = background.shape[:2]
    for k in range(int(seconds * STREAM_FPS)):
        t = k / STREAM_FPS
        noise = rng.normal(0.0, 2.0, background.shape).astype(np.float32)
        frame = np.clip(background.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        placed: list[tuple[int, tuple[int, int, int, int]]] = []
        for i, p in enumerate(people):
            x = p.x_at(t)
            if x is None:
                continue
            x0, s = int(round(x)), p.size
            patch = _patch(p.face, s)
            fx1, fx2 = max(0, x0), min(w, x0 + s)
            if fx2 <= fx1:
                continue
            frame[p.y : p.y + s, fx1:fx2] = patch[:, fx1 - x0 : fx2 - x0]
            placed.append((i, (x0, p.y, x0 + s, p.y + s)))
        present = {}
        for n, (i, r) in enumerate(placed):
            whole = r[0] >= 0 and r[2] <= w
            covered = any(_overlap(r, later) for _, later in placed[n + 1 :])
            if whole and not covered:
                present[i] = r
        yield t, frame, present


def _patch(face: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if size < face.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(face, (size, size), interpolation=interp)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _found(rect: tuple[int, int, int, int], boxes: list) -> bool:
    x1, y1, x2, y2 = rect
    return any(x1 <= (b[0] + b[2]) / 2 <= x2 and y1 <= (b[1] + b[3]) / 2 <= y2 for b in boxes)


Detector = Callable[[float, np.ndarray], tuple[list, dict]]


def full_frame(detect: Callable[[np.ndarray], list]) -> Detector:
    """Every frame searched whole (a tracker follows the faces only to count the tracks they make)."""
    from edge.tracker import Observation, Tracker, TrackerConfig

    tracker = Tracker(TrackerConfig())

    def run(t: float, image: np.ndarray) -> tuple[list, dict]:
        dets = detect(image)
        tracker.update([Observation(box=tuple(d.box), score=d.score) for d in dets], t)
        return [d.box for d in dets], {"full": True, "share": 1.0, "reason": "always", "tracks": tracker.started}

    return run


def gated(detect: Callable[[np.ndarray], list], gating, min_face_size: int, confirm=None) -> Detector:
    """As CameraAnalyser does: the planner's regions, the tracker's faces feeding the next plan, and
    `confirm(image, boxes)` (the detector's) looking for the followed faces first."""
    from edge.regions import RegionPlanner, detect_in_regions, followed_boxes
    from edge.tracker import Observation, Tracker, TrackerConfig

    planner, tracker = RegionPlanner(gating, min_face_size), Tracker(TrackerConfig())

    def run(t: float, image: np.ndarray) -> tuple[list, dict]:
        faces = followed_boxes(tracker.tracks, t, gating.track_missed_frames)
        c0 = time.thread_time()
        plan = planner.plan(image, t, faces, confirm)
        plan_ms = 1000 * (time.thread_time() - c0)
        dets = detect_in_regions(detect, image, plan)
        tracker.update([Observation(box=tuple(d.box), score=d.score) for d in dets], t)
        return [d.box for d in dets], {
            "full": plan.full,
            "share": plan.share,
            "reason": plan.reason,
            "plan_ms": plan_ms,
            "confirmed": len(plan.confirmed),
            "tracks": tracker.started,
        }

    return run


def measure(detector: Detector, background: np.ndarray, people: list[Walker], seconds: float) -> dict:
    """Per-frame cost and recall of one way of detecting over the whole sequence."""
    wall, cpu, shares, plan_ms = [], [], [], []
    present = found = full = confirmed = tracks = 0
    reasons: dict[str, int] = {}
    seen: set[int] = set()
    ever: set[int] = set()
    for t, frame, rects in frames(background, people, seconds):
        t0, c0 = time.perf_counter(), time.thread_time()
        boxes, info = detector(t, frame)
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.thread_time() - c0))
        full += info["full"]
        confirmed += info.get("confirmed", 0)
        tracks = info["tracks"]
        reasons[info["reason"]] = reasons.get(info["reason"], 0) + 1
        shares.append(info["share"])
        plan_ms.append(info.get("plan_ms", 0.0))
        for i, r in rects.items():
            seen.add(i)
            present += 1
            if _found(r, boxes):
                found += 1
                ever.add(i)
    never = sorted(seen - ever)
    return {
        "frames": len(wall),
        "ms_mean": statistics.fmean(wall),
        "ms_p50": statistics.median(wall),
        "ms_p95": float(np.percentile(wall, 95)),
        "cpu_ms_mean": statistics.fmean(cpu),
        "cpu_ms_p50": statistics.median(cpu),
        "cpu_ms_p95": float(np.percentile(cpu, 95)),
        "faces_present": present,
        "faces_found": found,
        "recall": found / present if present else None,
        "people": len(seen),
        "never_found": len(never),
        "never_found_sizes": [people[i].size for i in never],
        "share_full": full / len(wall),
        "mean_area_searched": statistics.fmean(shares),
        "frames_by_reason": reasons,
        "planning_cpu_ms_mean": statistics.fmean(plan_ms),
        "faces_confirmed": confirmed,
        # The tracker's tracks over the sequence, against "people": a face followed from entry to exit is one.
        "tracks_started": tracks,
    }


def run_stream(
    detect: Callable[[np.ndarray], list],
    min_face_size: int,
    faces: list[np.ndarray],
    seconds: float,
    gating=None,
    confirm=None,
) -> dict:
    """Full-frame and gated detection on the 720p and 1080p sequences; prints a table, returns the figures."""
    from skimage import data as skdata

    from edge.regions import GatingConfig

    gating = gating or GatingConfig()
    out: dict = {"fps": STREAM_FPS, "seconds": seconds, "gating": gating.model_dump()}
    print(f"\nstream: {seconds:g} s at {STREAM_FPS:g} fps, faces of {HEIGHTS} px walking in, standing, walking out")
    print(
        f"{'frame':<11}{'mode':<7}{'ms mean':>8}{'p50':>7}{'p95':>7}{'cpu mean':>9}{'cpu p95':>8}"
        f"{'found':>12}{'recall':>8}{'never':>7}{'full':>6}{'area':>6}{'plan':>6}{'conf':>6}{'tracks':>7}"
        "  frames by reason"
    )
    for w, h in ((1280, 720), (1920, 1080)):
        background = cv2.resize(skdata.rocket(), (w, h), interpolation=cv2.INTER_LINEAR)
        people = walkers(faces, w, h, seconds)
        detect(background)  # warm-up
        size = out.setdefault(f"{w}x{h}", {})
        for mode, detector in (("full", full_frame(detect)), ("gated", gated(detect, gating, min_face_size, confirm))):
            r = size[mode] = measure(detector, background, people, seconds)
            # A sequence too short for anyone to walk in has no recall: printed as nan.
            recall = float("nan") if r["recall"] is None else r["recall"]
            print(
                f"{f'{w}x{h}':<11}{mode:<7}{r['ms_mean']:>8.1f}{r['ms_p50']:>7.1f}{r['ms_p95']:>7.1f}"
                f"{r['cpu_ms_mean']:>9.1f}{r['cpu_ms_p95']:>8.1f}{r['faces_found']:>6}/{r['faces_present']:<5}"
                f"{recall:>8.3f}{r['never_found']:>4}/{r['people']:<3}{r['share_full']:>5.2f}"
                f"{r['mean_area_searched']:>6.2f}{r['planning_cpu_ms_mean']:>6.1f}{r['faces_confirmed']:>6}"
                f"{r['tracks_started']:>7}  {r['frames_by_reason']}"
            )
    return out
