"""The face engine end to end: conversion cache, detection, alignment, quality, embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from engines.cli import main as engines_cli
from engines.config import EngineConfig
from engines.errors import ImageError, ModelError
from engines.face_engine import FaceEngine

skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the public-domain test photo")


# dlib's ResNet alone: these tests are about its conversion, cache and 129-d embeddings, in a fresh cache
# that holds no npm model (the default ensemble's other members come from `engines build`).
DLIB = ("dlib-resnet-v1",)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def engine(cache_dir):
    return FaceEngine.load(EngineConfig(cache_dir=cache_dir, backend="onnxruntime", ensemble=DLIB))


def test_conversion_cache_is_keyed_by_source_hash(engine, cache_dir):
    folders = sorted(p.name for p in cache_dir.iterdir() if p.is_dir())
    assert any(f.startswith("dlib-resnet-v1-") for f in folders)
    assert any(f.startswith("mtcnn-") for f in folders)
    onnx_file = next(cache_dir.glob("dlib-resnet-v1-*/model.onnx"))
    before = onnx_file.stat().st_mtime_ns
    FaceEngine.load(EngineConfig(cache_dir=cache_dir, backend="onnxruntime", ensemble=DLIB))
    assert onnx_file.stat().st_mtime_ns == before, "a second load reuses the cached conversion"
    assert engine.model_id.startswith("dlib-resnet-v1:")


def test_one_face_with_a_unit_embedding(engine):
    faces = engine.analyze(skdata.astronaut())
    assert len(faces) == 1
    f = faces[0]
    assert f.quality.ok, f.quality.reasons
    assert f.embedding.shape == (engine.embedding_dim,) == (129,)
    assert abs(np.linalg.norm(f.embedding) - 1) < 1e-5
    x1, y1, x2, y2 = f.box
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 220


def test_same_person_scores_higher_than_a_different_face(engine):
    import cv2

    img = skdata.astronaut()
    small = cv2.resize(img, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    a = engine.analyze(img)[0].embedding
    b = engine.analyze(small)[0].embedding
    # A different person: the cameraman, another public-domain photo shipped with scikit-image.
    cameraman = np.ascontiguousarray(np.stack([skdata.camera()] * 3, axis=-1))
    other = engine.analyze(cameraman, embed_rejected=True)
    assert len(other) == 1
    same = float(a @ b)
    assert same > float(a @ other[0].embedding) + 0.005
    assert same > 0.98


def test_faces_of_several_images_embed_in_one_batch(engine):
    import cv2

    img = skdata.astronaut()
    small = cv2.resize(img, None, fx=0.5, fy=0.5)
    items = [(img, engine.detect(img)[0]), (small, engine.detect(small)[0])]
    batch = engine.embed(items)
    one = engine.embed(items[1:])
    assert batch.shape == (2, 129)
    np.testing.assert_allclose(batch[1], one[0], atol=1e-5)


def test_align_many_matches_aligning_each_face_alone(engine):
    """Faces of several images, interleaved, one image twice: the chips align gives face by face,
    cut from the image with dlib's points (extract_chip of dlib_chip_transform)."""
    import cv2

    from engines.align import dlib_chip_transform, extract_chip
    from engines.landmarks import dlib_box_from_points

    img = skdata.astronaut()
    small = cv2.resize(img, None, fx=0.5, fy=0.5)
    shifted = np.ascontiguousarray(np.roll(img, (40, -60), axis=(0, 1)))
    dets = {id(x): engine.detect(x)[0] for x in (img, small, shifted)}
    items = [(img, dets[id(img)]), (small, dets[id(small)]), (img, dets[id(img)]), (shifted, dets[id(shifted)])]
    chips = engine.align_many(items)
    assert chips.shape == (4, 150, 150, 3) and chips.dtype == np.uint8
    for chip, (image, det) in zip(chips, items, strict=True):
        np.testing.assert_array_equal(chip, engine.align(image, [det])[0])
        points = engine.shape_predictor.predict(image, dlib_box_from_points(det.landmarks))
        np.testing.assert_array_equal(chip, extract_chip(image, dlib_chip_transform(points, 150)))
    assert engine.align_many([]).shape == (0, 150, 150, 3)


def test_align_many_template_alignment():
    """Embedders aligned to a 5-point template (ArcFace-style) get align_to_template's chips."""
    from engines.align import ARCFACE_TEMPLATE_112, align_to_template
    from engines.detector import Detection
    from engines.face_engine import align_many
    from engines.model_spec import EmbedderSpec

    spec = EmbedderSpec(
        name="arcface-like",
        input_width=112,
        input_height=112,
        alignment="template",
        template=tuple(map(tuple, ARCFACE_TEMPLATE_112.tolist())),
        embedding_size=512,
    )
    img = skdata.astronaut()
    marks = np.array([[200.0, 115.0], [240.0, 112.0], [222.0, 138.0], [205.0, 158.0], [238.0, 156.0]], np.float32)
    det = Detection(box=(170.0, 70.0, 270.0, 180.0), score=0.99, landmarks=marks)
    chips = align_many([(img, det), (img[::-1].copy(), det)], spec, None)
    assert chips.shape == (2, 112, 112, 3)
    np.testing.assert_array_equal(chips[0], align_to_template(img, marks, ARCFACE_TEMPLATE_112, (112, 112)))


def test_align_many_names_a_bad_image(engine):
    det = engine.detect(skdata.astronaut())[0]
    with pytest.raises(ImageError, match="uint8"):
        engine.align_many([(skdata.astronaut(), det), (np.zeros((10, 10, 3), np.float32), det)])


def test_no_faces_in_a_blank_frame(engine):
    assert engine.analyze(np.full((480, 640, 3), 127, np.uint8)) == []


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((10, 10), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        ("photo.jpg", "numpy array"),
    ],
)
def test_bad_images_are_named(engine, bad, message):
    with pytest.raises(ImageError, match=message):
        engine.analyze(bad)


def test_corrupt_cached_model_is_named_and_rebuild_fixes_it(tmp_path):
    cache = tmp_path / "cache"
    FaceEngine.load(EngineConfig(cache_dir=cache, backend="onnxruntime", ensemble=DLIB))
    onnx_file = next(cache.glob("dlib-resnet-v1-*/model.onnx"))
    onnx_file.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="corrupt"):
        FaceEngine.load(EngineConfig(cache_dir=cache, backend="onnxruntime", ensemble=DLIB))
    result = CliRunner().invoke(
        engines_cli, ["build", "--cache-dir", str(cache), "--rebuild", "--backend", "onnxruntime"]
    )
    assert result.exit_code == 0, result.output
    assert "dlib-resnet-v1:" in result.output
    FaceEngine.load(EngineConfig(cache_dir=cache, backend="onnxruntime", ensemble=DLIB))


def test_custom_embedder_missing_file_is_named(tmp_path):
    from engines.model_spec import ARCFACE_112_TEMPLATE, EmbedderSpec

    spec = EmbedderSpec(
        name="arcface",
        onnx=tmp_path / "nope.onnx",
        input_width=112,
        input_height=112,
        template=ARCFACE_112_TEMPLATE,
        embedding_size=512,
    )
    with pytest.raises(ModelError, match="engine.embedder.onnx"):
        FaceEngine.load(EngineConfig(cache_dir=tmp_path / "c", embedder=spec))


def test_cli_analyze_prints_faces(tmp_path):
    """With the default cache, where `engines build` put the default ensemble's npm members."""
    import cv2

    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), skdata.astronaut()[:, :, ::-1])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    result = CliRunner().invoke(engines_cli, ["analyze", str(path), str(bad)])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["quality_ok"]
    assert result.exit_code == 1  # the broken file is reported
    assert "broken.jpg" in result.output
