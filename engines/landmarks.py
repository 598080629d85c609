"""dlib's 5-point face landmark model (shape_predictor_5_face_landmarks.dat) in numpy, without dlib.

The model is an ensemble of regression trees (Kazemi & Sullivan 2014): 15 cascade levels of
500 depth-4 trees. Each level samples 800 grey pixels at positions given relative to the
current shape estimate, walks every tree on differences of pixel pairs, and adds the leaf
vectors to the shape. `ShapePredictor` follows dlib/image_processing/shape_predictor.h step
by step (float32 where dlib uses float, float64 where it uses double, round-half-up pixel
positions, grey = integer mean of R, G, B, leaves summed in tree order), so its points equal
dlib's; only the similarity transform between shapes is the 2-D closed form instead of
dlib's SVD, which agrees far below the float32 the result is cast to.

The five parts, in the model's order (x grows to the right of the image):
  0: outer corner of the eye on the image's right   1: inner corner of that eye
  2: outer corner of the eye on the image's left    3: inner corner of that eye
  4: base of the nose (subnasale)

`dlib_box_from_points` turns a detector's 5 points (MTCNN order) into the kind of box the
model was trained on (dlib's HOG detector boxes); see bench/fit_box_mapping.py.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engines.dlib_format import DlibReader
from engines.errors import ImageError, ModelError

log = logging.getLogger(__name__)

# Shapes of at least this many values (faces x 2 x parts) add leaves in a loop, smaller ones with cumsum.
_LOOP_SUM_FROM = 64

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

    def count(self, what: str, limit: builtins.int) -> builtins.int:
        n = self.int()
        if not 0 <= n <= limit:
            raise self.fail(f"implausible {what} {n}")
        return n

    def floats(self, n: builtins.int) -> np.ndarray:
        pairs = self.take(2 * n).reshape(n, 2)
        return _ldexp(pairs[:, 0], pairs[:, 1], self)

    def column(self, what: str) -> np.ndarray:
        """matrix<float,0,1>: rows and columns (newer dlib stores them negated), then the elements."""
        nr, nc = self.int(), self.int()
        nr, nc = abs(nr), abs(nc)
        if nc != 1 or nr > 10_000:
            raise self.fail(f"{what} is a {nr}x{nc} matrix, expected a column")
        return self.floats(nr)


class _Level:
    """One cascade level, flattened so that all its trees are walked at once.

    Split nodes are numbered tree * splits + node and leaves tree * leaves + leaf, dlib's
    in-tree order (children of node i are 2i+1 and 2i+2, leaves follow the splits).
    """

    def __init__(
        self,
        idx1: np.ndarray,
        idx2: np.ndarray,
        thresh: np.ndarray,
        leaves: np.ndarray,
        anchor: np.ndarray,
        deltas: np.ndarray,
    ) -> None:
        self.n_trees, self.n_splits = idx1.shape
        self.depth = (self.n_splits + 1).bit_length() - 1
        self.idx1 = idx1.astype(np.intp).ravel()
        self.idx2 = idx2.astype(np.intp).ravel()
        self.thresh = thresh.astype(np.float32).ravel()
        self.leaves = leaves.reshape(self.n_trees * (self.n_splits + 1), -1).astype(np.float32)
        self.anchor = anchor.astype(np.intp)
        self.deltas = deltas.astype(np.float32)
        self.dx = np.ascontiguousarray(self.deltas[:, 0])
        self.dy = np.ascontiguousarray(self.deltas[:, 1])
        # Where each tree's first split and first leaf sit in the flat arrays; a leaf is
        # reached as node index >= splits, so the leaf offset folds in the -splits.
        self.split_base = np.arange(self.n_trees) * self.n_splits
        self.leaf_base = np.arange(self.n_trees) * (self.n_splits + 1) - self.n_splits

    def walk(self, values: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """The next shape estimate (N, 2*parts) float32: `shape` plus the leaf every tree reaches
        on the sample pixel `values` (N, samples), added tree after tree as dlib does."""
        n = values.shape[0]
        flat = values.ravel()
        row = np.arange(n)[:, None] * values.shape[1]
        node = np.zeros((n, self.n_trees), dtype=np.intp)
        # Only the splits on each face's path are evaluated: `depth` of each tree's n_splits.
        for _ in range(self.depth):
            split = self.split_base + node
            diff = np.take(flat, row + np.take(self.idx1, split)) - np.take(flat, row + np.take(self.idx2, split))
            node = 2 * node + 2 - (diff > np.take(self.thresh, split))
        leaves = np.take(self.leaves, (self.leaf_base + node).T, axis=0)  # (trees, N, 2*parts)
        # dlib adds the leaves to the shape one tree after another in float; both ways below keep
        # that order. numpy's cumsum costs ~10 ns a value, an in-place add per tree ~0.5 us a
        # call: the loop wins from a few faces on.
        if shape.size < _LOOP_SUM_FROM:
            seq = np.concatenate([shape[None], leaves])
            return np.cumsum(seq, axis=0, out=seq)[-1]
        total = shape.copy()
        for leaf in leaves:
            total += leaf
        return total


def _read_level(s: _IntStream, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One cascade level: vector<regression_tree>, each tree a vector of splits (idx1, idx2,
    thresh) and a vector of leaf columns. All trees of a level must have the same depth (true
    of dlib's trainer); the level is then one block of integers with a fixed record layout."""
    n_trees = s.count("number of trees", 100_000)
    if n_trees == 0:
        raise s.fail("cascade level without trees")
    n_splits = int(s.ints[s.pos]) if s.pos < s.ints.size else -1
    if not 0 <= n_splits < 1 << 16:
        raise s.fail(f"implausible number of splits {n_splits}")
    n_leaves = n_splits + 1
    if n_leaves & (n_leaves - 1):
        raise s.fail(f"tree with {n_splits} splits is not a full binary tree")
    leaf_len = 2 + 2 * dim
    rec = 1 + 4 * n_splits + 1 + n_leaves * leaf_len
    block = s.take(n_trees * rec).reshape(n_trees, rec)
    splits = block[:, 1 : 1 + 4 * n_splits].reshape(n_trees, n_splits, 4)
    leaves = block[:, 2 + 4 * n_splits :].reshape(n_trees, n_leaves, leaf_len)
    if (block[:, 0] != n_splits).any() or (block[:, 1 + 4 * n_splits] != n_leaves).any():
        raise s.fail("trees of different depths in one cascade level (not supported) or a corrupt tree")
    if (np.abs(leaves[:, :, 0]) != dim).any() or (np.abs(leaves[:, :, 1]) != 1).any():
        raise s.fail(f"leaf values are not columns of {dim} numbers")
    thresh = _ldexp(splits[..., 2], splits[..., 3], s)
    values = leaves[:, :, 2:].reshape(n_trees, n_leaves, dim, 2)
    return splits[..., 0], splits[..., 1], thresh, _ldexp(values[..., 0], values[..., 1], s)


def _ldexp(mantissa: np.ndarray, exponent: np.ndarray, s: _IntStream) -> np.ndarray:
    """dlib floats (mantissa * 2**exponent) as float32; every value the model holds is a float."""
    if (np.abs(exponent) >= _EXP_SPECIAL).any():
        raise s.fail("non-finite number")
    with np.errstate(over="raise"):
        try:
            return np.ldexp(mantissa.astype(np.float64), exponent.astype(np.int32)).astype(np.float32)
        except FloatingPointError as exc:
            raise s.fail("number out of range") from exc


# --------------------------------------------------------------------------------------
# Geometry and input checks


def _similarity_basis(initial: np.ndarray) -> np.ndarray:
    """(2*parts, 2) matrix B with shape.ravel() @ B / |centred initial|^2 = (p, q), where
    [[p, -q], [q, p]] is the least-squares similarity transform initial -> shape.

    This is the 2-D closed form of Umeyama's solution that dlib's find_tform_between_shapes
    computes by SVD; the two agree to double rounding, far below the float32 dlib casts the
    result to. The centred initial shape sums to zero, so the shape needs no centring.
    """
    a = initial.astype(np.float64) - initial.astype(np.float64).mean(axis=0)
    basis = np.empty((a.shape[0], 2, 2))
    basis[:, 0, 0], basis[:, 1, 0] = a[:, 0], a[:, 1]  # p = sum(ax*bx + ay*by)
    basis[:, 0, 1], basis[:, 1, 1] = -a[:, 1], a[:, 0]  # q = sum(ax*by - ay*bx)
    return basis.reshape(-1, 2) / (a**2).sum()


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


def _flat_pixels(image: object) -> tuple[np.ndarray, int]:
    """The image's bytes, flat, and its channel count, after checking it is RGB or grey uint8."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"landmark input must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"landmark input must be uint8, got dtype {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ImageError(f"landmark input must have shape (H, W, 3) RGB or (H, W) grey, got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"landmark input is empty (shape {image.shape})")
    return image.reshape(-1), (1 if image.ndim == 2 else 3)


class _Pixels:
    """The images of a batch and which faces (rows) belong to each, for sampling intensities."""

    def __init__(self, images: Sequence[np.ndarray], counts: Sequence[int]) -> None:
        self.images = [_flat_pixels(image) for image in images]
        ends = np.cumsum(counts).tolist()
        self.rows = [slice(end - count, end) for count, end in zip(counts, ends, strict=True)]
        # Each face's image size, for the is-the-sample-inside test.
        self.h = np.repeat([float(image.shape[0]) for image in images], counts)[:, None]
        self.w = np.repeat([float(image.shape[1]) for image in images], counts)[:, None]

    def intensity(self, at: np.ndarray) -> np.ndarray:
        """dlib's get_pixel_intensity at pixel indices `at` (N, S), each row in its face's image:
        grey as is, RGB as the truncated integer mean of R, G and B. Returns (N, S) int32."""
        rgb = np.empty(at.shape + (3,), dtype=np.uint8)
        for (flat, channels), rows in zip(self.images, self.rows, strict=True):
            if channels == 1:
                rgb[rows] = np.take(flat, at[rows])[..., None]  # three equal values average to the grey
            else:
                rgb[rows] = np.take(flat.reshape(-1, 3), at[rows], axis=0)
        return (rgb[..., 0].astype(np.int32) + rgb[..., 1] + rgb[..., 2]) // 3


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
        self._basis = _similarity_basis(self.initial_shape)

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
            forests.append(_read_level(s, dim))

        anchors = [s.take(s.count("number of sample pixels", 1 << 20)) for _ in range(s.count("anchor lists", 1000))]
        deltas = [
            s.floats(2 * s.count("number of sample pixels", 1 << 20)).reshape(-1, 2)
            for _ in range(s.count("delta lists", 1000))
        ]
        if s.pos != s.ints.size:
            raise s.fail(f"{s.ints.size - s.pos} unexpected values after the model")
        if not (len(forests) == len(anchors) == len(deltas)):
            raise s.fail(f"{len(forests)} cascade levels but {len(anchors)} anchor and {len(deltas)} delta lists")

        levels = []
        for (idx1, idx2, thresh, leaves), anchor, delta in zip(forests, anchors, deltas, strict=True):
            if anchor.size != delta.shape[0]:
                raise s.fail(f"{anchor.size} anchors for {delta.shape[0]} sample pixels")
            if anchor.size and (anchor.min() < 0 or anchor.max() >= dim // 2):
                raise s.fail("sample pixel anchored on a part the shape does not have")
            if idx1.size and (min(idx1.min(), idx2.min()) < 0 or max(idx1.max(), idx2.max()) >= anchor.size):
                raise s.fail("split refers to a sample pixel that does not exist")
            levels.append(_Level(idx1, idx2, thresh, leaves, anchor, delta))
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
        return self.predict_batch([(image, boxes)], subpixel=subpixel)

    def predict_batch(self, items: Sequence[tuple[np.ndarray, object]], *, subpixel: bool = False) -> np.ndarray:
        """`predict_many` for the boxes of several images in one pass: (total boxes, num_parts, 2)
        float32, the boxes of items[0] first. Each face's points equal `predict`'s for it.

        items: (image, boxes) pairs, boxes as for `predict_many`. Only the pixel sampling goes
        image by image; the regression trees are walked for every face at once.
        """
        per_image = [_as_boxes(boxes) for _, boxes in items]
        if not per_image:
            return np.zeros((0, self.num_parts, 2), dtype=np.float32)
        pixels = _Pixels([image for image, _ in items], [len(r) for r in per_image])
        rects = np.concatenate(per_image)
        # dlib's unnormalizing_tform: the unit square onto the box.
        box = (
            (rects[:, 2] - rects[:, 0])[:, None],
            (rects[:, 3] - rects[:, 1])[:, None],
            rects[:, 0, None],
            rects[:, 1, None],
        )
        shape = np.repeat(self.initial_shape.reshape(1, -1), rects.shape[0], axis=0)  # (N, 2*parts) float32
        for level in self.levels:
            shape = level.walk(self._sample(level, shape, pixels, box), shape)
        sx, sy, ox, oy = box
        shape = shape.reshape(rects.shape[0], -1, 2).astype(np.float64)
        points = np.stack([shape[..., 0] * sx + ox, shape[..., 1] * sy + oy], axis=-1)
        if not subpixel:
            points = np.floor(points + 0.5)
        return points.astype(np.float32)

    def _sample(self, level: _Level, shape: np.ndarray, pixels: _Pixels, box: tuple[np.ndarray, ...]) -> np.ndarray:
        """The intensities (N, samples) float32 of a level's sample pixels around each face's
        current shape (N, 2*parts); 0 where a sample falls outside its image."""
        sx, sy, ox, oy = box
        # Summed one coordinate after another (cumsum), so a face's result cannot depend on the
        # batch it is in, as a BLAS product's summation order might.
        pq = np.cumsum(shape.astype(np.float64)[:, :, None] * self._basis, axis=1)[:, -1].astype(np.float32)
        p, q = pq[:, 0, None], pq[:, 1, None]
        # float32 products and sums, as dlib computes tform*delta + anchor point.
        x = (p * level.dx + -q * level.dy) + np.take(shape[:, 0::2], level.anchor, axis=1)
        y = (q * level.dx + p * level.dy) + np.take(shape[:, 1::2], level.anchor, axis=1)
        px = np.floor(x.astype(np.float64) * sx + ox + 0.5)
        py = np.floor(y.astype(np.float64) * sy + oy + 0.5)
        inside = (px >= 0) & (px <= pixels.w - 1) & (py >= 0) & (py <= pixels.h - 1)
        at = np.where(inside, py * pixels.w + px, 0).astype(np.intp)
        return np.where(inside, pixels.intensity(at), 0).astype(np.float32)


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

# Fitted once with `python bench/fit_box_mapping.py` (see docs/alignment.md): MTCNN's 5 points
# against dlib's HOG detector box on the same faces of lag-dev (2,289 faces both detectors
# found; fitted on the 1,188 of even-hashed identities, checked on the rest). In the face's
# own frame -- origin at the eye midpoint, x along the eye line, y square to it towards the
# mouth -- the box centre sits at _BOX_CENTRE[0] * E + _BOX_CENTRE[1] * M across and
# _BOX_CENTRE[2] * E + _BOX_CENTRE[3] * M down, E being the eye distance and M the
# eye-to-mouth distance; the box is an upright square of side _BOX_SIDE[0] * E + _BOX_SIDE[1] * M.
_BOX_CENTRE = (-0.2642, 0.1613, 0.3309, 0.1374)
_BOX_SIDE = (1.8532, 0.4524)


def dlib_box_from_points(
    points5: np.ndarray,
    *,
    centre: tuple[float, float, float, float] = _BOX_CENTRE,
    side: tuple[float, float] = _BOX_SIDE,
) -> tuple[float, float, float, float]:
    """The box dlib's HOG detector would give for a face, from its 5 detector landmarks.

    points5: (5, 2) in MTCNN order -- left eye centre, right eye centre, nose tip, left mouth
    corner, right mouth corner ("left" = smaller x). Returns (x1, y1, x2, y2) for
    `ShapePredictor.predict`. centre and side are the mapping's coefficients (see above);
    the defaults are the fitted ones.
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
    cx = centre[0] * eye_dist + centre[1] * mouth_dist
    cy = centre[2] * eye_dist + centre[3] * mouth_dist
    mid = eyes + cx * ux + cy * uy
    half = (side[0] * eye_dist + side[1] * mouth_dist) / 2
    return (float(mid[0] - half), float(mid[1] - half), float(mid[0] + half), float(mid[1] + half))
