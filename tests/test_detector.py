"""MTCNN detector end to end on a real face photo (skimage's astronaut, public domain, NASA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.detector import Detection, MtcnnConfig, MtcnnDetector, nms, pyramid_scales
from engines.errors import ImageError, ModelError
from engines.mtcnn_convert import MtcnnWeightsError, convert_mtcnn, find_mtcnn_weights
from tests.services import missing_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    try:
        sources = find_mtcnn_weights()
    except MtcnnWeightsError as exc:
        missing_model(f"needs facenet-pytorch's MTCNN weights: pip install --no-deps facenet-pytorch ({exc})")
    out = tmp_path_factory.mktemp("mtcnn")
    convert_mtcnn(out, sources)
    return out


@pytest.fixture(scope="module")
def detector(model_dir) -> MtcnnDetector:
    return MtcnnDetector(model_dir, MtcnnConfig(min_face_size=40, intra_op_threads=1))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data", reason="needs scikit-image for its astronaut test photo")
    return skdata.astronaut()


def _check_face_geometry(det: Detection) -> None:
    x1, y1, x2, y2 = det.box
    lm = det.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    left_eye, right_eye, nose, left_mouth, right_mouth = lm
    assert np.all((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2)), (det.box, lm)
    assert left_eye[0] < nose[0] < right_eye[0]
    assert left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])


def test_finds_the_one_face_in_the_astronaut_photo(detector, astronaut):
    found = detector.detect(astronaut)
    assert len(found) == 1
    det = found[0]
    assert det.score > 0.95
    x1, y1, x2, y2 = det.box
    # Her face spans roughly x 180..265, y 65..175 in the 512x512 photo.
    assert 160 < x1 < 200 and 245 < x2 < 290 and 40 < y1 < 90 and 150 < y2 < 200, det.box
    _check_face_geometry(det)


def test_finds_a_40px_face_in_a_720p_frame(detector, astronaut):
    import cv2

    # The detected face box is about 112 px high at full size; shrink it to ~40 px.
    s = 40 / 112
    small = cv2.resize(astronaut, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    frame = np.full((720, 1280, 3), 128, dtype=np.uint8)
    top, left = 400, 900
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    found = detector.detect(frame)
    assert len(found) == 1
    det = found[0]
    x1, y1, x2, y2 = det.box
    assert 30 <= y2 - y1 <= 55, det.box
    assert left + 180 * s - 8 < x1 < left + 200 * s + 8 and top + 40 * s - 8 < y1 < top + 90 * s + 8, det.box
    _check_face_geometry(det)


def test_min_face_size_bounds_the_search(model_dir, astronaut):
    import cv2

    small = cv2.resize(astronaut, None, fx=40 / 112, fy=40 / 112, interpolation=cv2.INTER_AREA)
    frame = np.full((720, 1280, 3), 128, dtype=np.uint8)
    frame[100 : 100 + small.shape[0], 100 : 100 + small.shape[1]] = small
    coarse = MtcnnDetector(model_dir, MtcnnConfig(min_face_size=120))
    assert coarse.detect(frame) == []


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_image_has_no_faces(detector, value):
    assert detector.detect(np.full((480, 640, 3), value, dtype=np.uint8)) == []


def test_image_smaller_than_the_smallest_face_has_no_faces(detector):
    assert detector.detect(np.full((20, 30, 3), 100, dtype=np.uint8)) == []


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((100, 100, 3), dtype=np.float32), "uint8"),
        (np.zeros((100, 100), dtype=np.uint8), r"\(H, W, 3\)"),
        (np.zeros((100, 100, 4), dtype=np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 100, 3), dtype=np.uint8), "empty"),
        ([[0, 0, 0]], "numpy array"),
    ],
    ids=["float", "grey", "rgba", "empty", "list"],
)
def test_bad_input_raises_image_error(detector, bad, match):
    with pytest.raises(ImageError, match=match):
        detector.detect(bad)


def test_missing_model_files_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="convert_mtcnn"):
        MtcnnDetector(tmp_path)


def test_config_rejects_unknown_keys_and_bad_thresholds():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_face"):
        MtcnnConfig(min_face=40)
    with pytest.raises(ValidationError, match="probability"):
        MtcnnConfig(thresholds=(0.6, 1.5, 0.7))


def test_pyramid_covers_min_face_to_whole_image():
    scales = pyramid_scales(1080, 1920, 40, 0.709)
    assert scales[0] == pytest.approx(12 / 40)
    # The last level still holds one 12 px P-Net window; the next would not.
    assert 1080 * scales[-1] >= 12 > 1080 * scales[-1] * 0.709


def test_nms_union_and_min():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 6, 6]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], dtype=np.float32)
    # IoU(0,1) = 81/119 = 0.68; box 3 lies inside box 0 (IoU 0.16, but 100% of the smaller box).
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [3, 0, 1, 2]
    assert nms(boxes, scores, 0.7, mode="min").tolist() == [3, 2]


def test_confirm_finds_a_face_where_it_was_and_nothing_where_none_is(detector, astronaut):
    (whole,) = detector.detect(astronaut)
    x1, y1, x2, y2 = whole.box
    side = x2 - x1
    moved = (x1 + side / 4, y1, x2 + side / 4, y2)  # asked a quarter of a face to the right of where she is
    background = (400.0, 380.0, 500.0, 480.0)  # her suit, no face
    same, shifted, nothing = detector.confirm(astronaut, [whole.box, moved, background])
    # One O-Net look gives the face the whole search gave: box, landmarks, score.
    assert same is not None and shifted is not None and nothing is None
    assert np.allclose(same.box, whole.box, atol=0.08 * side), (same.box, whole.box)
    assert np.allclose(same.landmarks, whole.landmarks, atol=0.05 * side)
    assert same.score > 0.95
    _check_face_geometry(same)
    # R-Net's and O-Net's regressions pull a box that is off by a quarter back onto the face ...
    assert abs(shifted.box[0] - x1) < abs(moved[0] - x1) / 2, (shifted.box, whole.box)
    # ... but a face found half a face away from where it was asked about is not the one followed there.
    (far,) = detector.confirm(astronaut, [(x1 + side / 2, y1, x2 + side / 2, y2)])
    assert far is None


def test_confirm_refuses_a_face_that_is_not_the_one_asked_about(detector, astronaut):
    (whole,) = detector.detect(astronaut)
    x1, y1, x2, y2 = whole.box
    side = x2 - x1
    # A box three times the face around it: O-Net may see the face, but its box would overlap the one asked
    # about too little to be the face that was followed there.
    (wide,) = detector.confirm(astronaut, [(x1 - side, y1 - side, x2 + side, y2 + side)])
    assert wide is None
    assert detector.confirm(astronaut, []) == []


@pytest.mark.parametrize("boxes", [[(1.0, 2.0, 3.0)], [(0.0, 0.0, float("nan"), 10.0)], [1.0, 2.0, 3.0, 4.0]])
def test_confirm_and_exclude_reject_malformed_boxes(detector, astronaut, boxes):
    from engines.errors import BoxError

    with pytest.raises(BoxError, match=r"confirm\(\) wants \(x1, y1, x2, y2\) rows"):
        detector.confirm(astronaut, boxes)
    with pytest.raises(BoxError, match=r"detect\(exclude=...\) wants \(x1, y1, x2, y2\) rows"):
        detector.detect(astronaut, exclude=boxes)


def test_excluded_faces_are_not_found_again_and_the_others_are(detector, astronaut):
    import cv2

    # Two faces side by side: the astronaut and her mirror image.
    pair = np.concatenate([astronaut[:300, 100:400], cv2.flip(astronaut[:300, 100:400], 1)], axis=1)
    both = detector.detect(pair)
    assert len(both) == 2
    left, right = sorted(both, key=lambda d: d.box[0])
    rest = detector.detect(pair, exclude=[left.box])
    # The known face costs no crops and comes back no more; her neighbour is found exactly as before.
    assert len(rest) == 1 and np.allclose(rest[0].box, right.box) and np.allclose(rest[0].landmarks, right.landmarks)
    assert detector.detect(pair, exclude=[left.box, right.box]) == []
