"""Face alignment: cutting a face out of an image into the geometry an embedder was trained on.

Two ways, one per kind of embedder:

- dlib's ResNet takes 150x150 chips made by dlib's get_face_chip_details and
  extract_image_chip (dlib/image_transforms/interpolation.h) from its own 5-point landmarks.
  `dlib_chip_transform` and `extract_chip` reproduce both, including the image pyramid
  (pyramid_down<2>) dlib samples from when the chip is much smaller than the face, so the
  chips -- and the embeddings -- match dlib's.
- Other embedders (ArcFace and kin) take a chip where 5 detector landmarks land on fixed
  template points: `align_to_template` fits a similarity transform and warps with OpenCV,
  as insightface does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from engines.image import check_image

# dlib's 5-point mean face on the unit square (get_face_chip_details, 5-part case), in the
# 5-point model's part order: outer and inner corner of the image-right eye, outer and inner
# corner of the image-left eye, base of the nose.
DLIB_TEMPLATE5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)

# insightface's reference points for 112x112 ArcFace chips (arcface_dst in
# insightface/utils/face_align.py), in MTCNN order: left eye, right eye, nose tip, left and
# right mouth corner, in output pixels.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity transform src -> dst (Umeyama 1991, eqs. 34-43), as dlib computes it.

    src, dst: (..., N, 2). Returns (m, t): m (..., 2, 2) scale x rotation and t (..., 2),
    with dst ~ src @ m.T + t. Reflections are never returned.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mean_src = src.mean(axis=-2)
    mean_dst = dst.mean(axis=-2)
    a = src - mean_src[..., None, :]
    b = dst - mean_dst[..., None, :]
    sigma_src = (a * a).sum(axis=(-2, -1)) / src.shape[-2]
    cov = np.einsum("...ni,...nj->...ij", b, a) / src.shape[-2]
    u, d, vt = np.linalg.svd(cov)
    det_cov = np.linalg.det(cov)
    flip = (det_cov < 0) | ((det_cov == 0) & (np.linalg.det(u) * np.linalg.det(vt) < 0))
    # dlib flips the axis of the smaller singular value, the first on a tie; numpy sorts
    # them in descending order.
    smaller = d[..., 1] < d[..., 0]
    s = np.stack([np.where(flip & ~smaller, -1.0, 1.0), np.where(flip & smaller, -1.0, 1.0)], axis=-1)
    r = u @ (s[..., :, None] * vt)
    safe = np.where(sigma_src != 0, sigma_src, 1.0)
    c = np.where(sigma_src != 0, (d * s).sum(axis=-1) / safe, 1.0)
    m = c[..., None, None] * r
    t = mean_dst - np.einsum("...ij,...j->...i", m, mean_src)
    return m, t


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the least-squares similarity transform taking points src (N, 2) to dst (N, 2).

    Same result as dlib's find_similarity_transform; usable with cv2.warpAffine.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need two matching (N, 2) point arrays with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("points must be finite")
    m, t = umeyama(src, dst)
    return np.concatenate([m, t[:, None]], axis=1)


# --------------------------------------------------------------------------------------
# dlib's face chips


@dataclass(frozen=True)
class ChipTransform:
    """Where a chip lies in the image: dlib's chip_details.

    rect is (left, top, right, bottom) of the unrotated chip area in image pixels (dlib's
    drectangle, inclusive corners); angle (radians) rotates it about its centre.
    """

    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def image_to_chip(self) -> np.ndarray:
        """The 2x3 affine matrix taking image pixels to chip pixels (dlib's get_mapping_to_chip)."""
        corners = _rotated_corners(self.rect, self.angle)  # tl, tr, bl, br
        src = np.array([corners[0], corners[1], corners[3]])
        dst = np.array([[0, 0], [self.cols - 1, 0], [self.cols - 1, self.rows - 1]], dtype=np.float64)
        return _affine_from_3(src, dst)


def _rotated_corners(rect: tuple[float, float, float, float], angle: float) -> np.ndarray:
    """tl, tr, bl, br of rect rotated by angle about its centre (dlib's rotate_point)."""
    left, top, right, bottom = rect
    cx, cy = (left + right) / 2, (top + bottom) / 2
    ca, sa = math.cos(angle), math.sin(angle)
    out = []
    for x, y in ((left, top), (right, top), (left, bottom), (right, bottom)):
        dx, dy = x - cx, y - cy
        out.append((ca * dx - sa * dy + cx, sa * dx + ca * dy + cy))
    return np.array(out, dtype=np.float64)


def _affine_from_3(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The exact affine map taking 3 points to 3 points, as a 2x3 matrix."""
    a = np.concatenate([src, np.ones((3, 1))], axis=1)
    return np.linalg.solve(a, dst).T


def dlib_chip_transform(landmarks5: np.ndarray, size: int = 150, padding: float = 0.25) -> ChipTransform:
    """dlib's get_face_chip_details for a 5-point shape: the square chip that puts the
    landmarks on dlib's mean face, with `padding` (a fraction of the face) on every side.

    landmarks5: (5, 2) points from the 5-point shape predictor (engines.landmarks), in its
    part order. size=150, padding=0.25 is what dlib's face recognition model expects.
    """
    pts = np.asarray(landmarks5, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks5 must be a finite (5, 2) array from the 5-point model, got shape {pts.shape}")
    return dlib_chip_transforms(pts[None], size, padding)[0]


def dlib_chip_transforms(landmarks5: np.ndarray, size: int = 150, padding: float = 0.25) -> list[ChipTransform]:
    """`dlib_chip_transform` for many faces at once: landmarks5 (N, 5, 2); one fit for all of them,
    each face's transform the same as alone."""
    pts = np.asarray(landmarks5, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(f"landmarks5 must be finite (N, 5, 2) points from the 5-point model, got shape {pts.shape}")
    if int(size) != size or size <= 0:
        raise ValueError(f"chip size must be a positive whole number of pixels, got {size!r}")
    if not padding >= 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    size = int(size)
    chip_points = (padding + DLIB_TEMPLATE5) / (2 * padding + 1) * size
    fits = zip(*umeyama(np.broadcast_to(chip_points, pts.shape), pts), strict=True)
    return [_square_chip(m, t, size) for m, t in fits]


def _square_chip(m: np.ndarray, t: np.ndarray, size: int) -> ChipTransform:
    """The size x size chip whose pixels map to the image by x -> m @ x + t."""
    px, py = m[0, 0], m[1, 0]  # m @ (1, 0): the image direction of the chip's x axis
    angle = math.atan2(py, px)
    scale = math.sqrt(px * px + py * py)
    cx, cy = m @ np.array([size / 2.0, size / 2.0]) + t
    half = (size * scale - 1) / 2
    rect = (float(cx - half), float(cy - half), float(cx + half), float(cy + half))
    return ChipTransform(rect=rect, angle=float(angle), rows=size, cols=size)


def _rect_area(rect: tuple[float, float, float, float]) -> float:
    left, top, right, bottom = rect
    if left > right or top > bottom:
        return 0.0
    return (right - left + 1) * (bottom - top + 1)


def _rect_down(rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """pyramid_down<2>::rect_down: each corner p -> p/2 - (1.25, 0.75)."""
    left, top, right, bottom = rect
    return (left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75)


def _round(v: float) -> int:
    return math.floor(v + 0.5)


def pyramid_down2(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2> on an RGB uint8 image: 5x5 binomial filter, keep every other pixel.

    Output is ((H-3)//2, (W-3)//2, 3); images of 8 pixels or fewer on a side give an empty image.
    """
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0) + image.shape[2:], dtype=np.uint8)
    # Exact in uint16: the kernel's weights sum to 16 per pass, 16 * 16 * 255 = 65280. The
    # vertical pass first, on the kept rows only, halves the work of the horizontal one.
    img = image.astype(np.uint16)
    nr, nc = (h - 3) // 2, (w - 3) // 2
    r0, r1, r2, r3, r4 = (img[k : k + 2 * nr : 2] for k in range(5))
    cols = r0 + 4 * r1 + 6 * r2 + 4 * r3 + r4
    c0, c1, c2, c3, c4 = (cols[:, k : k + 2 * nc : 2] for k in range(5))
    return ((c0 + 4 * c1 + 6 * c2 + 4 * c3 + c4) >> 8).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _chip_grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row numbers of every chip pixel, flat and read-only; chips come in a few sizes."""
    grid_c, grid_r = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    cc, rr = grid_c.ravel(), grid_r.ravel()
    cc.flags.writeable = rr.flags.writeable = False
    return cc, rr


def _bilinear(src: np.ndarray, matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """dlib's transform_image with interpolate_bilinear: chip pixel (c, r) takes the image at
    matrix @ (c, r, 1); samples whose 2x2 neighbourhood leaves the image are black; values
    are truncated to uint8 as dlib's assign_pixel does."""
    channels = src.shape[2] if src.ndim == 3 else 1
    out = np.zeros((rows * cols, channels), dtype=np.uint8)
    h, w = src.shape[:2]
    if h and w:
        cc, rr = _chip_grid(rows, cols)
        x = matrix[0, 0] * cc + matrix[0, 1] * rr + matrix[0, 2]
        y = matrix[1, 0] * cc + matrix[1, 1] * rr + matrix[1, 2]
        left = np.floor(x)
        top = np.floor(y)
        valid = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
        at = None if valid.all() else np.flatnonzero(valid)
        if at is not None:
            x, y, left, top = x[at], y[at], left[at], top[at]
        fx, fy = x - left, y - top
        gx, gy = 1 - fx, 1 - fy
        tl = top.astype(np.intp) * w + left.astype(np.intp)
        bl = tl + w
        # Contiguous float64 channel planes: each gather is then a 1-D take from one plane and the
        # arithmetic (dlib's, in its order, so truncating gives its bytes) runs on 1-D float64 arrays.
        planes = np.moveaxis(src.reshape(h, w, channels), 2, 0).astype(np.float64, order="C").reshape(channels, -1)
        for k in range(channels):
            p = planes[k]
            value = gy * (gx * p.take(tl) + fx * p.take(tl + 1)) + fy * (gx * p.take(bl) + fx * p.take(bl + 1))
            # Storing into the interleaved chip costs less than transposing planes afterwards.
            if at is None:
                out[:, k] = value
            else:
                out[at, k] = value
    return out.reshape((rows, cols) + src.shape[2:])


def extract_chip(image: np.ndarray, chip: ChipTransform, size: int | None = None) -> np.ndarray:
    """dlib's extract_image_chip: the (rows, cols, 3) uint8 chip described by `chip`.

    Samples bilinearly; when the chip is much smaller than its area in the image, samples
    from the level of a pyramid_down<2> image pyramid dlib would use, as dlib does. Parts of
    the chip outside the image are black. `size`, when given, must equal the chip's side.
    """
    check_image(image, "chip source")
    if size is not None and (size != chip.rows or size != chip.cols):
        raise ValueError(
            f"chip is {chip.cols}x{chip.rows} but size {size} was asked for; make the transform "
            "with dlib_chip_transform(points, size=...)"
        )
    if chip.size <= 0 or _rect_area(chip.rect) <= 0:
        raise ValueError(f"empty chip: {chip}")
    h, w = image.shape[:2]
    left, top, right, bottom = chip.rect
    if chip.angle == 0 and chip.rows == bottom - top + 1 and chip.cols == right - left + 1:
        return _copy_rect(image, tuple(_round(v) for v in chip.rect))

    depth, grow = 0, 2.0
    r = _rect_down(chip.rect)
    while _rect_area(r) > chip.size:
        r = _rect_down(r)
        depth += 1
        grow = grow * 2 + 2
    corners = _rotated_corners(chip.rect, chip.angle)
    grown = (
        corners[:, 0].min() - grow,
        corners[:, 1].min() - grow,
        corners[:, 0].max() + grow,
        corners[:, 1].max() + grow,
    )
    clipped = (max(grown[0], 0.0), max(grown[1], 0.0), min(grown[2], w - 1.0), min(grown[3], h - 1.0))
    if clipped[0] > clipped[2] or clipped[1] > clipped[3]:
        return np.zeros((chip.rows, chip.cols, 3), dtype=np.uint8)
    bl_, bt, br_, bb = (_round(v) for v in clipped)
    src = image[bt : bb + 1, bl_ : br_ + 1]

    local = (left - bl_, top - bt, right - bl_, bottom - bt)
    level = -1
    while _rect_area(_rect_down(local)) > chip.size:
        level += 1
        local = _rect_down(local)
    for _ in range(level + 1):
        src = pyramid_down2(src)
    to = _rotated_corners(local, chip.angle)[[0, 1, 2]]  # tl, tr, bl
    frm = np.array([[0, 0], [chip.cols - 1, 0], [0, chip.rows - 1]], dtype=np.float64)
    return _bilinear(src, _affine_from_3(frm, to), chip.rows, chip.cols)


def _copy_rect(image: np.ndarray, rect: tuple[int, ...]) -> np.ndarray:
    """dlib's basic_extract_image_chip: a plain crop, black where it leaves the image."""
    left, top, right, bottom = rect
    h, w = image.shape[:2]
    out = np.zeros((max(bottom - top + 1, 0), max(right - left + 1, 0), 3), dtype=np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, w - 1), min(bottom, h - 1)
    if x0 <= x1 and y0 <= y1:
        out[y0 - top : y1 - top + 1, x0 - left : x1 - left + 1] = image[y0 : y1 + 1, x0 : x1 + 1]
    return out


# --------------------------------------------------------------------------------------
# Template alignment for other embedders


def align_to_template(
    image: np.ndarray,
    landmarks5: np.ndarray,
    template: np.ndarray = ARCFACE_TEMPLATE_112,
    size: tuple[int, int] = (112, 112),
) -> np.ndarray:
    """Warp the face so its 5 landmarks land on `template` (5, 2, output pixels); returns an
    (h, w, 3) uint8 chip for size (w, h). Bilinear, black outside the image, as insightface's
    norm_crop. Landmarks and template in the same order (MTCNN's for ARCFACE_TEMPLATE_112)."""
    import cv2

    check_image(image, "alignment source")
    pts = np.asarray(landmarks5, dtype=np.float64)
    tpl = np.asarray(template, dtype=np.float64)
    if pts.shape != tpl.shape or pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"landmarks {pts.shape} and template {tpl.shape} must both be (N, 2)")
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0:
        raise ValueError(f"chip size must be positive, got {size}")
    matrix = similarity_transform(pts, tpl)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
