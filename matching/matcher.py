"""The watchlist index faces are matched against, and the matcher that swaps it while cameras run.

Why it is built this way (measured with ``python bench/matching.py``): a million 128-d templates
as float32 take 512 MB and an exact scan reads all of it for every batch. Here each template is
held as 16-bit fixed point, per dimension, around the templates' mean (real embedders put most of
every face on one shared direction: the project's default engine scores two strangers at about
0.97), split into two byte planes, 256 MB together:

* the high plane (``hi``, uint8 holding ``h + 128``) is scanned for every batch with an 8-bit
  integer matrix product (ONNX Runtime's ``MatMulInteger``), reading 128 MB instead of 512 MB.
  Both operands are *unsigned* bytes around a zero point of 128 (U8U8): every MLAS kernel sums
  u8 x u8 products exactly in 32 bits (16-bit words and ``vpmaddwd`` on AVX2 and AVX-512 without
  VNNI, VNNI or AMX where present, ``udot``/``ummla`` on ARM64). The u8 x s8 form it replaced is
  summed in pairs with int16 saturation (``vpmaddubsw``) on AVX2 and AVX-512 without VNNI, which
  broke the bound below and lost listed persons on those CPUs (issue 18; ``tests/test_matcher.py``
  runs under ``qemu-x86_64 -cpu Haswell`` in CI to keep it so);
* rows are grouped (row ``r`` is in group ``r mod G``, and in a finer group ``r mod 16G``) so each
  query's best groups are found from cheap element-wise maxima instead of a sort of a million
  scores;
* from the coarse scores a shortlist is cut with a *proven* error bound (see ``_coarse_bound``), so
  every template that can be among the exact top-k persons is on it; the shortlist is then scored
  exactly in float32 from both planes.

The result equals an exact float32 search over the stored templates (16-bit fixed point, within
half a step -- 1/65024 of a dimension's spread -- of the values a bundle carries); only ties closer
than that may order differently.

Live updates: an index is immutable. A new one is built aside (``TemplateIndex.build`` or
``with_changes``) and ``Matcher.swap`` replaces one reference; a search already running keeps the
index it started with, so readers never wait and never see half an update.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from matching.match import Match

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

log = logging.getLogger(__name__)

_FIXED_MAX = 127 * 256  # |v| <= this keeps the high byte within int8 [-127, 127]
_GROUP_ROWS = 256  # rows per group; groups are strided so the group maximum is a contiguous reduction
_FINE_ROWS = 16  # rows per fine group (each group is 16 fine groups), for cutting the shortlist
_MAX_BATCH = 16  # queries per coarse pass: the (rows x batch) int32 score matrix is 4 MB per query at 1M rows
_BUILD_CHUNK = 65536  # rows quantized at a time, to bound the memory a build needs beside the result
_MIN_RANGE = 2.0**-10
_RANGE_STEP = 2.0**-8
_NORM_TOLERANCE = 1e-2


class MatcherError(ValueError):
    """The matcher was given something it cannot use (wrong shape, dimension, or a non-unit vector)."""


@dataclass(frozen=True)
class _Planes:
    hi: NDArray[np.uint8]  # (rows_padded, D), high byte + 128
    lo: NDArray[np.int8]  # (rows_padded, D), low byte
    center: NDArray[np.float32]  # (D,)
    scale: NDArray[np.float32]  # (D,); value = center + scale * (256 * (hi - 128) + lo)
    hmax: float  # largest L2 norm of a row's high byte vector (hi - 128)


def _padded_rows(n: int) -> int:
    return max(1, math.ceil(n / _GROUP_ROWS)) * _GROUP_ROWS


def _chunks(emb: np.ndarray, offset: NDArray[np.float32] | None) -> Iterator[tuple[int, NDArray[np.float32]]]:
    """Rows of `emb` (+ `offset`) as float32, a chunk at a time (bounded extra memory)."""
    for start in range(0, emb.shape[0], _BUILD_CHUNK):
        chunk = np.asarray(emb[start : start + _BUILD_CHUNK], dtype=np.float32)
        yield start, chunk if offset is None else chunk + offset


def _mean(emb: np.ndarray, offset: NDArray[np.float32] | None) -> NDArray[np.float32]:
    total = np.zeros(emb.shape[1], np.float64)
    for _, chunk in _chunks(emb, offset):
        total += chunk.sum(axis=0, dtype=np.float64)
    # numpy's stubs give reductions and mixed scalar-array arithmetic as Any: such locals here are
    # annotated so the function's declared dtype is checked where it is made.
    mean: NDArray[np.float32] = (total / max(1, emb.shape[0])).astype(np.float32)
    return mean


def _spread(emb: np.ndarray, offset: NDArray[np.float32] | None, center: NDArray[np.float32]) -> NDArray[np.float32]:
    """Per dimension, the largest distance of a value from `center`."""
    out = np.zeros(emb.shape[1], np.float32)
    for _, chunk in _chunks(emb, offset):
        if len(chunk):
            np.maximum(out, np.abs(chunk - center).max(axis=0), out=out)
    if not np.all(np.isfinite(out)):
        raise MatcherError("embeddings contain NaN or infinite values")
    return out


def _ranges(spread: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each dimension's fixed-point range: its spread rounded up to a step, so most deltas fit it
    (one that does not makes `with_changes` requantize)."""
    ranges: NDArray[np.float32] = np.maximum(_MIN_RANGE, np.ceil(spread / _RANGE_STEP) * _RANGE_STEP).astype(np.float32)
    return ranges


def _quantize_into(
    emb: np.ndarray, offset: np.ndarray | None, center: np.ndarray, scale: np.ndarray, hi: np.ndarray, lo: np.ndarray
) -> float:
    """Write `emb` (+ `offset`) (n, D) as fixed point into hi/lo (n, D); return the largest high-byte row norm."""
    hmax = 0.0
    for start, chunk in _chunks(emb, offset):
        v = np.rint((chunk - center) / scale).astype(np.int32)
        np.clip(v, -_FIXED_MAX, _FIXED_MAX, out=v)
        h = (v + 128) >> 8  # arithmetic shift: floor division, so lo lands in [-128, 127]
        lo[start : start + len(chunk)] = (v - (h << 8)).astype(np.int8)
        hi[start : start + len(chunk)] = (h + 128).astype(np.uint8)
        if len(chunk):
            hmax = max(hmax, float(np.sqrt((h.astype(np.float32) ** 2).sum(axis=1)).max()))
    return hmax


def _row_hmax(hi: np.ndarray) -> float:
    hmax = 0.0
    for start in range(0, hi.shape[0], _BUILD_CHUNK):
        h = hi[start : start + _BUILD_CHUNK].astype(np.float32) - 128.0
        if len(h):
            hmax = max(hmax, float(np.sqrt((h * h).sum(axis=1)).max()))
    return hmax


class TemplateIndex:
    """An immutable set of templates (several per person) ready to be searched.

    Build it with `TemplateIndex.build` (from a store or a full bundle) or derive the next one
    with `with_changes` (a delta); never modify one in place, so a `Matcher` can swap it live.
    """

    def __init__(
        self,
        planes: _Planes,
        n: int,
        codes: np.ndarray,
        persons: np.ndarray,
        person_thresholds: np.ndarray,
        *,
        version: int,
        model_id: str,
        default_threshold: float,
    ) -> None:
        self._planes = planes
        self._n = int(n)
        self._codes = codes
        self._persons = (
            persons  # sorted, fixed-width UTF-8 bytes: a dict of a million str would cost more than the index
        )
        self._person_thresholds = person_thresholds
        self.version = int(version)
        self.model_id = str(model_id)
        self.default_threshold = float(default_threshold)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def empty(cls, dim: int, *, version: int = 0, model_id: str = "", default_threshold: float = 1.0) -> TemplateIndex:
        """An index with no templates: every search finds nobody."""
        return cls.build(
            [], np.zeros((0, dim), np.float32), version=version, model_id=model_id, default_threshold=default_threshold
        )

    @classmethod
    def build(
        cls,
        person_ids: Sequence[str],
        embeddings: np.ndarray,
        *,
        offset: np.ndarray | None = None,
        thresholds: Mapping[str, float] | None = None,
        version: int = 0,
        model_id: str = "",
        default_threshold: float = 0.5,
    ) -> TemplateIndex:
        """Index `embeddings` (n, D), one row per template; `person_ids[i]` owns row i.

        `offset` (D,), when given, is added to every row (bundles carry float16 rows around an
        offset) and becomes the index's center; otherwise the rows' mean is. `thresholds` holds
        per-person overrides of the global threshold. Rows of one person need not be adjacent.
        Raises MatcherError on mismatched lengths or non-finite values.
        """
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[1] == 0:
            raise MatcherError(f"embeddings must be a 2-d array (templates, dim), got shape {emb.shape}")
        if len(person_ids) != emb.shape[0]:
            raise MatcherError(f"{len(person_ids)} person ids for {emb.shape[0]} embeddings: give one id per row")
        n, dim = emb.shape
        off = _check_offset(offset, dim)
        persons, codes = np.unique(_encode_ids(person_ids), return_inverse=True)
        center = off if off is not None else _mean(emb, None)
        scale = _ranges(_spread(emb, off, center)) / np.float32(_FIXED_MAX)
        rows = _padded_rows(n)
        hi = np.full((rows, dim), 128, dtype=np.uint8)
        lo = np.zeros((rows, dim), dtype=np.int8)
        hmax = _quantize_into(emb, off, center, scale, hi, lo)
        pt = _thresholds_array(persons, thresholds or {})
        return cls(
            _Planes(hi, lo, center, scale, hmax),
            n,
            codes.astype(np.int32).reshape(-1),
            persons,
            pt,
            version=version,
            model_id=model_id,
            default_threshold=default_threshold,
        )

    def with_changes(
        self,
        *,
        remove: Iterable[str] = (),
        add_person_ids: Sequence[str] = (),
        add_embeddings: np.ndarray | None = None,
        add_offset: np.ndarray | None = None,
        thresholds: Mapping[str, float | None] | None = None,
        version: int,
        model_id: str | None = None,
        default_threshold: float | None = None,
    ) -> TemplateIndex:
        """A new index: this one minus every template of the persons in `remove` and of the persons
        being added (their templates are replaced), plus `add_embeddings` (+ `add_offset`) owned by
        `add_person_ids`.

        `thresholds` sets or (with None) clears per-person overrides for the persons added.
        This index is left as it is (readers may still be using it).
        """
        dim = self.dim
        add = np.zeros((0, dim), np.float32) if add_embeddings is None else np.asarray(add_embeddings)
        if add.ndim != 2 or add.shape[1] != dim:
            raise MatcherError(f"added embeddings must have shape (n, {dim}), got {add.shape}")
        if len(add_person_ids) != add.shape[0]:
            raise MatcherError(f"{len(add_person_ids)} person ids for {add.shape[0]} added embeddings")
        add_ids = _encode_ids(add_person_ids)
        gone_codes = self._codes_of(np.concatenate([_encode_ids(list(remove)), add_ids]))
        gone_codes = np.unique(gone_codes[gone_codes >= 0])
        keep = ~np.isin(self._codes, gone_codes) if gone_codes.size else np.ones(self._n, dtype=bool)
        kept = int(keep.sum())

        alive = np.ones(len(self._persons), dtype=bool)
        alive[gone_codes] = False
        persons = np.union1d(self._persons[alive], add_ids)
        remap = np.searchsorted(persons, self._persons).astype(np.int32)  # valid for alive persons only
        codes = np.empty(kept + add.shape[0], dtype=np.int32)
        codes[:kept] = remap[self._codes[keep]]
        codes[kept:] = np.searchsorted(persons, add_ids)

        pt = np.full(len(persons), np.nan, dtype=np.float64)
        pt[remap[alive]] = self._person_thresholds[alive]
        added = set(add_person_ids)
        for p, t in (thresholds or {}).items():
            if p in added:
                pt[int(np.searchsorted(persons, _encode_ids([p])[0]))] = np.nan if t is None else float(t)

        old = self._planes
        off = _check_offset(add_offset, dim)
        n = kept + add.shape[0]
        rows = _padded_rows(n)
        hi = np.empty((rows, dim), dtype=np.uint8)
        lo = np.empty((rows, dim), dtype=np.int8)
        hi[n:], lo[n:] = 128, 0
        need = _spread(add, off, old.center)
        old_range = old.scale * np.float32(_FIXED_MAX)
        if np.all(need <= old_range):
            np.compress(keep, old.hi[: self._n], axis=0, out=hi[:kept])
            np.compress(keep, old.lo[: self._n], axis=0, out=lo[:kept])
            scale = old.scale
            hmax_add = _quantize_into(add, off, old.center, scale, hi[kept:n], lo[kept:n])
            # The bound needs the largest row norm; a removal can only lower it, so keeping the
            # old figure stays safe without rescanning every row.
            hmax = max(old.hmax, hmax_add)
        else:
            # A new template is outside a dimension's range: widen those dimensions and
            # requantize (the other dimensions keep their exact values).
            scale = np.maximum(old_range, _ranges(need)) / np.float32(_FIXED_MAX)
            kept_rows = np.flatnonzero(keep)
            for start in range(0, kept, _BUILD_CHUNK):
                part = self.dequantize(kept_rows[start : start + _BUILD_CHUNK])
                _quantize_into(
                    part, None, old.center, scale, hi[start : start + len(part)], lo[start : start + len(part)]
                )
            _quantize_into(add, off, old.center, scale, hi[kept:n], lo[kept:n])
            hmax = _row_hmax(hi[:n])
        return TemplateIndex(
            _Planes(hi, lo, old.center, scale, hmax),
            n,
            codes,
            persons,
            pt,
            version=version,
            model_id=self.model_id if model_id is None else model_id,
            default_threshold=self.default_threshold if default_threshold is None else default_threshold,
        )

    # ---- facts --------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._planes.hi.shape[1])

    @property
    def n_templates(self) -> int:
        return self._n

    @property
    def n_persons(self) -> int:
        return len(self._persons)

    @property
    def nbytes(self) -> int:
        """Memory held by the index's arrays."""
        p = self._planes
        return int(
            p.hi.nbytes + p.lo.nbytes + self._codes.nbytes + self._person_thresholds.nbytes + self._persons.nbytes
        )

    def persons(self) -> list[str]:
        """The person ids in the index, sorted by their UTF-8 bytes."""
        return [b.decode() for b in self._persons.tolist()]

    def person_id(self, code: int) -> str:
        """The person id behind an internal person code."""
        return bytes(self._persons[code]).decode()

    def _codes_of(self, ids: np.ndarray) -> np.ndarray:
        """Codes of the given encoded ids, -1 for ids not in the index."""
        if len(self._persons) == 0 or len(ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.searchsorted(self._persons, ids)
        pos_c = np.minimum(pos, len(self._persons) - 1)
        return np.where(self._persons[pos_c] == ids, pos_c, -1)

    def _code(self, person_id: str) -> int | None:
        code = int(self._codes_of(_encode_ids([person_id]))[0])
        return None if code < 0 else code

    def __contains__(self, person_id: object) -> bool:
        return isinstance(person_id, str) and self._code(person_id) is not None

    def threshold_for(self, person_id: str, global_threshold: float | None = None) -> float:
        """The threshold that applies to `person_id`: their override, else `global_threshold`,
        else the watchlist's default."""
        code = self._code(person_id)
        if code is not None and not np.isnan(self._person_thresholds[code]):
            return float(self._person_thresholds[code])
        return self.default_threshold if global_threshold is None else float(global_threshold)

    def dequantize(self, rows: np.ndarray) -> NDArray[np.float32]:
        """The stored templates at `rows` as float32 (n, D): exactly the values searches score."""
        p = self._planes
        v = (p.hi[rows].astype(np.int32) - 128) * 256 + p.lo[rows]
        values: NDArray[np.float32] = p.center + v.astype(np.float32) * p.scale
        return values

    def templates_of(self, person_id: str) -> np.ndarray:
        """The stored templates of one person (k, D) float32; empty when they are not in the index."""
        code = self._code(person_id)
        if code is None:
            return np.zeros((0, self.dim), np.float32)
        return self.dequantize(np.flatnonzero(self._codes == code))

    # ---- search -------------------------------------------------------------------------------

    def search_persons(self, queries: np.ndarray, k: int, scorer: _Scorer) -> list[list[tuple[int, float]]]:
        """Top-k persons (code, exact score of their best template) for each query row."""
        results: list[list[tuple[int, float]]] = []
        for start in range(0, queries.shape[0], _MAX_BATCH):
            results.extend(self._search_batch(queries[start : start + _MAX_BATCH], k, scorer))
        return results

    def _search_batch(self, q: np.ndarray, k: int, scorer: _Scorer) -> list[list[tuple[int, float]]]:
        nq = q.shape[0]
        if self._n == 0:
            return [[] for _ in range(nq)]
        p = self._planes
        # In fixed-point units: score = q.center + sum_d (q_d scale_d) v_d.
        qs = q.astype(np.float64) * p.scale.astype(np.float64)
        base = q.astype(np.float64) @ p.center.astype(np.float64)
        maxq = np.abs(qs).max(axis=1)
        sq = np.where(maxq > 0, maxq / 127.0, 1.0)
        qq = np.rint(qs / sq[:, None]).astype(np.int8)
        y = scorer.coarse(p.hi, np.ascontiguousarray((qq.astype(np.int16) + 128).astype(np.uint8).T))
        if y.shape[0] > self._n:
            y[self._n :] = np.iinfo(np.int32).min
        groups = y.shape[0] // _GROUP_ROWS
        # Row r is in fine group r mod (16 G) and in group r mod G: both maxima are reductions
        # over the leading axis, i.e. element-wise maxima of contiguous blocks.
        fmax = y.reshape(_FINE_ROWS, groups * _GROUP_ROWS // _FINE_ROWS, y.shape[1]).max(axis=0)
        gmax = fmax.reshape(_GROUP_ROWS // _FINE_ROWS, groups, y.shape[1]).max(axis=0)
        unit = 256.0 * sq
        bound = _coarse_bound(qs, qq, sq, p.hmax)
        # Stage 1, per query: a lower bound on the k-th best person's exact score.
        qs32 = qs.astype(np.float32)
        floors = [self._kth_person_floor(qs32[j], base[j], y[:, j], gmax[:, j], groups, k) for j in range(nq)]
        # Stage 2: every row whose coarse score could reach that bound; then exact scores.
        limit = np.iinfo(np.int32)
        t = np.array(
            [
                limit.min
                if f is None
                else max(limit.min + 1, min(limit.max, math.floor((f - base[j] - bound[j]) / unit[j])))
                for j, f in enumerate(floors)
            ],
            dtype=np.int64,
        )
        rows = self._shortlists(y, fmax, t)
        return [self._best_per_person(r, self._exact(qs32[j], base[j], r), k) for j, r in enumerate(rows)]

    def _group_rows(self, group_ids: np.ndarray, groups: int) -> np.ndarray:
        rows = (group_ids[None, :] + groups * np.arange(_GROUP_ROWS)[:, None]).ravel()
        return rows[rows < self._n]

    def _exact(self, qs: NDArray[np.float32], base: float, rows: np.ndarray) -> NDArray[np.float32]:
        """Exact scores q.center + sum_d (q_d scale_d) v_d of `rows` in float32.

        Row-wise products summed per row (not a BLAS gemv, whose blocking varies with the number
        of rows): a template scores the same whatever else is on the shortlist.
        """
        p = self._planes
        v = p.hi[rows].astype(np.float32)
        v -= 128.0
        v *= 256.0
        v += p.lo[rows]
        v *= qs
        scores: NDArray[np.float32] = v.sum(axis=1) + np.float32(base)
        return scores

    def _best_per_person(self, rows: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
        order = np.lexsort((rows, -scores))
        codes = self._codes[rows[order]]
        _, first = np.unique(codes, return_index=True)
        first.sort()
        top = first[:k]
        return [(int(codes[i]), float(scores[order[i]])) for i in top]

    def _kth_person_floor(
        self, qs: np.ndarray, base: float, y: np.ndarray, gmax: np.ndarray, groups: int, k: int
    ) -> float | None:
        """The exact score of the k-th best person among a few coarse-best rows (a lower bound on
        the true k-th best); None when fewer than k persons turn up (then every row is a candidate)."""
        m = min(groups, 4 * k)
        while True:
            top_groups = np.argpartition(-gmax, m - 1)[:m] if m < groups else np.arange(groups)
            rows = self._group_rows(top_groups, groups)
            take = min(len(rows), 8 * k * max(1, m // (4 * k)))
            best = rows[np.argpartition(-y[rows], take - 1)[:take]] if take < len(rows) else rows
            found = self._best_per_person(best, self._exact(qs, base, best), k)
            if len(found) >= k:
                return found[-1][1]
            if m >= groups:
                return None
            m = min(groups, m * 4)

    def _shortlists(self, y: np.ndarray, fmax: np.ndarray, t: np.ndarray) -> list[np.ndarray]:
        """Per query j, the rows with coarse score y >= t[j]: only inside the fine groups whose
        maximum reaches t[j], so crowded and sparse scores alike cost a small part of a full pass."""
        fine = fmax.shape[0]
        steps = fine * np.arange(_FINE_ROWS)
        out = []
        for j in range(len(t)):
            g = np.flatnonzero(fmax[:, j] >= t[j])
            rows = (g[None, :] + steps[:, None]).ravel()
            rows = rows[rows < self._n]
            out.append(np.sort(rows[y[rows, j] >= t[j]]))
        return out


def _coarse_bound(
    qs: NDArray[np.float64], qq: NDArray[np.int8], sq: NDArray[np.float64], hmax: float
) -> NDArray[np.float64]:
    """Per query, the most the coarse score can differ from the exact one.

    With qs = q * scale, exact - q.center = sum qs_d v_d, v_d = 256 h_d + l_d, |l_d| <= 128, and
    coarse - q.center = 256 sq sum qq_d h_d. The difference is sum qs_d l_d + 256 sum f_d h_d with
    f = qs - sq*qq, so it is at most 128 |qs|_1 + 256 |f|_2 max_i |h_i|_2 (Cauchy-Schwarz). A small
    slack covers float32 rounding.
    """
    f = qs - sq[:, None] * qq.astype(np.float64)
    bound: NDArray[np.float64] = 128.0 * np.abs(qs).sum(axis=1) + 256.0 * np.sqrt((f * f).sum(axis=1)) * hmax + 1e-5
    return bound


def _thresholds_array(persons: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    pt = np.full(len(persons), np.nan, dtype=np.float64)
    for p, t in thresholds.items():
        if t is None:
            continue
        code = int(np.searchsorted(persons, _encode_ids([p])[0])) if len(persons) else 0
        if code < len(persons) and persons[code] == _encode_ids([p])[0]:
            pt[code] = float(t)
    return pt


def _check_offset(offset: np.ndarray | None, dim: int) -> NDArray[np.float32] | None:
    if offset is None:
        return None
    off = np.asarray(offset, dtype=np.float32).reshape(-1)
    if off.shape != (dim,) or not np.all(np.isfinite(off)):
        raise MatcherError(f"offset must be {dim} finite values, got shape {np.shape(offset)}")
    return off


def _encode_ids(ids: Sequence[str]) -> np.ndarray:
    """Person ids as a fixed-width bytes array (UTF-8)."""
    raw = []
    for p in ids:
        if not isinstance(p, str) or not p or "\x00" in p:
            raise MatcherError(f"person id {p!r} must be a non-empty string without NUL characters")
        raw.append(p.encode())
    if not raw:
        return np.zeros(0, dtype="S1")
    return np.array(raw, dtype=f"S{max(len(b) for b in raw)}")


class _Scorer:
    """The coarse pass: a uint8 x uint8 matrix product around zero points 128 in ONNX Runtime
    (MLAS kernels), exact in int32 on every CPU (see the module's docstring)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self._session: InferenceSession | None = None
        self._lock = threading.Lock()

    def _get(self) -> InferenceSession:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = _make_session(self.threads)
        return self._session

    def coarse(self, hi: NDArray[np.uint8], qq_t: NDArray[np.uint8]) -> NDArray[np.int32]:
        """(rows, D) uint8 (value + 128) times (D, Q) uint8 (value + 128) -> (rows, Q) int32,
        the product of the values."""
        # ONNX Runtime has no type information: its outputs are Any.
        y: NDArray[np.int32] = self._get().run(None, {"a": hi, "b": qq_t})[0]
        return y


def _make_session(threads: int | None) -> InferenceSession:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])],
        "watchlist_coarse",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, ["rows", "dim"]),
            helper.make_tensor_value_info("b", TensorProto.UINT8, ["dim", "queries"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["rows", "queries"])],
        initializer=[
            helper.make_tensor("a_zero", TensorProto.UINT8, [], [128]),
            helper.make_tensor("b_zero", TensorProto.UINT8, [], [128]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads) if threads else min(4, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class Matcher:
    """Matches embeddings against the current watchlist index; the index can be swapped live.

    An empty index (no list applied yet) matches nothing, whatever the embeddings' dimension.

    Example::

        matcher = Matcher(TemplateIndex.build(ids, embeddings, version=7, model_id=engine.model_id))
        for m in matcher.match(face_embeddings):      # (N, D) float32, unit length
            if m is not None:
                print(m.person_id, m.score, m.margin)
        matcher.swap(next_index)                       # readers keep going; next call sees it
    """

    def __init__(
        self,
        index: TemplateIndex | None = None,
        *,
        threshold: float | None = None,
        threads: int | None = None,
        dim: int = 128,
    ) -> None:
        """`threshold` is the global threshold (None: the watchlist's default); per-person overrides
        from the watchlist take precedence. `threads`: threads of the coarse pass."""
        self._index = index if index is not None else TemplateIndex.empty(dim)
        self.threshold = threshold
        self._scorer = _Scorer(threads)

    @property
    def index(self) -> TemplateIndex:
        return self._index

    @property
    def version(self) -> int:
        """The watchlist version being matched against (0: none applied)."""
        return self._index.version

    @property
    def model_id(self) -> str:
        return self._index.model_id

    def swap(self, new_index: TemplateIndex) -> TemplateIndex:
        """Put `new_index` in place and return the previous one. Searches already running finish
        on the index they started with; every later call uses the new one."""
        if not isinstance(new_index, TemplateIndex):
            raise MatcherError(f"swap needs a TemplateIndex, got {type(new_index).__name__}")
        old, self._index = self._index, new_index
        log.info(
            "watchlist index swapped: version %d -> %d (%d persons, %d templates)",
            old.version,
            new_index.version,
            new_index.n_persons,
            new_index.n_templates,
        )
        return old

    def search(self, embeddings: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k best persons for each row of `embeddings` (N, D): (person_id, score of their best
        template), best first; fewer when the watchlist holds fewer persons."""
        index = self._index
        q = _check_queries(embeddings, index.dim, empty=index.n_templates == 0)
        if k < 1:
            raise MatcherError(f"k must be at least 1, got {k}")
        return [[(index.person_id(c), s) for c, s in row] for row in index.search_persons(q, k, self._scorer)]

    def match(self, embeddings: np.ndarray, *, misses: bool = False) -> list[Match | None]:
        """For each row of `embeddings`: a Match for the best person when their score reaches their
        threshold, else None. `second_score` is the best score of any other person (-1: none).

        `misses=True`: a Match for the best person whatever the score (`is_hit` tells which are
        hits), so a caller can say how near a face came; the search is the same."""
        index = self._index
        q = _check_queries(embeddings, index.dim, empty=index.n_templates == 0)
        out: list[Match | None] = []
        for row in index.search_persons(q, 2, self._scorer):
            if not row:
                out.append(None)
                continue
            code, score = row[0]
            person = index.person_id(code)
            thr = index.threshold_for(person, self.threshold)
            if score < thr and not misses:
                out.append(None)
                continue
            second = row[1][1] if len(row) > 1 else -1.0
            out.append(
                Match(
                    person_id=person,
                    score=max(min(score, 1.0), -1.0),
                    threshold=thr,
                    second_score=max(min(second, 1.0), -1.0),
                )
            )
        return out

    @property
    def default_threshold(self) -> float | None:
        """The threshold that applies to a person without an override (None: no list applied yet)."""
        if self.threshold is not None:
            return float(self.threshold)
        return self._index.default_threshold if self._index.n_templates else None


def _check_queries(embeddings: np.ndarray, dim: int, empty: bool = False) -> np.ndarray:
    q = np.asarray(embeddings, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or (q.shape[1] != dim and not empty):
        raise MatcherError(f"embeddings must have shape (N, {dim}) to match this watchlist, got {np.shape(embeddings)}")
    if not np.all(np.isfinite(q)):
        raise MatcherError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(q, axis=1)
    if q.shape[0] and np.any(np.abs(norms - 1.0) > _NORM_TOLERANCE):
        bad = int(np.argmax(np.abs(norms - 1.0)))
        raise MatcherError(f"embedding {bad} has length {norms[bad]:.4f}; the matcher needs unit-length embeddings")
    return np.ascontiguousarray(q)
