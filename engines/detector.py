"""MTCNN face detector (Zhang et al. 2016) on ONNX Runtime, the pipeline in numpy.

Follows facenet-pytorch's detect_face() step by step: an image pyramid starting at
12 / min_face_size and shrinking by `factor`; P-Net on every level, per-level NMS (IoU
0.5), cross-level NMS (0.7), box regression, squaring; R-Net on 24x24 crops, NMS (0.7),
regression, squaring; O-Net on 48x48 crops giving landmarks, regression, and a final
NMS over the smaller box (0.7). R-Net and O-Net crops are batched into one run each.

Coordinates follow facenet-pytorch: boxes are (x1, y1, x2, y2) in image pixels and may
reach past the image edge (they are not clipped); landmarks are (x, y) in the order
left eye, right eye, nose, left mouth corner, right mouth corner, "left" meaning the
smaller x in the image for an upright face (the network's training convention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from common.config import StrictModel
from engines.errors import BoxError, ModelError
from engines.image import check_image

_PIXEL_MEAN = 127.5
_PIXEL_SCALE = 0.0078125
_PNET_CELL = 12
_PNET_STRIDE = 2
# R-/O-Net runs are split into chunks so a crowded frame cannot allocate without bound; chunks of 32
# also ran R-Net's ~240 candidates of a 720p frame in about 0.65-0.9x the time of one batch (cache-sized
# work), with identical outputs.
_BATCH = 32
# MtcnnDetector.confirm: how much the face found must still overlap the box asked about.
CONFIRM_MIN_IOU = 0.5
# MtcnnDetector.detect(exclude=...): a candidate box overlapping a known face this much is that face (a square
# candidate and the face's tight box overlap by 0.6-0.8; a neighbour's candidate much less).
EXCLUDE_IOU = 0.4


class MtcnnConfig(StrictModel):
    """Settings of the MTCNN detector (the `[detector]` table of the unit's TOML)."""

    min_face_size: int = Field(40, ge=12, description="smallest face height in pixels to look for")
    factor: float = Field(0.709, gt=0.3, lt=0.95, description="pyramid step between scales")
    thresholds: tuple[float, float, float] = Field(
        (0.6, 0.7, 0.7), description="face probability thresholds for P-Net, R-Net, O-Net"
    )
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads per model; 0 lets it choose")

    @field_validator("thresholds")
    @classmethod
    def _thresholds_are_probabilities(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 < t < 1.0 for t in v):
            raise ValueError(f"each threshold must be a probability in (0, 1), got {v}")
        return v


@dataclass(frozen=True)
class Detection:
    """One face found by the detector, in image pixels."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth


SessionFactory = Callable[[Path], Any]


def cpu_session_factory(intra_op_threads: int = 1) -> SessionFactory:
    """Return a callable that opens an ONNX model as a CPU onnxruntime.InferenceSession."""
    import onnxruntime as ort

    def make(path: Path) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    return make


def pyramid_scales(height: int, width: int, min_face_size: int, factor: float) -> list[float]:
    """Scales at which P-Net's 12 px window matches faces from min_face_size up to the whole image."""
    m = _PNET_CELL / min_face_size
    minl = min(height, width) * m
    scales = []
    scale = m
    while minl >= _PNET_CELL:
        scales.append(scale)
        scale *= factor
        minl *= factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    mode "union": IoU with areas (x2-x1)*(y2-y1) (torchvision's, as facenet-pytorch uses);
    mode "min": intersection over the smaller box with +1 pixel sizes (MTCNN's last stage).
    A box is dropped when its overlap with a kept box exceeds threshold.
    """
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    if (
        mode == "union"
        and boxes.shape[0] > 1
        and (boxes[:, 2] >= boxes[:, 0]).all()
        and (boxes[:, 3] >= boxes[:, 1]).all()
    ):
        # OpenCV's NMS computes the same IoU, keeps ties in index order, and runs in C++:
        # P-Net's first level gives thousands of boxes, where the loop below cost ~10 ms a frame.
        import cv2

        rects = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        # OpenCV wants positive float32 scores: pass each box's rank, which keeps ties in index order.
        ranks = np.empty(len(scores), dtype=np.float32)
        ranks[np.argsort(-scores, kind="stable")] = np.arange(len(scores), 0, -1)
        # OpenCV's stubs name Sequence types here; the function takes numpy arrays, without copying them to lists.
        keep = cv2.dnn.NMSBoxes(rects.astype(np.float64), ranks, 0.0, float(threshold))  # type: ignore[arg-type]
        return np.asarray(keep, dtype=np.intp).reshape(-1)
    return nms_reference(boxes, scores, threshold, mode)


def nms_reference(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """`nms` in numpy: the definition the OpenCV path is tested against, and the "min" mode."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    plus = 1.0 if mode == "min" else 0.0
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    area = (x2 - x1 + plus) * (y2 - y1 + plus)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + plus)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + plus)
        inter = iw * ih
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        overlap = inter / np.maximum(denom, 1e-12)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.intp)


def _normalise(batch: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW scaled as facenet-pytorch does: (x - 127.5) * 0.0078125."""
    out = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    out -= _PIXEL_MEAN
    out *= _PIXEL_SCALE
    return out


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square about its centre (facenet-pytorch's rerec)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of every (x1, y1, x2, y2) row of `a` with every row of `b`."""
    p, q = a[:, None, :4], b[None, :, :4]
    iw = np.clip(np.minimum(p[..., 2], q[..., 2]) - np.maximum(p[..., 0], q[..., 0]), 0.0, None)
    ih = np.clip(np.minimum(p[..., 3], q[..., 3]) - np.maximum(p[..., 1], q[..., 1]), 0.0, None)
    inter = iw * ih
    union = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1]) + (q[..., 2] - q[..., 0]) * (q[..., 3] - q[..., 1])
    return inter / np.maximum(union - inter, 1e-6)


def _unknown(boxes: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The rows of `boxes` overlapping none of the `known` boxes by EXCLUDE_IOU or more."""
    if known.shape[0] == 0 or boxes.shape[0] == 0:
        return boxes
    return boxes[(_pairwise_iou(boxes, known) < EXCLUDE_IOU).all(axis=1)]


def _as_box(row: np.ndarray) -> tuple[float, float, float, float]:
    """One (x1, y1, x2, y2) row of boxes as the floats a Detection holds."""
    x1, y1, x2, y2 = (float(v) for v in row)
    return x1, y1, x2, y2


def _checked_boxes(boxes: Sequence[tuple[float, float, float, float]], what: str) -> np.ndarray:
    """`boxes` as an (N, 4) float32 array; BoxError unless they are (x1, y1, x2, y2) rows of finite numbers."""
    arr = np.asarray(boxes, dtype=np.float32)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        raise BoxError(f"{what} wants (x1, y1, x2, y2) rows of finite numbers, got an array of shape {arr.shape}")
    return arr


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply R-/O-Net box offsets (facenet-pytorch's bbreg, +1 pixel sizes)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] = boxes[:, 0] + reg[:, 0] * w
    out[:, 1] = boxes[:, 1] + reg[:, 1] * h
    out[:, 2] = boxes[:, 2] + reg[:, 2] * w
    out[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return out


class MtcnnDetector:
    """Finds faces and 5 landmarks in RGB uint8 images with MTCNN's three ONNX networks.

    Example::

        paths = convert_mtcnn(Path("models/mtcnn"))
        det = MtcnnDetector(paths, MtcnnConfig(min_face_size=40))
        for d in det.detect(rgb_frame): ...
    """

    def __init__(
        self,
        models: dict[str, Path] | Path,
        config: MtcnnConfig | None = None,
        session_factory: SessionFactory | None = None,
    ) -> None:
        """models: {"pnet": path, "rnet": path, "onet": path} (convert_mtcnn's result) or their directory.

        session_factory opens one ONNX file and returns an object with onnxruntime's
        ``run(None, {"input": array})``; by default a CPU session with
        config.intra_op_threads threads.
        """
        self.config = config or MtcnnConfig()
        if isinstance(models, (str, Path)):
            models = {net: Path(models) / f"{net}.onnx" for net in ("pnet", "rnet", "onet")}
        missing = [
            f"{net} ({models.get(net)})"
            for net in ("pnet", "rnet", "onet")
            if net not in models or not Path(models[net]).is_file()
        ]
        if missing:
            raise ModelError(
                f"MTCNN model files missing: {', '.join(missing)}; create them with "
                "engines.mtcnn_convert.convert_mtcnn(out_dir)"
            )
        factory = session_factory or cpu_session_factory(self.config.intra_op_threads)
        # The converted models' folder (in the cache: weights digest and converter version) names them.
        self.model_name = Path(models["pnet"]).parent.name
        self._pnet = factory(Path(models["pnet"]))
        self._rnet = factory(Path(models["rnet"]))
        self._onet_session = factory(Path(models["onet"]))

    @property
    def sessions(self) -> dict[str, Any]:
        """The three networks' sessions by name (pnet, rnet, onet), for checks of their raw outputs
        (engines.known_answers)."""
        return {"pnet": self._pnet, "rnet": self._rnet, "onet": self._onet_session}

    def detect(self, image: np.ndarray, exclude: Sequence[tuple[float, float, float, float]] = ()) -> list[Detection]:
        """Return the faces in an RGB uint8 (H, W, 3) image, highest score first.

        `exclude`: boxes of faces already found in the image (MtcnnDetector.confirm); candidates overlapping one
        by `EXCLUDE_IOU` or more are not looked at further, so a known face costs no R-Net or O-Net crops.
        Raises ImageError for anything else (wrong dtype, shape, channel count, empty).
        """
        img = check_image(image, "detector input")
        t1, t2, _ = self.config.thresholds
        known = _checked_boxes(exclude, "detect(exclude=...)")

        proposals = []
        levels, sources = self._pyramid(img)
        for scale, level in levels:
            reg, prob = self._pnet.run(None, {"input": _normalise(level[None])})
            found = self._pnet_boxes(reg[0], prob[0, 1], scale, t1)
            if found.shape[0]:
                proposals.append(found[nms(found[:, :4], found[:, 4], 0.5)])
        if not proposals:
            return []
        boxes = np.concatenate(proposals)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        bw = boxes[:, 2] - boxes[:, 0]
        bh = boxes[:, 3] - boxes[:, 1]
        shifted = boxes[:, :4] + boxes[:, 5:9] * np.stack([bw, bh, bw, bh], axis=1)
        boxes = _unknown(_square(shifted), known)

        # R-Net
        crops, idx = self._crops(img, sources, boxes, 24)
        if idx.size == 0:
            return []
        boxes = boxes[idx]
        reg, prob = self._run_batched(self._rnet, crops)
        keep = prob[:, 1] > t2
        boxes, scores, reg = boxes[keep], prob[keep, 1], reg[keep]
        pick = nms(boxes, scores, 0.7)
        boxes = _unknown(_square(_regress(boxes[pick], reg[pick])), known)

        # O-Net
        boxes, scores, points = self._onet(img, sources, boxes)
        pick = nms(boxes, scores, 0.7, mode="min")
        return [Detection(box=_as_box(boxes[i]), score=float(scores[i]), landmarks=points[i]) for i in pick]

    def confirm(self, image: np.ndarray, boxes: Sequence[tuple[float, float, float, float]]) -> list[Detection | None]:
        """For each box (x1, y1, x2, y2), where a face was a moment ago: the face now, or None.

        Runs MTCNN's last two stages on each box squared, as they run on P-Net's proposals: R-Net (its
        threshold, regression, squaring), then O-Net (its threshold, regression, landmarks). So a face that
        stayed or moved a little is found for one R-Net and one O-Net crop instead of a search of its
        surroundings, and it passes the same two checks a searched face passes (a track kept up by
        confirmations alone is still verified by both networks on every frame). The face is given only if
        its box still overlaps the one asked about (IoU at least `CONFIRM_MIN_IOU`): the regressions pull a
        box towards the face they see, and one that wandered off is not the face that was followed. A face
        not accepted there (gone, turned away, moved too far) gives None: search for it.
        """
        img = check_image(image, "detector input")
        asked = _checked_boxes(boxes, "confirm()")
        out: list[Detection | None] = [None] * asked.shape[0]
        if not out:
            return out
        squared = _square(asked)
        crops, rows = self._crops(img, [img], squared, 24)
        if rows.size == 0:
            return out
        reg, prob = self._run_batched(self._rnet, crops)
        keep = prob[:, 1] > self.config.thresholds[1]
        rows = rows[keep]
        found, scores, points, k = self._onet(img, [img], _square(_regress(squared[rows], reg[keep])), with_index=True)
        still = np.diagonal(_pairwise_iou(found, asked[rows[k]])) >= CONFIRM_MIN_IOU
        for j, i in enumerate(rows[k]):
            if still[j]:
                out[i] = Detection(box=_as_box(found[j]), score=float(scores[j]), landmarks=points[j])
        return out

    def _onet(
        self, img: np.ndarray, sources: list[np.ndarray], boxes: np.ndarray, with_index: bool = False
    ) -> tuple[np.ndarray, ...]:
        """O-Net on square boxes: the accepted ones regressed, their scores and landmarks (and, with
        `with_index`, their rows in `boxes`)."""
        crops, idx = self._crops(img, sources, boxes, 48)
        if idx.size == 0:
            empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
            return (*empty, idx) if with_index else empty
        boxes = boxes[idx]
        reg, marks, prob = self._run_batched(self._onet_session, crops)
        keep = prob[:, 1] > self.config.thresholds[2]
        boxes, scores, reg, marks, idx = boxes[keep], prob[keep, 1], reg[keep], marks[keep], idx[keep]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = np.stack([bw * marks[:, :5] + boxes[:, :1] - 1, bh * marks[:, 5:] + boxes[:, 1:2] - 1], axis=2).astype(
            np.float32
        )
        boxes = _regress(boxes, reg)
        return (boxes, scores, points, idx) if with_index else (boxes, scores, points)

    def _pyramid(self, img: np.ndarray) -> tuple[list[tuple[float, np.ndarray]], list[np.ndarray]]:
        """P-Net's levels and the images crops are sampled from.

        Levels are (scale, uint8 image) pairs, each (int(h*scale+1), int(w*scale+1)) as
        facenet-pytorch sizes them. Only the first level is area-resampled from the full frame;
        the rest come from it, which is as good for these smoothed, much smaller images and
        several times cheaper than resampling a 1080p frame ten times. (Resampling the first level
        from a half frame too was cheaper still but lost 40 px faces on the scene bench.)
        Crop sources: the frame, the frame halved (a cheap exact 2x area average, when the first
        level is smaller than that) and every level, largest first.
        """
        import cv2

        h, w = img.shape[:2]
        scales = pyramid_scales(h, w, self.config.min_face_size, self.config.factor)
        sources = [img]
        if scales and scales[0] < 0.5 and min(h, w) >= 4:
            sources.append(cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
        levels = []
        source = img
        for scale in scales:
            size = (int(w * scale + 1), int(h * scale + 1))
            level = cv2.resize(source, size, interpolation=cv2.INTER_AREA)
            if source is img:
                source = level
            levels.append((scale, level))
            sources.append(level)
        return levels, sources

    @staticmethod
    def _pnet_boxes(reg: np.ndarray, prob: np.ndarray, scale: float, threshold: float) -> np.ndarray:
        """P-Net's map cells above threshold -> rows (x1, y1, x2, y2, score, dx1, dy1, dx2, dy2)."""
        ys, xs = np.nonzero(prob >= threshold)
        if ys.size == 0:
            return np.zeros((0, 9), dtype=np.float32)
        cells = np.stack([xs, ys], axis=1).astype(np.float32)
        q1 = np.floor((_PNET_STRIDE * cells + 1) / scale)
        q2 = np.floor((_PNET_STRIDE * cells + _PNET_CELL) / scale)
        return np.concatenate([q1, q2, prob[ys, xs][:, None], reg[:, ys, xs].T], axis=1).astype(np.float32)

    @staticmethod
    def _crops(
        img: np.ndarray, sources: list[np.ndarray], boxes: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cut each box (clipped to the image, as facenet-pytorch's pad() does) and resize to size x size.

        Each crop is sampled (bilinear, at its exact sub-pixel position) from the smallest source
        image (see `_pyramid`) on which the box still spans `size` pixels: the sources are
        already area-averaged, so shrinking by less than 2x from there needs no more averaging.
        Area-resampling every crop from the full frame, as facenet-pytorch does, cost ~20 ms per
        720p frame; boxes so small that only the frame itself qualifies still are (cheap, and it
        keeps small faces' crops as facenet-pytorch makes them).

        Returns the NCHW batch and the indices of the boxes whose clipped crop is non-empty, in the same order.
        """
        import cv2

        h, w = img.shape[:2]
        ib = np.trunc(boxes[:, :4]).astype(np.int64)
        x = np.maximum(ib[:, 0], 1)
        y = np.maximum(ib[:, 1], 1)
        ex = np.minimum(ib[:, 2], w)
        ey = np.minimum(ib[:, 3], h)
        valid = (ey > y - 1) & (ex > x - 1)
        idx = np.nonzero(valid)[0]
        # Smallest first, with each one's exact per-axis scale; the frame itself comes last.
        scaled = [(src.shape[1] / w, src.shape[0] / h, src) for src in reversed(sources)]
        x0s, y0s = x[idx] - 1, y[idx] - 1
        cws, chs = ex[idx] - x0s, ey[idx] - y0s
        # Per crop, the first (smallest) source on which it spans `size` pixels both ways: one pass over the
        # sources for all crops instead of a search per crop (~240 crops a 720p frame).
        fits = np.array([(cws * sx >= size) & (chs * sy >= size) for sx, sy, _ in scaled]).reshape(len(scaled), -1)
        pick = np.where(fits.any(axis=0), fits.argmax(axis=0), len(scaled) - 1)
        batch = np.empty((idx.size, size, size, 3), dtype=np.uint8)
        for j, k in enumerate(idx):
            x0, y0 = x[k] - 1, y[k] - 1
            cw, ch = ex[k] - x0, ey[k] - y0
            sx, sy, src = scaled[pick[j]]
            if src is img:
                # Small boxes, where detail matters most: area-resampled from the frame, as before.
                batch[j] = cv2.resize(img[y0 : ey[k], x0 : ex[k]], (size, size), interpolation=cv2.INTER_AREA)
                continue
            # Output pixel u's centre is crop pixel (u + 0.5) * cw / size - 0.5; map it into the source.
            m = np.array(
                [
                    [cw / size * sx, 0.0, (x0 + 0.5 * cw / size) * sx - 0.5],
                    [0.0, ch / size * sy, (y0 + 0.5 * ch / size) * sy - 0.5],
                ]
            )
            batch[j] = cv2.warpAffine(
                src, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
            )
        return _normalise(batch), idx

    @staticmethod
    def _run_batched(session: Any, batch: np.ndarray) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = []
        for start in range(0, batch.shape[0], _BATCH):
            outs.append(session.run(None, {"input": batch[start : start + _BATCH]}))
        return [np.concatenate(parts) for parts in zip(*outs)]
