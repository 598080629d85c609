"""dlib's 5-point landmark model in numpy, checked against dlib itself on real faces."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from engines.errors import ImageError, ModelError
from engines.landmarks import ShapePredictor, default_model_path, dlib_box_from_points
from tests.services import missing_model

# dlib 20.0.1's shape_predictor on skimage's astronaut (public domain, NASA) for the box dlib's
# HOG detector finds there; kept so the numpy port is checked even where dlib is absent.
ASTRONAUT_BOX = (175, 76, 265, 166)
ASTRONAUT_DLIB_POINTS = [[255, 104], [238, 105], [195, 101], [212, 103], [224, 135]]


@pytest.fixture(scope="module")
def model_path() -> Path:
    try:
        return default_model_path()
    except ModelError as exc:
        missing_model(str(exc))


@pytest.fixture(scope="module")
def predictor(model_path) -> ShapePredictor:
    return ShapePredictor.load(model_path)


@pytest.fixture(scope="module")
def dlib_predictor(model_path):
    dlib = pytest.importorskip(
        "dlib", exc_type=ImportError, reason="comparison with dlib needs the dlib module: pip install dlib-bin"
    )
    return dlib, dlib.shape_predictor(str(model_path))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data", reason="needs scikit-image for its astronaut test photo")
    return skdata.astronaut()


def _dlib_points(dlib_mod, sp, image, box) -> np.ndarray:
    shape = sp(image, dlib_mod.rectangle(*(int(v) for v in box)))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def test_model_structure(predictor):
    assert predictor.num_parts == 5
    assert len(predictor.levels) == 15
    level = predictor.levels[0]
    assert (level.n_trees, level.n_splits, level.depth) == (500, 15, 4)
    assert level.deltas.shape == (800, 2)


def test_astronaut_matches_recorded_dlib_points(predictor, astronaut):
    points = predictor.predict(astronaut, ASTRONAUT_BOX)
    assert points.dtype == np.float32 and points.shape == (5, 2)
    np.testing.assert_array_equal(points, np.array(ASTRONAUT_DLIB_POINTS, dtype=np.float32))


def test_astronaut_matches_dlib(predictor, dlib_predictor, astronaut):
    dlib_mod, sp = dlib_predictor
    boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in dlib_mod.get_frontal_face_detector()(astronaut, 1)]
    assert ASTRONAUT_BOX in boxes
    for box in boxes:
        np.testing.assert_array_equal(predictor.predict(astronaut, box), _dlib_points(dlib_mod, sp, astronaut, box))


def test_grey_image_matches_dlib(predictor, dlib_predictor, astronaut):
    dlib_mod, sp = dlib_predictor
    grey = np.ascontiguousarray(astronaut.mean(axis=2).astype(np.uint8))
    expected = _dlib_points(dlib_mod, sp, grey, ASTRONAUT_BOX)
    np.testing.assert_array_equal(predictor.predict(grey, ASTRONAUT_BOX), expected)


def test_box_partly_outside_image_matches_dlib(predictor, dlib_predictor, astronaut):
    dlib_mod, sp = dlib_predictor
    crop = np.ascontiguousarray(astronaut[110:, 200:])  # the face's top-left corner is cut off
    box = (175 - 200, 76 - 110, 265 - 200, 166 - 110)
    np.testing.assert_array_equal(predictor.predict(crop, box), _dlib_points(dlib_mod, sp, crop, box))


@pytest.mark.data
def test_lag_sample_matches_dlib(predictor, dlib_predictor, lag_dir):
    """~100 real photos, each with a margin, for the central box and three random boxes
    (some reaching past the image edge): dlib's points, to the pixel."""
    import cv2

    from engines.image import load_image

    dlib_mod, sp = dlib_predictor
    files = sorted(lag_dir.rglob("*.png"))
    files = [f for f in files if zlib.crc32(str(f.relative_to(lag_dir)).encode()) % 23 == 0][:100]
    assert len(files) >= 50
    rng = np.random.default_rng(7)
    worst, compared = 0.0, 0
    for f in files:
        img = cv2.copyMakeBorder(load_image(f), 30, 30, 30, 30, cv2.BORDER_REFLECT_101)
        h, w = img.shape[:2]
        boxes = [(40, 40, 119, 119)]
        for _ in range(3):
            s = int(rng.integers(40, 160))
            x, y = int(rng.integers(-30, w - 20)), int(rng.integers(-30, h - 20))
            boxes.append((x, y, x + s, y + s))
        ours = predictor.predict_many(img, boxes)
        for box, got in zip(boxes, ours, strict=True):
            worst = max(worst, float(np.abs(got - _dlib_points(dlib_mod, sp, img, box)).max()))
            compared += 1
    assert compared >= 200
    assert worst <= 0.01


def test_predict_many_equals_one_by_one(predictor, astronaut):
    boxes = [ASTRONAUT_BOX, (126.0, 335.0, 215.0, 425.0), (170.5, 70.25, 270.5, 171.75)]
    together = predictor.predict_many(astronaut, boxes)
    assert together.shape == (3, 5, 2)
    for box, got in zip(boxes, together, strict=True):
        np.testing.assert_array_equal(got, predictor.predict(astronaut, box))


def test_predict_batch_equals_predict_many_per_image(predictor, astronaut):
    """Faces of several images (RGB and grey, boxes past the edges, one image twice) in one pass:
    the points predict_many gives image by image, in item order."""
    import cv2

    grey = np.ascontiguousarray(astronaut.mean(axis=2).astype(np.uint8))
    small = cv2.resize(astronaut, None, fx=0.5, fy=0.5)
    crop = np.ascontiguousarray(astronaut[110:, 200:])
    items = [
        (astronaut, [ASTRONAUT_BOX, (170.5, 70.25, 270.5, 171.75)]),
        (grey, [ASTRONAUT_BOX]),
        (small, [(87.5, 38.0, 132.5, 83.0), (-20.0, -10.0, 60.0, 70.0), (230.0, 200.0, 300.0, 290.0)]),
        (crop, (175 - 200, 76 - 110, 265 - 200, 166 - 110)),
        (astronaut, [(126.0, 335.0, 215.0, 425.0)]),
    ]
    for subpixel in (False, True):
        batch = predictor.predict_batch(items, subpixel=subpixel)
        expected = np.concatenate([predictor.predict_many(img, boxes, subpixel=subpixel) for img, boxes in items])
        assert batch.shape == (8, 5, 2) and batch.dtype == np.float32
        np.testing.assert_array_equal(batch, expected)
        # and each face alone, so the batch changes nothing about a face
        alone = [
            predictor.predict(img, box, subpixel=subpixel) for img, boxes in items for box in np.reshape(boxes, (-1, 4))
        ]
        np.testing.assert_array_equal(batch, np.stack(alone))
    assert predictor.predict_batch([]).shape == (0, 5, 2)


def test_predict_batch_names_a_bad_image(predictor, astronaut):
    with pytest.raises(ImageError, match="uint8"):
        predictor.predict_batch([(astronaut, [ASTRONAUT_BOX]), (astronaut.astype(np.float32), [ASTRONAUT_BOX])])


def test_subpixel_rounds_to_dlib_points(predictor, astronaut):
    fine = predictor.predict(astronaut, ASTRONAUT_BOX, subpixel=True)
    assert not np.array_equal(fine, np.round(fine))
    np.testing.assert_array_equal(np.floor(fine + 0.5), np.array(ASTRONAUT_DLIB_POINTS, dtype=np.float32))


def test_landmarks_follow_a_moved_face(predictor, astronaut):
    """Shifting image and box together by whole pixels shifts the points by the same amount."""
    shifted = np.zeros((astronaut.shape[0] + 17, astronaut.shape[1] + 9, 3), dtype=np.uint8)
    shifted[17:, 9:] = astronaut
    x1, y1, x2, y2 = ASTRONAUT_BOX
    moved = predictor.predict(shifted, (x1 + 9, y1 + 17, x2 + 9, y2 + 17))
    back = moved - np.array([9, 17], dtype=np.float32)
    np.testing.assert_array_equal(back, predictor.predict(astronaut, ASTRONAUT_BOX))


@pytest.mark.parametrize(
    "bad, what",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (np.zeros((10, 10, 4), dtype=np.uint8), "shape"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images_are_named(predictor, bad, what):
    with pytest.raises(ImageError, match=what):
        predictor.predict(bad, (0, 0, 5, 5))


def test_bad_boxes_are_named(predictor, astronaut):
    with pytest.raises(ValueError, match="x2 > x1"):
        predictor.predict(astronaut, (10, 10, 5, 20))
    with pytest.raises(ValueError, match="finite"):
        predictor.predict(astronaut, (10, 10, np.nan, 20))


@pytest.fixture(scope="module")
def model_bytes(model_path) -> bytes:
    return model_path.read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated-half"),
        pytest.param(lambda b: b[:-3], id="truncated-end"),
        pytest.param(lambda b: b[:40], id="truncated-header"),
        pytest.param(lambda b: b + b"\x01\x05", id="trailing-bytes"),
        pytest.param(lambda b: b"\x01\x02" + b[2:], id="wrong-version"),
        pytest.param(lambda b: b[:5000] + b"\x7f" + b[5001:], id="bad-control-byte"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: bytes(range(256)) * 100, id="garbage"),
    ],
)
def test_damaged_model_file_is_a_model_error(model_bytes, tmp_path, damage):
    path = tmp_path / "shape_predictor_5_face_landmarks.dat"
    path.write_bytes(damage(model_bytes))
    with pytest.raises(ModelError, match=str(path)):
        ShapePredictor.load(path)


def test_missing_model_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="cannot read"):
        ShapePredictor.load(tmp_path / "nope.dat")


# ------------------------------------------------------------------------------------------
# Box from detector points


def test_box_from_points_is_similarity_covariant():
    pts = np.array([[100, 100], [140, 102], [121, 125], [104, 146], [137, 148]], dtype=np.float64)
    x1, y1, x2, y2 = dlib_box_from_points(pts)
    assert x2 - x1 == pytest.approx(y2 - y1)
    assert x1 < pts[:, 0].min() and x2 > pts[:, 0].max() and y1 < pts[:, 1].min() and y2 > pts[:, 1].max()
    # twice the size, moved: the box doubles and moves with the points
    bx1, by1, bx2, by2 = dlib_box_from_points(pts * 2 + [30, -7])
    assert bx2 - bx1 == pytest.approx(2 * (x2 - x1))
    assert ((bx1 + bx2) / 2, (by1 + by2) / 2) == pytest.approx((x1 + x2 + 30, y1 + y2 - 7))


def test_box_from_points_rejects_degenerate_points():
    with pytest.raises(ValueError, match="degenerate"):
        dlib_box_from_points(np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        dlib_box_from_points(np.zeros((4, 2)))


@pytest.fixture(scope="module")
def mtcnn(tmp_path_factory):
    from engines.detector import MtcnnConfig, MtcnnDetector
    from engines.mtcnn_convert import MtcnnWeightsError, convert_mtcnn, find_mtcnn_weights

    try:
        sources = find_mtcnn_weights()
    except MtcnnWeightsError as exc:
        missing_model(f"needs facenet-pytorch's MTCNN weights: pip install --no-deps facenet-pytorch ({exc})")
    return MtcnnDetector(convert_mtcnn(tmp_path_factory.mktemp("mtcnn"), sources), MtcnnConfig(min_face_size=40))


def test_box_from_mtcnn_points_gives_the_hog_box_landmarks(predictor, mtcnn, astronaut):
    """The point of the mapping: dlib's landmarks from the box made from MTCNN's points are
    those from dlib's own detector box, to a small fraction of the eye distance."""
    det = max(mtcnn.detect(astronaut), key=lambda d: d.score)
    ref = predictor.predict(astronaut, ASTRONAUT_BOX, subpixel=True)
    got = predictor.predict(astronaut, dlib_box_from_points(det.landmarks), subpixel=True)
    eye_dist = np.hypot(*((ref[0] + ref[1]) / 2 - (ref[2] + ref[3]) / 2))
    assert np.abs(got - ref).max() < 0.05 * eye_dist
    # MTCNN's own box, unmapped, is measurably worse on this face
    raw = predictor.predict(astronaut, det.box, subpixel=True)
    assert np.abs(raw - ref).max() > np.abs(got - ref).max()
