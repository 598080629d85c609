"""The per-camera face tracker: identities kept across frames, tracks end, best faces kept."""

from __future__ import annotations

import numpy as np
import pytest

from edge.tracker import Observation, Tracker, TrackerConfig, iou


def obs(
    x: float, y: float, size: float = 80.0, quality: float = 0.5, usable: bool = True, data: object = None
) -> Observation:
    return Observation(box=(x, y, x + size, y + size), score=0.99, quality=quality, usable=usable, data=data)


def test_iou_of_known_boxes() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_two_faces_walking_keep_their_ids() -> None:
    tr = Tracker()
    ids: list[tuple[int, int]] = []
    for k in range(20):
        t = k * 0.2
        # One face walks right fast (half a face width per frame, so overlap alone would lose it), one walks left.
        a = obs(100 + 40 * k, 100)
        b = obs(1100 - 30 * k, 400)
        tracks = tr.update([b, a] if k % 2 else [a, b], t).live
        by_box = {tk.last.box: tk.id for tk in tracks if tk.last_seen == t}
        ids.append((by_box[a.box], by_box[b.box]))
    assert len(set(ids)) == 1, f"ids changed along the way: {ids}"
    assert ids[0][0] != ids[0][1]


def test_crossing_faces_do_not_swap_when_sizes_differ() -> None:
    tr = Tracker()
    first: dict[str, int] = {}
    for k in range(10):
        t = k * 0.2
        big = obs(100 + 60 * k, 200, size=160)
        small = obs(500 - 30 * k, 240, size=50)
        tracks = tr.update([big, small], t).live
        ids = {tk.last.box: tk.id for tk in tracks if tk.last_seen == t}
        first.setdefault("big", ids[big.box])
        first.setdefault("small", ids[small.box])
        assert ids[big.box] == first["big"] and ids[small.box] == first["small"]


def test_track_survives_short_gap_and_ends_after_max_age() -> None:
    tr = Tracker(TrackerConfig(max_age_s=1.0))
    (t1,) = tr.update([obs(100, 100)], 0.0).live
    update = tr.update([], 0.5)
    assert update.live and not update.ended  # missed detections for 0.5 s: still alive
    (again,) = tr.update([obs(104, 100)], 0.8).live
    assert again.id == t1.id and again.observations == 2
    update = tr.update([], 2.0)
    assert update.live == []
    assert [t.id for t in update.ended] == [t1.id]
    (new,) = tr.update([obs(104, 100)], 2.2).live
    assert new.id != t1.id, "a face after the track ended starts a new track"


def test_far_away_detection_starts_new_track() -> None:
    tr = Tracker()
    (a,) = tr.update([obs(100, 100)], 0.0).live
    tracks = tr.update([obs(900, 500)], 0.2).live
    assert {t.id for t in tracks} == {a.id, a.id + 1}
    assert tr.started == 2
    tr.update([obs(902, 500)], 0.4)  # the second face, followed: no new track
    assert tr.started == 2


def test_best_observations_are_kept_by_quality_and_unusable_ones_never() -> None:
    tr = Tracker(TrackerConfig(keep_best=2))
    qualities = [0.3, 0.9, 0.1, 0.95, 0.5]
    for k, q in enumerate(qualities):
        tr.update([obs(100 + k, 100, quality=q, data=f"frame{k}")], k * 0.2)
    tr.update([obs(106, 100, quality=0.99, usable=False, data="blurred")], 1.2)
    (track,) = tr.tracks
    assert [o.data for o in track.best] == ["frame3", "frame1"]
    assert track.best_observation is not None and track.best_observation.quality == 0.95
    assert track.last.data == "blurred"


def test_track_without_usable_face_has_no_best() -> None:
    tr = Tracker()
    (track,) = tr.update([obs(100, 100, usable=False)], 0.0).live
    assert track.best_observation is None


def test_clock_step_backwards_does_not_end_tracks() -> None:
    tr = Tracker(TrackerConfig(max_age_s=1.0))
    (a,) = tr.update([obs(100, 100)], 100.0).live
    update = tr.update([obs(102, 100)], 50.0)
    (b,) = update.live
    assert b.id == a.id and not update.ended


def test_bad_tracker_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="iou_threshold"):
        TrackerConfig(iou_threshold=0.0)
    with pytest.raises(ValueError, match="unknown_key|extra"):
        TrackerConfig.model_validate({"unknown_key": 1})


def cue(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(144).astype(np.float32)
    v -= v.mean()
    return v / np.linalg.norm(v)


def test_gap_size_jump_and_another_look_flag_a_possible_change_of_person() -> None:
    tr = Tracker(TrackerConfig(change_gap_s=0.3, change_size_ratio=1.25, change_min_cue=0.7))
    a, b = cue(1), cue(2)
    (track,) = tr.update([obs(100, 100, data="a0")], 0.0).live
    track = tr.update([obs(102, 100)], 0.2).live[0]
    assert track.change is None, "a face in the next frame, same size, no cue: nothing to check"
    tr.update([], 0.4)  # an analysed frame without the face
    track = tr.update([obs(102, 100)], 0.6).live[0]
    assert track.change is not None and track.change.startswith("gap")
    track = tr.update([obs(100, 100, size=110)], 0.8).live[0]
    assert track.change is not None and track.change.startswith("size")
    base = Observation(box=(100, 100, 210, 210), score=0.99, quality=0.5, cue=a)
    assert tr.update([base], 1.0).live[0].change is None, "a sign holds for the update that saw it alone"
    same = Observation(box=(101, 100, 211, 210), score=0.99, quality=0.5, cue=a * 0.9 + b * 0.1)
    track = tr.update([same], 1.2).live[0]
    assert track.change is None
    other = Observation(box=(101, 100, 211, 210), score=0.99, quality=0.5, cue=b)
    track = tr.update([other], 1.4).live[0]
    assert track.change is not None and track.change.startswith("look")
    assert [t.id for t in tr.tracks] == [track.id], "the tracker flags; it does not split on its own"


def test_slow_frames_alone_are_no_gap() -> None:
    tr = Tracker(TrackerConfig(change_gap_s=0.3))
    tr.update([obs(100, 100)], 0.0)
    track = tr.update([obs(101, 100)], 0.9).live[0]  # the detector was slow; no frame went by without the face
    assert track.change is None


def test_split_ends_the_track_and_continues_in_a_new_one() -> None:
    tr = Tracker()
    (old,) = tr.update([obs(100, 100, data="first person")], 0.0).live
    tr.update([obs(101, 100, data="second person")], 0.2)
    new = tr.split(old.id, 0.2)
    assert new is not None and new.id != old.id and new.split_from == old.id
    assert [o.data for o in new.best] == ["second person"], "the new track keeps no face of the one before"
    assert tr.split(old.id, 0.2) is None
    update = tr.update([obs(102, 100)], 0.4)
    assert [t.id for t in update.live] == [new.id] and [t.id for t in update.ended] == [old.id]
    update = tr.update([obs(103, 100)], 0.6)
    assert update.live and update.ended == []
