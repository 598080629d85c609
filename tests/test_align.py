"""Alignment: dlib's face chips reproduced without dlib, and template alignment for other embedders."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from engines.align import (
    ARCFACE_TEMPLATE_112,
    ChipTransform,
    align_to_template,
    dlib_chip_transform,
    dlib_chip_transforms,
    extract_chip,
    pyramid_down2,
    similarity_transform,
)
from engines.errors import ImageError, ModelError
from engines.landmarks import ShapePredictor, default_model_path
from tests.services import missing_model

ASTRONAUT_BOX = (175, 76, 265, 166)


@pytest.fixture(scope="module")
def predictor() -> ShapePredictor:
    try:
        return ShapePredictor.load(default_model_path())
    except ModelError as exc:
        missing_model(str(exc))


@pytest.fixture(scope="module")
def dlib_mod():
    return pytest.importorskip(
        "dlib", exc_type=ImportError, reason="comparison with dlib needs the dlib module: pip install dlib-bin"
    )


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data", reason="needs scikit-image for its astronaut test photo")
    return skdata.astronaut()


def _full_object_detection(dlib_mod, box, points):
    return dlib_mod.full_object_detection(
        dlib_mod.rectangle(*(int(v) for v in box)), [dlib_mod.point(int(x), int(y)) for x, y in points]
    )


# ------------------------------------------------------------------------------------------
# similarity_transform


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_similarity_transform_is_least_squares_and_never_mirrors():
    rng = np.random.default_rng(4)
    src = rng.uniform(0, 100, (5, 2))
    dst = src * [-1, 1] + rng.normal(0, 0.5, (5, 2))  # a mirror image: no similarity fits it
    m = similarity_transform(src, dst)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m[0, 0], m[1, 1], atol=1e-12)  # scale x rotation, no shear
    np.testing.assert_allclose(m[0, 1], -m[1, 0], atol=1e-12)

    # no small change of the parameters fits better
    def err(mm):
        return float(((src @ mm[:, :2].T + mm[:, 2] - dst) ** 2).sum())

    best = err(m)
    for d in np.eye(4) * 1e-3:
        a, b, tx, ty = m[0, 0] + d[0], m[1, 0] + d[1], m[0, 2] + d[2], m[1, 2] + d[3]
        assert err(np.array([[a, -b, tx], [b, a, ty]])) >= best


def test_similarity_transform_rejects_bad_points():
    with pytest.raises(ValueError, match="N >= 2"):
        similarity_transform(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(np.full((3, 2), np.nan), np.zeros((3, 2)))


# ------------------------------------------------------------------------------------------
# dlib chips


def test_chip_transform_matches_dlib(predictor, dlib_mod, astronaut):
    points = predictor.predict(astronaut, ASTRONAUT_BOX)
    ours = dlib_chip_transform(points, size=150, padding=0.25)
    theirs = dlib_mod.get_face_chip_details(_full_object_detection(dlib_mod, ASTRONAUT_BOX, points), 150, 0.25)
    r = theirs.rect
    np.testing.assert_allclose(ours.rect, (r.left(), r.top(), r.right(), r.bottom()), atol=1e-9)
    assert ours.angle == pytest.approx(theirs.angle, abs=1e-12)
    assert (ours.rows, ours.cols) == (theirs.rows, theirs.cols) == (150, 150)


def test_chip_transforms_of_many_faces_equal_each_alone(predictor, astronaut):
    points = predictor.predict(astronaut, ASTRONAUT_BOX)
    rng = np.random.default_rng(4)
    many = np.concatenate([points[None], points + rng.normal(0, 3, (20, 5, 2)), 2.5 * points[None] - 100])
    together = dlib_chip_transforms(many, size=150)
    assert together == [dlib_chip_transform(p, size=150) for p in many]
    with pytest.raises(ValueError, match=r"\(N, 5, 2\)"):
        dlib_chip_transforms(many[0])


def test_image_to_chip_puts_landmarks_on_the_template(predictor, astronaut):
    points = predictor.predict(astronaut, ASTRONAUT_BOX, subpixel=True)
    chip = dlib_chip_transform(points, size=150, padding=0.25)
    mapped = points @ chip.image_to_chip()[:, :2].T + chip.image_to_chip()[:, 2]
    from engines.align import DLIB_TEMPLATE5

    expected = (0.25 + DLIB_TEMPLATE5) / 1.5 * 150
    # 5 points, 4 parameters: close, not exact; and all inside the chip
    assert np.abs(mapped - expected).max() < 3.0


@pytest.mark.parametrize("upscale", [1, 4], ids=["plain", "pyramid"])
def test_chip_matches_dlib_get_face_chip(predictor, dlib_mod, astronaut, upscale):
    """At 4x the face is ~360 px and dlib samples from its image pyramid; both paths agree."""
    import cv2

    img = astronaut if upscale == 1 else cv2.resize(astronaut, None, fx=upscale, fy=upscale)
    box = tuple(v * upscale for v in ASTRONAUT_BOX)
    points = predictor.predict(img, box)
    ours = extract_chip(img, dlib_chip_transform(points, 150, 0.25), 150)
    theirs = dlib_mod.get_face_chip(img, _full_object_detection(dlib_mod, box, points), size=150, padding=0.25)
    assert ours.shape == (150, 150, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)


def test_chip_past_the_image_edge_matches_dlib(predictor, dlib_mod, astronaut):
    crop = np.ascontiguousarray(astronaut[95:, 190:])  # the chip reaches past the top and left
    box = (175 - 190, 76 - 95, 265 - 190, 166 - 95)
    points = predictor.predict(crop, box)
    ours = extract_chip(crop, dlib_chip_transform(points, 150, 0.25))
    theirs = dlib_mod.get_face_chip(crop, _full_object_detection(dlib_mod, box, points), size=150, padding=0.25)
    assert (ours == 0).all(axis=2).any()  # there is a black border
    np.testing.assert_array_equal(ours, theirs)


def test_random_rotated_chips_match_dlib_extract_image_chip(dlib_mod, astronaut):
    """Chips of every kind against dlib's own extract_image_chip, to the byte: rotated, scaled up
    and down (through the pyramid), non-square, and reaching past every edge of the image."""
    rng = np.random.default_rng(11)
    crop = np.ascontiguousarray(astronaut[60:300, 140:330])
    for i in range(60):
        img = crop if i % 2 else astronaut
        h, w = img.shape[:2]
        side = float(rng.uniform(20, 1.2 * min(h, w)))
        left, top = float(rng.uniform(-0.3 * side, w - 0.7 * side)), float(rng.uniform(-0.3 * side, h - 0.7 * side))
        rect = (left, top, left + side * float(rng.uniform(0.7, 1.3)), top + side)
        rows, cols = (150, 150) if i % 3 else (int(rng.integers(10, 200)), int(rng.integers(10, 200)))
        angle = float(rng.uniform(-math.pi, math.pi))
        ours = extract_chip(img, ChipTransform(rect=rect, angle=angle, rows=rows, cols=cols))
        details = dlib_mod.chip_details(dlib_mod.drectangle(*rect), dlib_mod.chip_dims(rows, cols), angle)
        np.testing.assert_array_equal(ours, dlib_mod.extract_image_chip(img, details), err_msg=f"chip {i}")


def test_pyramid_down_halves_the_image():
    img = np.random.default_rng(0).integers(0, 256, (101, 64, 3), dtype=np.uint8)
    down = pyramid_down2(img)
    assert down.shape == ((101 - 3) // 2, (64 - 3) // 2, 3)
    flat = np.full((40, 40, 3), 77, dtype=np.uint8)
    assert (pyramid_down2(flat) == 77).all()  # the 5x5 binomial kernel sums to 256
    assert pyramid_down2(img[:8]).shape[:2] == (0, 0)


def test_pyramid_down_matches_dlib(dlib_mod, astronaut):
    """Random images of odd and even sizes (white ones too, the uint16 sums' largest case) and a photo."""
    rng = np.random.default_rng(2)
    down = dlib_mod.pyramid_down(2)
    images = [
        rng.integers(0, 256, (int(rng.integers(9, 120)), int(rng.integers(9, 120)), 3), np.uint8) for _ in range(20)
    ]
    images += [np.full((33, 40, 3), 255, np.uint8), astronaut]
    for img in images:
        np.testing.assert_array_equal(pyramid_down2(img), down(img), err_msg=f"image {img.shape}")


@pytest.mark.data
def test_lag_sample_chips_and_embeddings_match_dlib(predictor, dlib_mod, lag_dir):
    """Chips of ~100 real photos against dlib's, and dlib's own embedding of a subset of each."""
    import cv2
    import face_recognition_models

    from engines.image import load_image

    facerec = dlib_mod.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
    files = sorted(lag_dir.rglob("*.png"))
    files = [f for f in files if zlib.crc32(str(f.relative_to(lag_dir)).encode()) % 23 == 1][:100]
    assert len(files) >= 50
    diffs, cosines = [], []
    for i, f in enumerate(files):
        img = cv2.copyMakeBorder(load_image(f), 30, 30, 30, 30, cv2.BORDER_REFLECT_101)
        box = (40, 40, 119, 119)
        points = predictor.predict(img, box)
        ours = extract_chip(img, dlib_chip_transform(points, 150, 0.25), 150)
        theirs = dlib_mod.get_face_chip(img, _full_object_detection(dlib_mod, box, points), size=150, padding=0.25)
        diffs.append(np.abs(ours.astype(int) - theirs.astype(int)).mean())
        if i % 10 == 0:
            u, v = (np.asarray(facerec.compute_face_descriptor(c)) for c in (ours, theirs))
            cosines.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    assert max(diffs) < 1.0
    assert min(cosines) >= 0.999


def test_extract_chip_rejects_bad_input(astronaut):
    chip = ChipTransform(rect=(10.0, 10.0, 59.0, 59.0), angle=0.1, rows=50, cols=50)
    with pytest.raises(ImageError, match="chip source: expected dtype uint8"):
        extract_chip(astronaut.astype(np.float32), chip)
    with pytest.raises(ValueError, match="size 60"):
        extract_chip(astronaut, chip, 60)
    assert extract_chip(astronaut, chip).shape == (50, 50, 3)


def test_dlib_chip_transform_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        dlib_chip_transform(np.zeros((68, 2)))
    with pytest.raises(ValueError, match="chip size"):
        dlib_chip_transform(np.arange(10.0).reshape(5, 2), size=0)


# ------------------------------------------------------------------------------------------
# Template alignment


def test_align_to_template_puts_marks_on_the_template():
    """Five bright dots at 'landmarks' on a dark image end up at the template's points."""
    import cv2

    landmarks = np.array([[300.0, 210.0], [372.0, 230.0], [330.0, 265.0], [300.0, 300.0], [355.0, 315.0]])
    template = ARCFACE_TEMPLATE_112
    # place the dots where the landmarks' best similarity fit puts the template, so the fit is exact
    inv = cv2.invertAffineTransform(similarity_transform(landmarks, template))
    dots = template.astype(np.float64) @ inv[:, :2].T + inv[:, 2]
    img = np.zeros((480, 640, 3), dtype=np.uint8)
    for x, y in dots:
        cv2.circle(img, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    chip = align_to_template(img, dots, template, (112, 112))
    assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
    grey = chip[:, :, 0].astype(float)
    for tx, ty in template:
        ys, xs = np.mgrid[int(ty) - 4 : int(ty) + 5, int(tx) - 4 : int(tx) + 5]
        w = grey[ys, xs]
        assert w.sum() > 0
        assert abs((xs * w).sum() / w.sum() - tx) < 1.0 and abs((ys * w).sum() / w.sum() - ty) < 1.0


def test_align_to_template_on_a_real_face(astronaut):
    # MTCNN's points on the astronaut (engines.detector, recorded)
    points = np.array([[205.5, 100.7], [248.3, 103.3], [225.6, 128.9], [202.1, 139.3], [246.2, 141.8]])
    chip = align_to_template(astronaut, points)
    assert chip.shape == (112, 112, 3)
    m = similarity_transform(points, ARCFACE_TEMPLATE_112)
    mapped = points @ m[:, :2].T + m[:, 2]
    # a smiling mouth is wider than the template's; the eyes land within a few pixels
    assert np.abs(mapped[:2] - ARCFACE_TEMPLATE_112[:2]).max() < 3.0
    assert np.abs(mapped - ARCFACE_TEMPLATE_112).max() < 8.0
    assert chip.mean() > 40  # a face, not the black border


def test_align_to_template_rejects_mismatched_shapes(astronaut):
    with pytest.raises(ValueError, match="template"):
        align_to_template(astronaut, np.zeros((5, 2)), np.zeros((4, 2)), (112, 112))
