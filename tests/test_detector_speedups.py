"""The detector's faster steps give what the slower definitions give: NMS, crops, PReLU."""

from __future__ import annotations

import numpy as np
import pytest

from engines.detector import MtcnnConfig, MtcnnDetector, nms, nms_reference
from engines.mtcnn_convert import convert_mtcnn

skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the public-domain test photo")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtcnn")
    convert_mtcnn(out)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_opencv_nms_keeps_what_the_reference_keeps(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 500))
    xy = rng.uniform(0, 300, (n, 2))
    wh = rng.uniform(1, 80, (n, 2))
    if seed % 2:  # whole pixels and rounded scores: many exact ties
        xy, wh = np.floor(xy), np.floor(wh)
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if seed % 2:
        scores = np.round(scores, 1)
    for threshold in (0.5, 0.7):
        np.testing.assert_array_equal(nms(boxes, scores, threshold), nms_reference(boxes, scores, threshold))


def test_converted_nets_use_no_prelu_kernel(model_dir):
    for net in ("pnet", "rnet", "onet"):
        ops = {n.op_type for n in onnx.load(str(model_dir / f"{net}.onnx")).graph.node}
        assert "PRelu" not in ops and "Relu" in ops, net


def test_crops_sampled_from_the_pyramid_match_area_resampling_of_the_frame(model_dir):
    import cv2

    det = MtcnnDetector(model_dir, MtcnnConfig(min_face_size=40))
    img = cv2.resize(skdata.astronaut(), (1280, 720), interpolation=cv2.INTER_LINEAR)
    _, sources = det._pyramid(img)
    rng = np.random.default_rng(0)
    side = rng.uniform(30, 300, 60)
    x1 = rng.uniform(-20, 1280 - side)
    y1 = rng.uniform(-20, 720 - side)
    boxes = np.stack([x1, y1, x1 + side, y1 + side, np.ones_like(side)], axis=1).astype(np.float32)
    for size in (24, 48):
        got, kept = MtcnnDetector._crops(img, sources, boxes, size)
        assert len(kept) == len(boxes)
        ours, shifted = [], []
        for j, (bx, by, ex, ey) in enumerate(np.trunc(boxes[:, :4]).astype(int)):
            x0, y0, ex, ey = max(bx, 1) - 1, max(by, 1) - 1, min(ex, 1280), min(ey, 720)
            ref = _area_crop(img[y0:ey, x0:ex], size)
            ours.append(np.abs(got[j].transpose(1, 2, 0) - ref).mean())
            step = max(1, (ex - x0) // size)  # one output pixel
            shifted.append(np.abs(_area_crop(img[y0 + step : ey, x0 + step : ex], size) - ref).mean())
        # Closer to facenet-pytorch's crops than those crops are to themselves moved by one output pixel.
        assert np.median(ours) < 0.5 * np.median(shifted), (np.median(ours), np.median(shifted))
        assert max(ours) < 0.1


def _area_crop(patch: np.ndarray, size: int) -> np.ndarray:
    import cv2

    out = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (out - 127.5) * 0.0078125
