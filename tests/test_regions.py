"""Motion and track gating (edge.regions) on real images with the real detector: a face that steps into a
still scene is found in the frame it appears, a face that stands still stays followed (confirmed where it
stands, without a search), someone stepping up beside it is still found, the whole frame is searched on
schedule (cameras of one unit in turn) and when much changes, regions are merged and clipped, a face is
found once."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge.analysis import CameraAnalyser
from edge.decision import DecisionConfig
from edge.frame import Frame
from edge.regions import GatingConfig, RegionPlanner, detect_in_regions, merge_regions
from edge.tracker import TrackerConfig

W, H = 960, 540
FACE = 110  # pasted face height, px
SPOT = (600, 200)  # where the face is pasted (left, top)


@pytest.fixture(scope="module")
def background() -> np.ndarray:
    import cv2
    from skimage import data as skdata

    return cv2.resize(skdata.rocket(), (W, H), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def face(people: Any) -> np.ndarray:
    import cv2

    f = people.enrolled_face
    return cv2.resize(f, (round(f.shape[1] * FACE / f.shape[0]), FACE), interpolation=cv2.INTER_AREA)


def _noisy(image: np.ndarray, seed: int) -> np.ndarray:
    # Sensor noise: no two frames of a real camera are equal, and gating must not take that for motion.
    noise = np.random.default_rng(seed).normal(0.0, 2.0, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _with_face(background: np.ndarray, face: np.ndarray, at: tuple[int, int] = SPOT) -> np.ndarray:
    out = background.copy()
    x, y = at
    out[y : y + face.shape[0], x : x + face.shape[1]] = face
    return out


def _inside(box: tuple[float, ...], at: tuple[int, int], face: np.ndarray) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return at[0] <= cx <= at[0] + face.shape[1] and at[1] <= cy <= at[1] + face.shape[0]


def _analyser(engine: Any, **gating: Any) -> CameraAnalyser:
    return CameraAnalyser("gate", engine, DecisionConfig(), TrackerConfig(), gating=GatingConfig(**gating))


def _big_face(engine: Any, face: np.ndarray, sides: float) -> np.ndarray:
    """`face` enlarged so the detector's box of it is about `sides` times the detector's smallest face across.

    Scaled from the box the detector gives, not by a fixed factor: how much of the picture the face fills
    differs between the people the tests get (lag-dev's photos, or scikit-image's astronaut without them)."""
    import cv2

    (det,) = engine.detect(_with_face(np.zeros((H, W, 3), np.uint8), face))
    k = sides * engine.min_face_size / min(det.box[2] - det.box[0], det.box[3] - det.box[1])
    size = (round(face.shape[1] * k), round(face.shape[0] * k))
    return cv2.resize(face, size, interpolation=cv2.INTER_CUBIC)


def _region_share(box: tuple[float, ...], config: GatingConfig) -> float:
    """The share of the frame a followed face's region covers: its box grown by track_growth face sizes on
    each side, at least min_region_px (away from the frame's edges)."""
    w, h = box[2] - box[0], box[3] - box[1]
    margin = 2 * config.track_growth * max(w, h)
    return max(w + margin, config.min_region_px) * max(h + margin, config.min_region_px) / (W * H)


def test_new_face_found_in_its_first_frame_and_followed_while_it_stands(
    engine: Any, background: np.ndarray, face: np.ndarray
) -> None:
    an = _analyser(engine)
    an.analyse(Frame("gate", 0, 100.0, _noisy(background, 0)))
    an.analyse(Frame("gate", 1, 100.2, _noisy(background, 1)))
    assert (an.stats.frames_full, an.stats.frames_regions) == (1, 1)
    assert an.stats.searched_share_sum == 1.0  # nothing changed, nobody followed: nothing searched

    scene = _with_face(background, face)
    an.analyse(Frame("gate", 2, 100.4, _noisy(scene, 2)))
    assert (an.stats.frames_full, an.stats.frames_regions) == (1, 2)
    tracks = an.tracker.tracks
    assert len(tracks) == 1 and tracks[0].last_seen == 100.4 and _inside(tracks[0].box, SPOT, face)
    share_when_found = an.stats.searched_share_sum - 1.0
    assert 0.0 < share_when_found < 0.3

    # Standing still: nothing changes around the face, its track's region keeps it found.
    for seq, t in ((3, 100.6), (4, 100.8)):
        an.analyse(Frame("gate", seq, t, _noisy(scene, seq)))
        assert [tr.last_seen for tr in an.tracker.tracks] == [t]
    assert (an.stats.frames_full, an.stats.frames_regions) == (1, 4)
    assert an.stats.faces == 3 and an.tracker.tracks[0].id == tracks[0].id
    snap = an.stats.snapshot(0.0)
    assert snap["frames_full"] == 1 and snap["frames_regions"] == 4 and 0.2 < snap["searched_share"] < 0.5


def test_gating_off_searches_every_frame_whole(engine: Any, background: np.ndarray) -> None:
    an = _analyser(engine, enabled=False)
    for seq in range(2):
        an.analyse(Frame("gate", seq, 100.0 + seq / 5, background))
    assert (an.stats.frames_full, an.stats.frames_regions) == (2, 0)


def test_whole_frame_first_on_schedule_after_a_gap_and_on_a_big_change(background: np.ndarray) -> None:
    planner = RegionPlanner(GatingConfig(full_frame_interval_s=1.0, max_gap_s=1.0))
    reasons = []
    for t, image in (
        (10.0, background),
        (10.2, background),
        (10.8, background),
        (11.0, background),  # a second after the last whole frame
        (11.2, background),
        (11.4, np.clip(background.astype(np.int16) + 60, 0, 255).astype(np.uint8)),  # lights on
        (11.6, np.clip(background.astype(np.int16) + 60, 0, 255).astype(np.uint8)),  # still on: no change
        (11.8, background),  # off again: all of it changed back
        (13.0, background),  # 1.4 s without a frame
    ):
        plan = planner.plan(_noisy(image, int(t * 10)), t)
        reasons.append(plan.reason)
        assert plan.full == (plan.regions == ((0, 0, W, H),))
    assert reasons == [
        "first frame",
        "regions",
        "regions",
        "schedule",
        "regions",
        "big change",
        "regions",
        "big change",
        "gap",
    ]


def test_regions_are_grown_merged_and_clipped(background: np.ndarray) -> None:
    planner = RegionPlanner(GatingConfig())
    planner.plan(background, 0.0)
    # Two followed faces side by side at the top-left corner: their grown regions overlap and reach past
    # the frame's edge.
    plan = planner.plan(background, 0.2, [(5.0, 5.0, 45.0, 45.0), (60.0, 10.0, 100.0, 50.0)])
    assert not plan.full and plan.regions == ((0, 0, 130, 80),)
    assert plan.share == pytest.approx(130 * 80 / (W * H))
    # A small face alone still gets min_region_px around it.
    plan = planner.plan(background, 0.4, [(400.0, 300.0, 410.0, 310.0)])
    ((x1, y1, x2, y2),) = plan.regions
    assert x2 - x1 >= 96 and y2 - y1 >= 96 and x1 <= 400 and x2 >= 410
    assert plan.shrink == (1.0,)  # the planner was not told the detector's smallest face
    # Merged regions may hold the smallest face of any part; where something moved, any face.
    merged = merge_regions(
        [((0, 0, 10, 10), 20.0), ((20, 0, 30, 10), 30.0), ((9, 5, 21, 6), 0.0), ((50, 50, 60, 60), 9.0)]
    )
    assert merged == [((0, 0, 30, 10), 0.0), ((50, 50, 60, 60), 9.0)]


def test_face_where_regions_meet_is_found_once_in_frame_coordinates(
    engine: Any, background: np.ndarray, face: np.ndarray
) -> None:
    scene = _with_face(background, face)
    whole = engine.detect(scene)
    assert len(whole) == 1
    planner = RegionPlanner(GatingConfig())
    planner.plan(scene, 0.0)
    # Something moves just left of the face (its region takes in half the face) while the face's track
    # asks for its own region: one region, one detection.
    moved = scene.copy()
    moved[SPOT[1] + 20 : SPOT[1] + 60, SPOT[0] - 60 : SPOT[0] - 20] = 255
    x, y = SPOT
    plan = planner.plan(moved, 0.2, [(x, y, x + face.shape[1], y + face.shape[0])])
    assert not plan.full and len(plan.regions) == 1
    assert plan.shrink == (1.0,)
    found = detect_in_regions(engine.detect, moved, plan)
    assert len(found) == 1
    # The same face as the whole frame gives, moved back into frame coordinates.
    assert np.allclose(found[0].box, whole[0].box, atol=3.0)
    assert np.allclose(found[0].landmarks, whole[0].landmarks, atol=3.0)
    assert found[0].landmarks.dtype == np.float32


def test_region_of_a_followed_face_searched_shrunk(engine: Any, background: np.ndarray, face: np.ndarray) -> None:
    # A face three times the detector's smallest: its region is searched shrunk by about 1.5, well clear of
    # the 1.25 below which the planner does not shrink.
    scene = _with_face(background, _big_face(engine, face, 3.0), (300, 60))
    (whole,) = engine.detect(scene)
    planner = RegionPlanner(GatingConfig(max_shrink=4.0), engine.min_face_size)
    planner.plan(scene, 0.0)
    plan = planner.plan(scene, 0.2, [whole.box])
    # Shrunk so the smallest face the region may hold (half the followed one) meets the detector's smallest.
    smallest = 0.5 * min(whole.box[2] - whole.box[0], whole.box[3] - whole.box[1])
    (shrink,) = plan.shrink
    assert shrink == pytest.approx(smallest / engine.min_face_size) and shrink > 1.25
    (found,) = detect_in_regions(engine.detect, scene, plan)
    side = whole.box[2] - whole.box[0]
    assert np.allclose(found.box, whole.box, atol=0.08 * side)
    assert np.allclose(found.landmarks, whole.landmarks, atol=0.08 * side)


def test_motion_of_a_followed_face_keeps_its_region_shrinkable(background: np.ndarray) -> None:
    planner = RegionPlanner(GatingConfig(max_shrink=4.0), min_face_size=20)
    face_box = (400.0, 280.0, 480.0, 360.0)
    planner.plan(background, 0.0)
    planner.plan(background, 0.2)
    # Something changes inside the followed face's box: the face's own motion, searched for faces of its size.
    turned = background.copy()
    turned[300:340, 420:460] = 255
    plan = planner.plan(turned, 0.4, [face_box])
    assert len(plan.regions) == 1 and plan.shrink == (2.0,)  # faces of 40 px and up: shrunk by 40 / 20
    # Something changes far from it: a region of its own where a face of any size is looked for.
    arrived = turned.copy()
    arrived[60:100, 100:140] = 0
    plan = planner.plan(arrived, 0.6, [face_box])
    assert len(plan.regions) == 2 and sorted(plan.shrink) == [1.0, 2.0]


def test_faces_missed_on_several_frames_lose_their_region() -> None:
    from edge.regions import followed_boxes
    from edge.tracker import Observation, Tracker

    tracker = Tracker(TrackerConfig())
    # A face walking faster than the tracker follows: a new track each frame, the old ones live on.
    for i, t in enumerate((0.0, 0.2, 0.4)):
        x = 100.0 + 300.0 * i
        tracker.update([Observation(box=(x, 100.0, x + 60.0, 160.0), score=0.99)], t)
    assert [tr.missed for tr in tracker.tracks] == [2, 1, 0]
    boxes = followed_boxes(tracker.tracks, 0.6, max_missed=1)
    assert len(boxes) == 4 and {b[0] for b in boxes} >= {400.0, 700.0}  # last box and heading, two tracks
    assert len(followed_boxes(tracker.tracks, 0.6, max_missed=0)) == 2


def test_standing_face_is_confirmed_where_it_stands_without_a_search(
    engine: Any, background: np.ndarray, face: np.ndarray
) -> None:
    scene = _with_face(background, face)
    shares = {}
    for confirm in (True, False):
        an = _analyser(engine, confirm_followed=confirm)
        an.analyse(Frame("gate", 0, 100.0, _noisy(background, 0)))
        an.analyse(Frame("gate", 1, 100.2, _noisy(scene, 1)))  # steps in: found in the changed area
        (track,) = an.tracker.tracks
        searched = an.stats.searched_share_sum
        for seq, t in ((2, 100.4), (3, 100.6)):
            an.analyse(Frame("gate", seq, t, _noisy(scene, seq)))
            assert [(tr.id, tr.last_seen) for tr in an.tracker.tracks] == [(track.id, t)]
        shares[confirm] = an.stats.searched_share_sum - searched
        assert an.stats.faces_confirmed == (2 if confirm else 0)
        assert an.stats.snapshot(0.0)["faces_confirmed"] == an.stats.faces_confirmed
        assert (an.stats.frames_full, an.stats.frames_regions) == (1, 3)
        (whole,) = engine.detect(_noisy(scene, 3))
        assert np.allclose(an.tracker.tracks[0].box, whole.box, atol=0.1 * FACE)
    # Confirmed: nothing searched while she stands; without: her region, twice (grown from her last box and
    # where it is heading, a pixel or two apart, so a few percent more than one box's region).
    assert shares[True] == 0.0
    assert shares[False] == pytest.approx(2 * _region_share(whole.box, GatingConfig()), rel=0.2)


def test_a_face_that_left_is_searched_for_where_it_was(engine: Any, background: np.ndarray, face: np.ndarray) -> None:
    scene = _with_face(background, face)
    an = _analyser(engine)
    an.analyse(Frame("gate", 0, 100.0, _noisy(scene, 0)))
    an.analyse(Frame("gate", 1, 100.2, _noisy(scene, 1)))
    assert an.stats.faces_confirmed == 1
    searched = an.stats.searched_share_sum
    # Covered up by something of the background's colour: not confirmed, its region is searched, nothing found.
    covered = _noisy(background, 2)
    an.analyse(Frame("gate", 2, 100.4, covered))
    assert an.stats.faces_confirmed == 1
    assert an.stats.searched_share_sum > searched
    assert an.tracker.tracks[0].missed == 1


def test_someone_stepping_up_beside_a_confirmed_face_is_found(
    engine: Any, background: np.ndarray, face: np.ndarray
) -> None:
    import cv2

    scene = _with_face(background, face)
    an = _analyser(engine)
    an.analyse(Frame("gate", 0, 100.0, _noisy(scene, 0)))
    an.analyse(Frame("gate", 1, 100.2, _noisy(scene, 1)))
    # A child's face, two thirds her size, just beside hers: the area that changed there reaches past the one
    # her own motion can explain (own_motion_growth), so it is searched although she is confirmed.
    child = cv2.resize(face, (face.shape[1] * 2 // 3, face.shape[0] * 2 // 3), interpolation=cv2.INTER_AREA)
    at = (SPOT[0] - child.shape[1] - 20, SPOT[1] + face.shape[0] // 2)
    both = _with_face(scene, child, at)
    an.analyse(Frame("gate", 2, 100.4, _noisy(both, 2)))
    assert an.stats.faces_confirmed == 2
    assert an.stats.frames_full == 1  # found in a region, not by a whole-frame pass
    boxes = [tr.box for tr in an.tracker.tracks if tr.last_seen == 100.4]
    assert len(boxes) == 2
    assert any(_inside(b, at, child) for b in boxes) and any(_inside(b, SPOT, face) for b in boxes)


def test_planner_asks_once_per_face_and_searches_only_what_confirmation_leaves(
    engine: Any, background: np.ndarray, face: np.ndarray
) -> None:
    # A face large enough that the area searched around motion just under her chin (at least min_region_px
    # across) lies within her own area (her box grown by half her size).
    scene = _with_face(background, _big_face(engine, face, 3.0), (300, 60))
    (whole,) = engine.detect(scene)
    here, gone = whole.box, (100.0, 100.0, 160.0, 160.0)  # her face; a followed box where nobody is now
    asked: list[list[tuple[float, ...]]] = []

    def confirm(image: np.ndarray, boxes):
        asked.append(list(boxes))
        return engine.confirm(image, boxes)

    planner = RegionPlanner(GatingConfig())
    planner.plan(scene, 0.0)
    planner.plan(scene, 0.2)
    # Each track gives its last box and where it is heading; a face standing still gives the same box twice.
    almost = (here[0] + 1, here[1], here[2] + 1, here[3])
    plan = planner.plan(scene, 0.4, [here, almost, gone, gone], confirm)
    assert asked == [[here, gone]]
    assert len(plan.confirmed) == 1 and np.allclose(plan.confirmed[0].box, here, atol=0.1 * (here[2] - here[0]))
    # Only the face not confirmed is searched for, in its region.
    assert len(plan.regions) == 1 and plan.regions[0][0] <= gone[0] and plan.regions[0][2] >= gone[2]
    # Motion just under her chin (a turn of the head) is her own; motion further off is searched.
    x1, y1, x2, y2 = (int(v) for v in here)
    turned = scene.copy()
    turned[y2 + 2 : y2 + 26, x1 + 10 : x1 + 34] = 255
    plan = planner.plan(turned, 0.6, [here], confirm)
    assert len(plan.confirmed) == 1 and plan.regions == () and not plan.full and plan.share == 0.0
    beside = turned.copy()
    beside[y1 : y1 + 24, x1 - 110 : x1 - 86] = 0  # beside her face: outside the area her own motion explains
    plan = planner.plan(beside, 0.8, [here], confirm)
    assert len(plan.confirmed) == 1 and len(plan.regions) == 1 and plan.regions[0][0] < x1 - 110
    # Off: the region of every followed face is searched, as without a detector to confirm with.
    off = RegionPlanner(GatingConfig(confirm_followed=False))
    off.plan(scene, 0.0)
    plan = off.plan(scene, 0.2, [here], confirm)
    assert plan.confirmed == () and len(plan.regions) == 1 and len(asked) == 3


def test_cameras_take_their_scheduled_full_frames_in_turn(background: np.ndarray) -> None:
    reasons = {}
    for phase in (0.0, 0.5):
        planner = RegionPlanner(GatingConfig(full_frame_interval_s=1.0), phase=phase)
        reasons[phase] = [planner.plan(background, 10.0 + i / 5).reason for i in range(11)]
    full = {p: [i for i, r in enumerate(rs) if r != "regions"] for p, rs in reasons.items()}
    assert full == {0.0: [0, 5, 10], 0.5: [0, 3, 8]}  # at least once a second either way
    with pytest.raises(ValueError, match="phase"):
        RegionPlanner(GatingConfig(), phase=1.0)


def test_whole_frame_on_schedule_looks_for_everyone_but_the_faces_confirmed(
    engine: Any, background: np.ndarray, face: np.ndarray
) -> None:
    scene = _with_face(background, face)
    (whole,) = engine.detect(scene)
    planner = RegionPlanner(GatingConfig(full_frame_interval_s=1.0))
    planner.plan(scene, 0.0)
    plan = planner.plan(_noisy(scene, 1), 1.0, [whole.box], engine.confirm)
    assert plan.full and plan.reason == "schedule" and len(plan.confirmed) == 1
    calls: list[Any] = []

    def detect(image: np.ndarray, exclude: Any = ()) -> list[Any]:
        calls.append(list(exclude))
        return engine.detect(image, exclude)

    (found,) = detect_in_regions(detect, scene, plan)
    # The whole frame is searched, her face excluded from the search and given once, as confirmed.
    assert calls == [[plan.confirmed[0].box]] and found is plan.confirmed[0]
    assert np.allclose(found.box, whole.box, atol=0.1 * FACE)
    # After a gap the followed boxes are not trusted: no confirmation, a plain whole-frame search.
    plan = planner.plan(scene, 3.0, [whole.box], engine.confirm)
    assert plan.full and plan.reason == "gap" and plan.confirmed == ()
