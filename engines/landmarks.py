"""dlib's 5-point face landmark model (shape_predictor_5_face_landmarks.dat) in numpy, without dlib.

The model is an ensemble of regression trees (Kazemi & Sullivan 2014): 15 cascade levels of
500 depth-4 trees. Each level samples 800 grey pixels at positions given relative to the
current shape estimate, walks every tree on differences of pixel pairs, and adds the leaf
vectors to the shape. `ShapePredictor` follows dlib/image_processing/shape_predictor.h step
by step (float32 where dlib uses float, float64 where it uses double, round-half-up pixel
positions, grey = integer mean of R, G, B), so its points equal dlib's.

The five parts, in the model's order (x grows to the right of the image):
  0: outer corner of the eye on the image's right   1: inner corner of that eye
  2: outer corner of the eye on the image's left    3: inner corner of that eye
  4: base of the nose (subnasale)

`dlib_box_from_points` turns a detector's 5 points (MTCNN order) into the kind of box the
model was trained on (dlib's HOG detector boxes); see bench/fit_box_mapping.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.dlib_format import DlibReader
from engines.errors import ImageError, ModelError

log = logging.getLogger(__name__)

# dlib marks inf/nan floats with exponents at and above this (float_details).
_EXP_SPECIAL = 32000


# --------------------------------------------------------------------------------------
# Reading the file


def _decode_ints(data: bytes, source: str) -> np.ndarray:
    """Every dlib-serialised integer in `data`, in order, as int64.

    A shape predictor file holds nothing but dlib integers (counts, indices, and floats as
    mantissa/exponent pairs), so the whole file decodes as one integer stream. Finding where
    each integer starts is sequential; reading the values is then done for all at once.
    """
    n = len(data)
    step = data.translate(bytes(1 + (c & 0x0F) for c in range(256)))
    starts: list[int] = []
    push = starts.append
    pos = 0
    while pos < n:
        push(pos)
        pos += step[pos]
    if pos != n:
        raise ModelError(
            f"{source}: corrupt or truncated dlib model file (last value runs past the end of the file); "
            "reinstall the package that ships it (pip install --force-reinstall face_recognition_models)"
        )
    raw = np.frombuffer(data + bytes(8), dtype=np.uint8)
    at = np.asarray(starts, dtype=np.int64)
    control = raw[at]
    size = (control & 0x0F).astype(np.int64)
    bad = (size > 8) | ((control & 0x70) != 0)
    if bad.any():
        where = int(at[np.argmax(bad)])
        raise ModelError(
            f"{source}: corrupt dlib model file (bad integer control byte 0x{int(raw[where]):02x} at byte {where}); "
            "reinstall the package that ships it (pip install --force-reinstall face_recognition_models)"
        )
    magnitude = np.zeros(at.size, dtype=np.uint64)
    for j in range(8):
        byte = raw[at + 1 + j].astype(np.uint64)
        magnitude |= np.where(size > j, byte, np.uint64(0)) << np.uint64(8 * j)
    if (magnitude > np.uint64(2**63 - 1)).any():
        raise ModelError(f"{source}: corrupt dlib model file (integer out of range)")
    values = magnitude.astype(np.int64)
    return np.where(control & 0x80, -values, values)


class _IntStream:
    """A cursor over the decoded integers that names the file and position in its errors."""

    def __init__(self, ints: np.ndarray, source: str) -> None:
        self.ints = ints
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> ModelError:
        return ModelError(
            f"{self.source}: corrupt or unsupported shape predictor file ({what} at value {self.pos}); "
            "reinstall the package that ships it (pip install --force-reinstall face_recognition_models)"
        )

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > self.ints.size:
            raise self.fail(f"file ends early: wanted {n} more values")
        out = self.ints[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return int(self.take(1)[0])

    def count(self, what: str, limit: int) -> int:
        n = self.int()
        if not 0 <= n <= limit:
            raise self.fail(f"implausible {what} {n}")
        return n

    def floats(self, n: int) -> np.ndarray:
        pairs = self.take(2 * n).reshape(n, 2)
        mantissa, exponent = pairs[:, 0], pairs[:, 1]
        if (np.abs(exponent) >= _EXP_SPECIAL).any():
            raise self.fail("non-finite number")
        with np.errstate(over="raise"):
            try:
                return np.ldexp(mantissa.astype(np.float64), exponent.astype(np.int32)).astype(np.float32)
            except FloatingPointError as exc:
                raise self.fail("number out of range") from exc

    def column(self, what: str) -> np.ndarray:
        """matrix<float,0,1>: rows and columns (newer dlib stores them negated), then the elements."""
        nr, nc = self.int(), self.int()
        nr, nc = abs(nr), abs(nc)
        if nc != 1 or nr > 10_000:
            raise self.fail(f"{what} is a {nr}x{nc} matrix, expected a column")
        return self.floats(nr)


@dataclass(frozen=True)
class _Level:
    """One cascade level, as arrays for vectorised evaluation."""

    idx1: np.ndarray  # (trees, splits) int64: first pixel of each split
    idx2: np.ndarray  # (trees, splits) int64: second pixel
    thresh: np.ndarray  # (trees, splits) float32
    leaves: np.ndarray  # (trees, leaves, 2*parts) float32
    anchor: np.ndarray  # (pixels,) int64: shape part each sample pixel hangs on
    deltas: np.ndarray  # (pixels, 2) float32: offset from that part in the initial shape's frame


# --------------------------------------------------------------------------------------
# Geometry helpers shared with dlib's code paths


def _similarity_m(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x2 part (scale x rotation) of dlib's find_similarity_transform, for a batch.

    src, dst: (F, N, 2) float64. Returns (F, 2, 2) float64.
    """
    from engines.align import umeyama

    return umeyama(src, dst)[0]


def _round_half_up(v: np.ndarray) -> np.ndarray:
    """dlib's conversion of a double point to an integer point: floor(v + 0.5)."""
    return np.floor(v + 0.5)


def _as_boxes(boxes: object) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be (x1, y1, x2, y2) or an (N, 4) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"boxes must be finite, got {arr.tolist()}")
    if ((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])).any():
        raise ValueError(f"boxes must have x2 > x1 and y2 > y1, got {arr.tolist()}")
    return arr


def _grey(image: object) -> np.ndarray:
    """dlib's get_pixel_intensity: a grey image as is, or the truncated mean of R, G and B."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"landmark input must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"landmark input must be uint8, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 3:
        grey = (image.astype(np.uint16).sum(axis=2) // 3).astype(np.uint8)
    elif image.ndim == 2:
        grey = image
    else:
        raise ImageError(f"landmark input must have shape (H, W, 3) RGB or (H, W) grey, got {image.shape}")
    if grey.shape[0] == 0 or grey.shape[1] == 0:
        raise ImageError(f"landmark input is empty (shape {image.shape})")
    return grey


# --------------------------------------------------------------------------------------


class ShapePredictor:
    """dlib's ensemble-of-regression-trees shape predictor.

    Example::

        sp = ShapePredictor.load(face_recognition_models.pose_predictor_five_point_model_location())
        points = sp.predict(rgb, (x1, y1, x2, y2))   # (5, 2) float32, image pixels
    """

    def __init__(self, initial_shape: np.ndarray, levels: Sequence[_Level], source: str = "<memory>") -> None:
        self.initial_shape = np.asarray(initial_shape, dtype=np.float32).reshape(-1, 2)
        self.levels = tuple(levels)
        self.source = source

    @property
    def num_parts(self) -> int:
        return int(self.initial_shape.shape[0])

    @classmethod
    def load(cls, path: str | Path) -> ShapePredictor:
        """Read a dlib shape_predictor file (for example shape_predictor_5_face_landmarks.dat).

        Raises ModelError when the file is missing, truncated or not a shape predictor.
        """
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ModelError(
                f"{p}: cannot read the landmark model ({exc.strerror}); install it with "
                "pip install face_recognition_models"
            ) from exc
        return cls.from_bytes(data, str(p))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ShapePredictor:
        """Parse the serialised form of dlib::shape_predictor (version 1)."""
        if not data:
            raise ModelError(f"{source}: the landmark model file is empty; reinstall face_recognition_models")
        # Check the header with the reference reader before decoding the rest in bulk.
        head = DlibReader(data[:16], source)
        version = head.int()
        if version != 1:
            raise ModelError(
                f"{source}: not a dlib shape predictor version 1 (found version {version}); "
                "use a shape_predictor_*.dat file from dlib or face_recognition_models"
            )
        s = _IntStream(_decode_ints(data, source), source)
        s.take(1)
        initial = s.column("initial shape")
        if initial.size == 0 or initial.size % 2:
            raise s.fail(f"initial shape has {initial.size} values, expected an even, non-zero number")
        dim = initial.size

        forests = []
        for _ in range(s.count("number of cascade levels", 1000)):
            trees = []
            for _ in range(s.count("number of trees", 100_000)):
                n_splits = s.count("number of splits", 1 << 16)
                splits = s.take(4 * n_splits).reshape(n_splits, 4)
                exps = splits[:, 3]
                if (np.abs(exps) >= _EXP_SPECIAL).any():
                    raise s.fail("non-finite split threshold")
                thresh = np.ldexp(splits[:, 2].astype(np.float64), exps.astype(np.int32)).astype(np.float32)
                n_leaves = s.count("number of leaves", 1 << 17)
                if n_leaves != n_splits + 1 or n_leaves & (n_leaves - 1):
                    raise s.fail(f"tree with {n_splits} splits and {n_leaves} leaves is not a full binary tree")
                leaves = np.stack([s.column("leaf value") for _ in range(n_leaves)])
                if leaves.shape[1] != dim:
                    raise s.fail(f"leaf of {leaves.shape[1]} values for a shape of {dim}")
                trees.append((splits[:, 0], splits[:, 1], thresh, leaves))
            forests.append(trees)

        anchors = [s.take(s.count("number of sample pixels", 1 << 20)) for _ in range(s.count("anchor lists", 1000))]
        deltas = [s.floats(s.count("number of sample pixels", 1 << 20)).reshape(-1, 2)
                  for _ in range(s.count("delta lists", 1000))]
        if s.pos != s.ints.size:
            raise s.fail(f"{s.ints.size - s.pos} unexpected values after the model")
        if not (len(forests) == len(anchors) == len(deltas)):
            raise s.fail(f"{len(forests)} cascade levels but {len(anchors)} anchor and {len(deltas)} delta lists")

        levels = []
        for trees, anchor, delta in zip(forests, anchors, deltas):
            if not trees:
                raise s.fail("cascade level without trees")
            if len({t[0].size for t in trees}) != 1:
                raise s.fail("trees of different depths in one cascade level (not supported)")
            if anchor.size != delta.shape[0]:
                raise s.fail(f"{anchor.size} anchors for {delta.shape[0]} sample pixels")
            if anchor.size and (anchor.min() < 0 or anchor.max() >= dim // 2):
                raise s.fail("sample pixel anchored on a part the shape does not have")
            idx1 = np.stack([t[0] for t in trees])
            idx2 = np.stack([t[1] for t in trees])
            if idx1.size and (min(idx1.min(), idx2.min()) < 0 or max(idx1.max(), idx2.max()) >= anchor.size):
                raise s.fail("split refers to a sample pixel that does not exist")
            levels.append(_Level(
                idx1=idx1, idx2=idx2, thresh=np.stack([t[2] for t in trees]),
                leaves=np.stack([t[3] for t in trees]), anchor=anchor.astype(np.int64), deltas=delta,
            ))
        log.debug("%s: %d parts, %d cascade levels", source, dim // 2, len(levels))
        return cls(initial, levels, source)

    # ----------------------------------------------------------------------------------

    def predict(self, image: np.ndarray, box: Sequence[float], *, subpixel: bool = False) -> np.ndarray:
        """The parts of the face in `box`, as a (num_parts, 2) float32 array of (x, y) image pixels.

        image: RGB uint8 (H, W, 3) or grey uint8 (H, W).
        box: (x1, y1, x2, y2); the corners the model's unit square maps to, i.e. the same
            numbers as dlib.rectangle(left=x1, top=y1, right=x2, bottom=y2). Fractions allowed.
        subpixel: False rounds the points to whole pixels as dlib does (identical output);
            True keeps the fractions.
        """
        return self.predict_many(image, [box], subpixel=subpixel)[0]

    def predict_many(self, image: np.ndarray, boxes: object, *, subpixel: bool = False) -> np.ndarray:
        """`predict` for several boxes in one image at once; returns (N, num_parts, 2) float32."""
        grey = _grey(image)
        rects = _as_boxes(boxes)
        h, w = grey.shape
        n = rects.shape[0]
        scale = np.stack([rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1]], axis=1)[:, None, :]  # (N,1,2)
        offset = rects[:, None, :2]
        reference = self.initial_shape.astype(np.float64)
        shape = np.repeat(self.initial_shape[None], n, axis=0)  # (N, P, 2) float32
        rows = np.arange(n)[:, None]
        for level in self.levels:
            # dlib: float matrix from the double similarity transform, float products and sums.
            m = _similarity_m(np.broadcast_to(reference, shape.shape), shape.astype(np.float64)).astype(np.float32)
            d = level.deltas
            local = np.empty((n, d.shape[0], 2), dtype=np.float32)
            local[..., 0] = m[:, None, 0, 0] * d[:, 0] + m[:, None, 0, 1] * d[:, 1]
            local[..., 1] = m[:, None, 1, 0] * d[:, 0] + m[:, None, 1, 1] * d[:, 1]
            local += shape[:, level.anchor, :]
            pix = _round_half_up(local.astype(np.float64) * scale + offset)
            inside = (pix[..., 0] >= 0) & (pix[..., 0] <= w - 1) & (pix[..., 1] >= 0) & (pix[..., 1] <= h - 1)
            px = np.where(inside, pix[..., 0], 0).astype(np.intp)
            py = np.where(inside, pix[..., 1], 0).astype(np.intp)
            values = np.where(inside, grey[py, px], 0).astype(np.float32)  # (N, pixels)

            n_trees, n_splits = level.idx1.shape
            trees = np.arange(n_trees)
            node = np.zeros((n, n_trees), dtype=np.intp)
            while True:
                open_ = node < n_splits
                if not open_.any():
                    break
                at = np.minimum(node, n_splits - 1)
                a = values[rows, level.idx1[trees, at]]
                b = values[rows, level.idx2[trees, at]]
                left = (a - b) > level.thresh[trees, at]
                node = np.where(open_, np.where(left, 2 * node + 1, 2 * node + 2), node)
            picked = level.leaves[trees, node - n_splits]  # (N, trees, 2P)
            # dlib adds the trees' leaves one after another in float; cumsum keeps that order.
            seq = np.concatenate([shape.reshape(n, 1, -1), picked], axis=1)
            shape = np.cumsum(seq, axis=1, dtype=np.float32)[:, -1].reshape(n, -1, 2)
        points = shape.astype(np.float64) * scale + offset
        if not subpixel:
            points = _round_half_up(points)
        return points.astype(np.float32)


def default_model_path() -> Path:
    """Where face_recognition_models keeps shape_predictor_5_face_landmarks.dat."""
    try:
        import face_recognition_models
    except ImportError as exc:
        raise ModelError(
            "the 5-point landmark model ships in face_recognition_models; install it with "
            "pip install face_recognition_models"
        ) from exc
    return Path(face_recognition_models.pose_predictor_five_point_model_location())


# --------------------------------------------------------------------------------------
# Detector points -> the box the landmark model expects

# Fitted by bench/fit_box_mapping.py (see docs/alignment.md): MTCNN's 5 points vs dlib's
# HOG detector box on the same faces. In the face's own frame -- origin at the eye
# midpoint, x along the eye line, y towards the mouth midpoint -- the box centre sits at
# _BOX_CENTRE[0] * eye distance + _BOX_CENTRE[1] * eye-mouth distance across and
# _BOX_CENTRE[2] * eye distance + _BOX_CENTRE[3] * eye-mouth distance down; the box is a
# square of side _BOX_SIDE[0] * eye distance + _BOX_SIDE[1] * eye-mouth distance.
_BOX_CENTRE = (0.0, 0.0, 0.0, 0.0)
_BOX_SIDE = (0.0, 0.0)


def dlib_box_from_points(points5: np.ndarray) -> tuple[float, float, float, float]:
    """The box dlib's HOG detector would give for a face, from its 5 detector landmarks.

    points5: (5, 2) in MTCNN order -- left eye centre, right eye centre, nose tip, left mouth
    corner, right mouth corner ("left" = smaller x). Returns (x1, y1, x2, y2) for
    `ShapePredictor.predict`.
    """
    p = np.asarray(points5, dtype=np.float64)
    if p.shape != (5, 2) or not np.isfinite(p).all():
        raise ValueError(f"points5 must be a finite (5, 2) array of detector landmarks, got shape {p.shape}")
    eyes = (p[0] + p[1]) / 2
    mouth = (p[3] + p[4]) / 2
    across = p[1] - p[0]
    down = mouth - eyes
    eye_dist = float(np.hypot(*across))
    mouth_dist = float(np.hypot(*down))
    if eye_dist <= 0 or mouth_dist <= 0:
        raise ValueError(f"degenerate landmarks (eyes or mouth coincide): {p.tolist()}")
    ux = across / eye_dist
    uy = np.array([-ux[1], ux[0]])
    cx = _BOX_CENTRE[0] * eye_dist + _BOX_CENTRE[1] * mouth_dist
    cy = _BOX_CENTRE[2] * eye_dist + _BOX_CENTRE[3] * mouth_dist
    centre = eyes + cx * ux + cy * uy
    half = (_BOX_SIDE[0] * eye_dist + _BOX_SIDE[1] * mouth_dist) / 2
    return (float(centre[0] - half), float(centre[1] - half), float(centre[0] + half), float(centre[1] + half))
