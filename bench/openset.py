"""Open-set (watchlist) accuracy on a LAG-layout folder: FNIR at fixed FPIR, ours and face_recognition.

Protocol. For each of --splits random identity splits, half the identities are enrolled (their young
photos are the watchlist; a person's score is the best over their photos) and the other half are
strangers. Probes are the adult photos. A stranger's probe raises a false alert when its best score
over the list exceeds the threshold (FPIR = share of strangers' faces that alert); an enrolled
person's probe is found when its own person ranks first and scores above the threshold (FNIR =
share not found). The threshold is set per split at the FPIR wanted; figures are means over the
splits. A photo with no face found is a miss (and never alerts). Each photo is embedded once;
the splits only re-partition the identities.

The default configuration is the unit's: one embedding per face, and a "second look" for faces whose
best score reaches the threshold the model's calibration gives for FPIR 0.2 at the list's size
(``[matching] second_look_fpir``; --second-look): those are embedded again with their mirror image
and judged on the flip-averaged embedding. The JSON's top-level figures are this configuration;
`ours_one_look` is without the second look, `ours_flip` with every face flip-averaged.

Also measured in the same run:
  levers     - flip-averaging, multi-crop, mean template vs best template, one enrolment photo per
               person, S-norm, and a "second look" (flip-averaging only for faces near the threshold)
  scaling    - FNIR at FPIR 0.01 with 1k, 10k, 100k extra distractor photos. lag-dev has no more
               identities, so these are SYNTHETIC: each probe's best score over the extra persons is
               drawn from its own measured scores against other identities (DistractorModel), with
               a held-out check of that model
  fpir_model - how well the calibration (engines/calibration.py) holds: the FPIR it predicts at each
               measured threshold, and the FPIR and FNIR at the threshold it picks per list size

--record-misses measures only the miss curve (FNIR at a grid of fixed thresholds, this protocol's
definition, mean over the splits) for the model's one-look and flip-averaged scores, and writes it as the
`misses` section of the model's packaged calibrations (engines/calibrations/<model>.json and
<model>+flip.json), which `watchlist build` and `watchlist inspect` print as the expected miss rate.

Example:
    python bench/openset.py --data ../shared/data/lag-dev --json bench/results/openset.json
    python bench/openset.py --config /etc/checkpoint/unit.toml --json out/openset-mymodel.json
    python bench/openset.py --data ../shared/data/lag-dev --config bench/configs/dlib.toml --no-peer \
        --no-levers --record-misses
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, Photo, list_photos, require_data
from bench.machine import describe_machine, machine_summary
from edge.decision import DecisionConfig

FPIRS = (0.01, 0.03, 0.1)
SCALING = (0, 1_000, 10_000, 100_000)
# Chip variants embedded per photo: the chip, small shifts and scales of it, each also mirrored.
_JITTERS = ((0, 0, 1.0), (3, 0, 1.0), (-3, 0, 1.0), (0, 3, 1.0), (0, 0, 1.06))


# ---------------------------------------------------------------- the metric


def _search(person_scores: np.ndarray, truth: np.ndarray, extra_max: np.ndarray | None):
    """(strangers' best scores, enrolled probes' own-person scores, their best other scores)."""
    scores = np.asarray(person_scores, np.float64)
    truth = np.asarray(truth)
    n_probe = len(truth)
    extra = np.full(n_probe, -np.inf) if extra_max is None else np.asarray(extra_max, np.float64)
    mated = truth >= 0
    if not mated.any() or mated.all():
        raise ValueError("open-set rates need both enrolled persons' probes and strangers' probes")
    best_any = np.maximum(scores.max(axis=1) if scores.shape[1] else np.full(n_probe, -np.inf), extra)
    rows = np.flatnonzero(mated)
    own = scores[rows, truth[rows]]
    others = scores[rows].copy()
    others[np.arange(len(rows)), truth[rows]] = -np.inf
    rival = np.maximum(others.max(axis=1), extra[rows])
    return best_any[~mated], own, rival


def _fnir(own: np.ndarray, rival: np.ndarray, threshold: float) -> float:
    """Share of enrolled probes not found: own person not first, or not above the threshold."""
    found = (own > threshold) & (own >= rival) & np.isfinite(own)
    return float(1 - found.mean())


def open_set_rates(
    person_scores: np.ndarray, truth: np.ndarray, fpirs=FPIRS, extra_max: np.ndarray | None = None
) -> dict[float, dict]:
    """FNIR at each FPIR for one split.

    person_scores: (probes, enrolled persons), -inf where a probe or person has no face.
    truth: per probe, its person's column, or -1 for a stranger.
    extra_max: per probe, the best score over extra distractor templates (or None).
    Returns {fpir: {"fnir", "threshold", "fpir_measured"}}; a probe alerts when its score > threshold.
    """
    strangers, own, rival = _search(person_scores, truth, extra_max)
    nonmated = np.sort(strangers)[::-1]
    out = {}
    for f in fpirs:
        k = int(np.floor(f * len(nonmated)))
        thr = nonmated[k] if k < len(nonmated) else -np.inf
        out[f] = {
            "fnir": _fnir(own, rival, thr),
            "threshold": float(thr),
            "fpir_measured": float(np.mean(nonmated > thr)),
        }
    return out


def rates_at_threshold(
    person_scores: np.ndarray, truth: np.ndarray, threshold: float, extra_max: np.ndarray | None = None
) -> tuple[float, float]:
    """(FNIR, FPIR) at a given threshold, for one split."""
    strangers, own, rival = _search(person_scores, truth, extra_max)
    return _fnir(own, rival, threshold), float(np.mean(strangers > threshold))


def miss_curve(P_all: np.ndarray, proto: Protocol, thresholds: np.ndarray) -> np.ndarray:
    """FNIR at each of `thresholds` (fixed, not set per split), mean over the splits: the share of enrolled
    persons' adult probes whose own person is not first over the split's list or not above the threshold,
    exactly as `_fnir`. At a fixed threshold the list's size matters only through the rank-1 requirement
    (a bigger list holds more rivals), so the curve belongs to this protocol's list size."""
    per = []
    for enrolled in proto.splits:
        _, truth = proto.split_truth(enrolled)
        _, own, rival = _search(P_all[:, enrolled], truth, None)
        per.append([_fnir(own, rival, float(t)) for t in thresholds])
    return np.mean(per, axis=0)


def record_misses(persons: dict[str, np.ndarray], proto: Protocol, model_id: str, command: str) -> dict:
    """Write the miss curve of the one-look (`persons["plain"]`) and flip-averaged scores into the model's
    packaged calibrations (made from the same weights), as their `misses` section; returns what was written.

    The grid runs in steps of 0.001 from 0.05 below the strangers' median (thresholds at or below the
    median are refused anyway) to 1.0 (nobody found)."""
    from engines.calibration import Calibration, MissCurve

    name = model_id.split(":", 1)[0]
    per_person = len(proto.young) / len(proto.identities)
    written = {}
    for variant, flip in (("plain", False), ("flip", True)):
        cal = Calibration.load_for(name, flip_average=flip)
        made_with = cal.description.get("model_id")
        if made_with != model_id:
            sys.exit(f"error: the packaged calibration of {name} was made with {made_with}, this run is {model_id}")
        lo = np.floor((cal.strangers_median - 0.05) * 1000) / 1000
        grid = np.round(np.arange(lo, 1.0 + 5e-4, 0.001), 3)
        curve = MissCurve(
            threshold=grid,
            fnir=miss_curve(persons[variant], proto, grid),
            list_size=len(proto.splits[0]),
            templates_per_person=round(per_person, 3),
            probes=int(np.mean([(proto.split_truth(e)[1] >= 0).sum() for e in proto.splits])),
            splits=len(proto.splits),
            source="lag-dev open-set, cross-age (child photos listed, adult probes): the only cross-age set",
            note=cal.description.get("note", ""),
            command=command,
        )
        path = Calibration.packaged_path(name, flip)
        cal.with_misses(curve).save(path)
        written[str(path)] = curve.as_dict()
    return written


def person_matrix(S: np.ndarray, young_person: np.ndarray, n_persons: int) -> np.ndarray:
    """Best score over each person's templates: (probes, templates) -> (probes, persons)."""
    P = np.full((S.shape[0], n_persons), -np.inf)
    for j in range(n_persons):
        cols = young_person == j
        if cols.any():
            P[:, j] = S[:, cols].max(axis=1)
    return P


# ---------------------------------------------------------------- embeddings


@dataclass
class Embedded:
    """Embeddings per variant for every photo (rows of NaN where no face was found); for an ensemble,
    also each member's own variants (`members`, by model name) and how they are joined (`weights`, `flips`)."""

    variants: dict[str, np.ndarray]
    ok: np.ndarray
    info: dict = field(default_factory=dict)
    members: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    flips: dict[str, bool] = field(default_factory=dict)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fuse_variants(members: dict[str, dict[str, np.ndarray]], weights: dict[str, float], flips: dict[str, bool]):
    """The ensemble's variants from its members' (engines/ensemble.py): sqrt(weight) times each member's unit
    embedding, concatenated; in a flipped variant a member without `flip` keeps its plain embedding."""
    total = sum(weights.values())
    out = {}
    for variant in next(iter(members.values())):
        parts = []
        for name, w in weights.items():
            own = variant if flips[name] or variant == "plain" else variant.replace("flip", "").strip("_") or "plain"
            parts.append(np.sqrt(w / total) * members[name][own])
        out[variant] = np.hstack(parts)
    return out


def embed_ours(photos: list[Photo], config, levers: bool) -> Embedded:
    """Our engine's embeddings of each photo's central face, plain, mirrored-averaged and multi-crop; for an
    ensemble each member's too, joined as the engine joins them.

    Each member's model runs once per chip variant; the variants are combined as the Embedder combines a
    chip and its mirror (average the model's outputs, then add the norm anchor and normalise).
    """
    import cv2

    from engines.cohort import central_face
    from engines.face_engine import FaceEngine
    from engines.image import load_image

    engine = FaceEngine.load(config.model_copy(update={"flip_average": False}))
    jitters = _JITTERS if levers else _JITTERS[:1]
    specs = [m.embedder.spec for m in engine.members]
    raws = [np.full((len(photos), len(jitters), 2, s.embedding_size), np.nan, np.float32) for s in specs]
    t_det = t_emb = 0.0
    for i, p in enumerate(photos):
        t0 = time.perf_counter()
        found = central_face(engine, load_image(p.path), tight=True)
        t1 = time.perf_counter()
        t_det += t1 - t0
        if found is None:
            continue
        for m, spec, raw, chip in zip(engine.members, specs, raws, engine.member_chips([found])):
            size = spec.input_width
            chips = []
            for dx, dy, scale in jitters:
                mat = cv2.getRotationMatrix2D((size / 2, size / 2), 0, scale)
                mat[:, 2] += (dx, dy)
                c = cv2.warpAffine(
                    chip[0], mat, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
                )
                chips += [c, c[:, ::-1]]
            raw[i] = m.embedder.raw(np.ascontiguousarray(np.stack(chips))).reshape(len(jitters), 2, -1)
        t_emb += time.perf_counter() - t1
    ok = ~np.isnan(raws[0][:, 0, 0, 0])

    def variants_of(spec, raw: np.ndarray) -> dict[str, np.ndarray]:
        def finish(x: np.ndarray) -> np.ndarray:
            if spec.norm_anchor:
                x = np.concatenate([x, np.full((len(x), 1), spec.norm_anchor, np.float32)], axis=1)
            return np.where(ok[:, None], _unit(np.nan_to_num(x)), np.nan)

        out = {"plain": finish(raw[:, 0, 0]), "flip": finish(raw[:, 0].mean(axis=1))}
        if levers:
            out["multicrop"] = finish(raw[:, :, 0].mean(axis=1))
            out["multicrop_flip"] = finish(raw.mean(axis=(1, 2)))
        return out

    members = {m.name: variants_of(spec, raw) for m, spec, raw in zip(engine.members, specs, raws)}
    weights = {m.name: m.weight for m in engine.members}
    flips = {m.name: m.flip for m in engine.members}
    variants = fuse_variants(members, weights, flips) if len(members) > 1 else next(iter(members.values()))
    chips_run = ok.sum() * len(jitters) * 2
    ms_chip = 1000 * t_emb / max(1, chips_run)
    return Embedded(
        variants,
        ok,
        {
            "model_id": engine.model_id,
            "members": {m.name: {"model_id": m.model_id, "weight": m.weight, "flip": m.flip} for m in engine.members},
            "no_face": int((~ok).sum()),
            "detect_ms_per_image": round(1000 * t_det / len(photos), 2),
            "embed_ms_per_chip": round(ms_chip, 2),
            "embed_cost_chips_per_face": {"plain": 1, "flip": 2, "multicrop": 5, "multicrop_flip": 10},
        },
        members if len(members) > 1 else {},
        weights,
        flips,
    )


def embed_peer(photos: list[Photo]) -> Embedded | None:
    """face_recognition's encodings, run as in the data README's reference figures; None if not installed."""
    from bench.accuracy import run_peer

    got = run_peer(photos)
    if got is None:
        return None
    embs, info = got
    ok = np.array([e is not None for e in embs])
    dim = next(e.shape[0] for e in embs if e is not None)
    X = np.stack([e if e is not None else np.full(dim, np.nan, np.float32) for e in embs])
    return Embedded({"plain": X}, ok, {k: info[k] for k in ("no_face", "faces_per_s", "method")})


def cosine(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    S = np.nan_to_num(A).astype(np.float64) @ np.nan_to_num(B).astype(np.float64).T
    S[np.isnan(A[:, 0])] = -np.inf
    S[:, np.isnan(B[:, 0])] = -np.inf
    return S


def neg_euclid(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    a, b = np.nan_to_num(A).astype(np.float64), np.nan_to_num(B).astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    S = -np.sqrt(np.maximum(d2, 0))
    S[np.isnan(A[:, 0])] = -np.inf
    S[:, np.isnan(B[:, 0])] = -np.inf
    return S


# ---------------------------------------------------------------- the protocol


def identity_half(identity: str) -> str:
    """'a' or 'b': a fixed split of identities in two halves, by a hash of the name (the same on every machine),
    so that what is chosen on one half (an ensemble's weights) is reported on the other."""
    import hashlib

    return "ab"[hashlib.sha256(identity.encode()).digest()[0] & 1]


def select_half(photos: list[Photo], half: str | None) -> list[Photo]:
    """The photos of identities in `half` ('a' or 'b'), or all of them for None."""
    return photos if half is None else [p for p in photos if identity_half(p.identity) == half]


class Protocol:
    """The LAG folder's probes, templates and random identity splits."""

    def __init__(self, photos: list[Photo], splits: int, seed: int = 0) -> None:
        self.photos = photos
        self.identities = sorted({p.identity for p in photos})
        index = {n: i for i, n in enumerate(self.identities)}
        self.adult = np.array([i for i, p in enumerate(photos) if not p.young])
        self.young = np.array([i for i, p in enumerate(photos) if p.young])
        self.adult_person = np.array([index[photos[i].identity] for i in self.adult])
        self.young_person = np.array([index[photos[i].identity] for i in self.young])
        rng = np.random.default_rng(seed)
        n = len(self.identities)
        self.splits = [rng.permutation(n)[: n // 2] for _ in range(splits)]

    def split_truth(self, enrolled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(persons' columns in enrolled order, truth per adult probe: its column or -1)."""
        col = np.full(len(self.identities), -1)
        col[enrolled] = np.arange(len(enrolled))
        return col, col[self.adult_person]

    def run(self, P_all: np.ndarray, fpirs=FPIRS, extra=None) -> dict:
        """Mean open-set rates over the splits for a (adult probes, all persons) score matrix.
        `extra(split_index)` gives per-probe best distractor scores, or None."""
        per = []
        for k, enrolled in enumerate(self.splits):
            _, truth = self.split_truth(enrolled)
            per.append(open_set_rates(P_all[:, enrolled], truth, fpirs, None if extra is None else extra(k)))
        return summarise(per, fpirs)


def summarise(per: list[dict], fpirs) -> dict:
    """Means over splits (and the spread between splits, and each split's FNIR for paired comparisons)."""
    out = {"fnir_at_fpir": {}, "fnir_sd": {}, "threshold": {}, "fpir_measured": {}, "fnir_per_split": {}}
    for f in fpirs:
        key = str(f)
        fn = np.array([p[f]["fnir"] for p in per])
        out["fnir_per_split"][key] = [round(float(v), 4) for v in fn]
        out["fnir_at_fpir"][key] = round(float(fn.mean()), 4)
        out["fnir_sd"][key] = round(float(fn.std()), 4)
        out["threshold"][key] = round(float(np.mean([p[f]["threshold"] for p in per])), 6)
        out["fpir_measured"][key] = round(float(np.mean([p[f]["fpir_measured"] for p in per])), 4)
    return out


def paired(ours: dict, other: dict) -> dict:
    """Per FPIR: the mean over splits of (our FNIR - the other's) and in how many splits ours is lower."""
    out = {}
    for key, mine in ours["fnir_per_split"].items():
        d = np.array(mine) - np.array(other["fnir_per_split"][key])
        out[key] = {"mean_fnir_difference": round(float(d.mean()), 4), "splits_ours_lower": int((d < 0).sum())}
    return out


def snorm(S: np.ndarray, proto: Protocol, enrolled: np.ndarray) -> np.ndarray:
    """Symmetric score normalisation against a cohort: the strangers' young photos (never the probe's own)."""
    stranger = np.ones(len(proto.identities), bool)
    stranger[enrolled] = False
    cohort_cols = stranger[proto.young_person]
    finite = np.isfinite(S)
    with warnings.catch_warnings():
        # Photos without a face have no cohort scores: their statistics are NaN and their scores -inf.
        warnings.simplefilter("ignore", RuntimeWarning)
        return _snorm(S, finite, proto, stranger, cohort_cols)


def _snorm(S, finite, proto, stranger, cohort_cols) -> np.ndarray:
    C = np.where(finite, S, np.nan)[:, cohort_cols]
    own = proto.adult_person[:, None] == proto.young_person[cohort_cols][None, :]
    C[own] = np.nan
    mu_p, sd_p = np.nanmean(C, axis=1), np.nanstd(C, axis=1)
    # Template side: each young photo against the strangers' adult photos.
    T = np.where(finite, S, np.nan)[stranger[proto.adult_person]]
    mu_t, sd_t = np.nanmean(T, axis=0), np.nanstd(T, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        Z = 0.5 * ((S - mu_p[:, None]) / sd_p[:, None] + (S - mu_t[None, :]) / sd_t[None, :])
    return np.where(finite & np.isfinite(Z), Z, -np.inf)


def run_snorm(S: np.ndarray, proto: Protocol) -> dict:
    per = []
    n = len(proto.identities)
    for enrolled in proto.splits:
        _, truth = proto.split_truth(enrolled)
        P = person_matrix(snorm(S, proto, enrolled), proto.young_person, n)
        per.append(open_set_rates(P[:, enrolled], truth))
    return summarise(per, FPIRS)


def mean_templates(Y: np.ndarray, young_person: np.ndarray, n: int) -> np.ndarray:
    T = np.full((n, Y.shape[1]), np.nan)
    for j in range(n):
        rows = Y[young_person == j]
        rows = rows[~np.isnan(rows[:, 0])]
        if len(rows):
            T[j] = _unit(rows.mean(axis=0))
    return T


def first_photo_only(young_person: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Mask keeping one young photo per person (the first with a face)."""
    keep = np.zeros(len(young_person), bool)
    seen = set()
    for i, (p, good) in enumerate(zip(young_person, ok)):
        if good and p not in seen:
            keep[i] = True
            seen.add(p)
    return keep


# ---------------------------------------------------------------- scaling with synthetic distractors


class DistractorModel:
    """Per-probe best scores over K synthetic distractor templates, drawn to match measured stranger scores.

    Each probe's own stranger scores (against every young photo of another identity, about 1,160 on
    lag-dev) are its distribution: within them, the measured scores themselves; beyond its highest one,
    a tail that rises TAIL_SLOPE times as fast as a normal tail fitted to its top 5% would (cosine
    scores are bounded, and their tails are shorter than normal ones), so that lists longer than the
    measured cohort can be drawn. TAIL_SLOPE was set by the held-out check in `run_scaling`: a model
    made from a quarter of the persons predicts the best score over the other three quarters. The best of K independent draws is drawn directly by inverting that
    distribution at u ** (1 / K). Faces differ in how alike they look to strangers (their means, spreads
    and tails differ), which is why each probe keeps its own distribution rather than a pooled one.
    """

    TAIL = 0.05
    TAIL_SLOPE = 0.4

    def __init__(self, P_all: np.ndarray, proto: Protocol, seed: int = 1) -> None:
        from statistics import NormalDist

        stranger = proto.adult_person[:, None] != np.arange(P_all.shape[1])[None, :]
        X = np.where(stranger & np.isfinite(P_all), P_all, np.inf)
        self.sorted = np.sort(X, axis=1)  # finite scores first, then inf
        self.n = np.isfinite(self.sorted).sum(axis=1)
        self.probe_ok = self.n >= 20
        self._ppf = np.vectorize(NormalDist().inv_cdf, otypes=[float])
        # Fit score = a + b * normal_quantile over each probe's top 5% of stranger scores.
        self.a = np.full(len(X), np.nan)
        self.b = np.full(len(X), np.nan)
        for i in np.flatnonzero(self.probe_ok):
            n = self.n[i]
            m = max(5, int(self.TAIL * n))
            ranks = np.arange(n - m, n)
            z = self._ppf((ranks + 0.5) / n)
            self.b[i], self.a[i] = np.polyfit(z, self.sorted[i, n - m : n], 1)
        self.rng = np.random.default_rng(seed)

    def quantile(self, q: np.ndarray) -> np.ndarray:
        """Each probe's stranger-score quantile at its own q (array over probes)."""
        rows = np.arange(len(q))
        last = np.maximum(self.n - 1, 0)
        pos = np.clip(q * self.n - 0.5, 0, last)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, last)
        body = self.sorted[rows, lo] + (pos - lo) * (self.sorted[rows, hi] - self.sorted[rows, lo])
        beyond = q * self.n - 0.5 > last
        # The fitted tail's slope, continued from the probe's highest measured score.
        z_last = self._ppf((last + 0.5) / np.maximum(self.n, 1))
        tail = self.sorted[rows, last] + self.TAIL_SLOPE * self.b * np.maximum(
            self._ppf(np.where(beyond, q, 0.5)) - z_last, 0
        )
        out = np.where(beyond, tail, body)
        return np.where(self.probe_ok, out, -np.inf)

    def best_of(self, k: int) -> np.ndarray:
        """Per probe, the best score over `k` synthetic distractor templates (-inf for k = 0)."""
        if k == 0:
            return np.full(len(self.n), -np.inf)
        # Keep q below 1: the best of very many draws still has a finite score.
        q = np.minimum(self.rng.random(len(self.n)) ** (1.0 / k), 1 - 1e-15)
        return self.quantile(q)


def run_scaling(P_all: np.ndarray, proto: Protocol) -> dict:
    """FNIR at FPIR 0.01 with synthetic extra distractors on the list, and a check of the synthetic model:
    the real list's strangers replaced by as many synthetic persons, beside the real list."""
    model = DistractorModel(P_all, proto)
    per_person = len(proto.young) / len(proto.identities)
    out = {
        "note": "extra distractors are SYNTHETIC: per probe, its best score over K/t extra persons "
        f"(t = {per_person:.2f} templates per person on lag-dev) is drawn from that probe's own measured "
        "scores against the persons of other identities (beyond its highest, a tail rising "
        f"{DistractorModel.TAIL_SLOPE} times as fast as a normal one fitted to its top 5%); lag-dev has "
        "no more identities",
        "list": {},
    }
    for k in SCALING:
        persons = round(k / per_person)
        r = proto.run(P_all, (0.01,), extra=lambda _i, n=persons: model.best_of(n))
        out["list"][str(k)] = {
            "extra_templates": k,
            "extra_persons": persons,
            "fnir_at_fpir_0.01": r["fnir_at_fpir"]["0.01"],
            "threshold": r["threshold"]["0.01"],
        }
    out["check_held_out"] = held_out_check(P_all, proto)
    return out


def held_out_check(P_all: np.ndarray, proto: Protocol, reps: int = 5) -> dict:
    """How well the synthetic model predicts longer lists than it was made from: made from the scores
    against a random quarter of the persons, it draws each probe's best over the other three quarters,
    beside the real best over them. Compared: the score that 1% of probes exceed (the threshold at FPIR
    0.01 if every probe were a stranger), and the median."""
    n = P_all.shape[1]
    own = proto.adult_person[:, None] == np.arange(n)[None, :]
    rng = np.random.default_rng(5)
    real, synthetic = [], []
    for _ in range(reps):
        perm = rng.permutation(n)
        fit, rest = np.zeros(n, bool), np.zeros(n, bool)
        fit[perm[: n // 4]] = True
        rest[perm[n // 4 :]] = True
        model = DistractorModel(np.where(fit[None, :] & ~own, P_all, -np.inf), proto, seed=int(rng.integers(1 << 30)))
        best_rest = np.where(rest[None, :] & ~own, P_all, -np.inf).max(axis=1)
        drawn = model.best_of(int(rest.sum()))
        ok = np.isfinite(best_rest) & np.isfinite(drawn)
        if not ok.any():
            continue
        real.append(np.quantile(best_rest[ok], [0.5, 0.99]))
        synthetic.append(np.quantile(drawn[ok], [0.5, 0.99]))
    if not real:
        return {"skipped": "too few identities for the synthetic model (it needs 20 per probe)"}
    r, s_ = np.mean(real, axis=0), np.mean(synthetic, axis=0)
    return {
        "persons_fitted": n // 4,
        "persons_predicted": n - n // 4,
        "real_median": round(float(r[0]), 5),
        "synthetic_median": round(float(s_[0]), 5),
        "real_q99": round(float(r[1]), 5),
        "synthetic_q99": round(float(s_[1]), 5),
    }


def calibration_for(model_id: str, flip: bool, S: np.ndarray, proto: Protocol):
    """The packaged calibration of the model where there is one, else one made from this run's stranger pairs."""
    from engines.calibration import Calibration, CalibrationError

    name = model_id.split(":", 1)[0]
    try:
        cal = Calibration.load_for(name, flip_average=flip)
        if cal.description.get("model_id") == model_id:
            return cal, f"packaged calibration of {name}{' +flip' if flip else ''}"
    except CalibrationError:
        pass
    stranger = proto.adult_person[:, None] != proto.young_person[None, :]
    return Calibration.from_scores(name, flip, {"cross_age": S[stranger]}, {}), "this run's stranger pairs"


def fpir_model_check(cal, source: str, P_all: np.ndarray, proto: Protocol, result: dict) -> dict:
    """How well the calibration's independence model holds: the FPIR it predicts at each measured threshold,
    and the FPIR and FNIR measured at the threshold it picks for each list size (synthetic extras beyond
    the real list, as in `run_scaling`)."""
    per_person = len(proto.young) / len(proto.identities)
    n = len(proto.splits[0])
    # The protocol's list holds child photos and its probes are adults: the cross-age cohort applies.
    cohort = "cross_age" if "cross_age" in cal.cohorts else None
    out: dict = {
        "calibration": source,
        "cohort": cohort or "worst of all",
        "templates_per_person": round(per_person, 3),
        "at_measured_threshold": {},
    }
    for f in FPIRS:
        thr = result["threshold"][str(f)]
        out["at_measured_threshold"][str(f)] = {
            "threshold": thr,
            "fpir_measured": result["fpir_measured"][str(f)],
            "fpir_predicted": round(cal.expected_rates(thr, n, per_person, cohort).fpir, 4),
        }
    model = DistractorModel(P_all, proto)
    out["calibrated_threshold_fpir_0.01"] = {}
    for k in SCALING:
        extra = round(k / per_person)
        op = cal.threshold_for_fpir(0.01, n + extra, per_person, cohort)
        fn, fp = [], []
        for enrolled in proto.splits:
            _, truth = proto.split_truth(enrolled)
            a, b = rates_at_threshold(P_all[:, enrolled], truth, op.threshold, model.best_of(extra))
            fn.append(a)
            fp.append(b)
        out["calibrated_threshold_fpir_0.01"][str(k)] = {
            "persons": n + extra,
            "threshold": round(op.threshold, 6),
            "extrapolated": op.extrapolated,
            "fpir_measured": round(float(np.mean(fp)), 4),
            "fnir": round(float(np.mean(fn)), 4),
        }
    return out


def second_look(
    P_plain: np.ndarray, P_flip: np.ndarray, proto: Protocol, gate_fpir: float = 0.2, gate: float | None = None
) -> dict:
    """Flip-averaging only for faces whose plain best score comes near the threshold (the unit's "second
    look", ``[matching] second_look_fpir``): a face whose plain best over the split's list reaches `gate`
    (the unit takes it from the model's calibration: the threshold for FPIR `gate_fpir` at the list's
    size) is embedded again with its mirror image and judged on that. Without `gate`, the threshold for
    FPIR `gate_fpir` measured on each split's strangers. About `gate_fpir` of strangers' faces (nearly
    all faces at a station) are embedded twice."""
    per, share, share_strangers = [], [], []
    for enrolled in proto.splits:
        _, truth = proto.split_truth(enrolled)
        A, B = P_plain[:, enrolled], P_flip[:, enrolled]
        level = open_set_rates(A, truth, (gate_fpir,))[gate_fpir]["threshold"] if gate is None else gate
        again = A.max(axis=1) >= level
        share.append(again.mean())
        share_strangers.append(again[truth < 0].mean())
        per.append(open_set_rates(np.where(again[:, None], B, A), truth))
    out = summarise(per, FPIRS)
    out["share_embedded_twice"] = round(float(np.mean(share)), 3)
    out["share_of_strangers_embedded_twice"] = round(float(np.mean(share_strangers)), 3)
    out["embed_cost_chips_per_face"] = round(1 + float(np.mean(share)), 3)
    out["gate"] = (
        f"plain best at or above {gate:.6f}, the calibrated threshold for FPIR {gate_fpir} at the list's size"
        if gate is not None
        else f"plain best above the threshold for FPIR {gate_fpir} measured on each split's strangers"
    )
    return out


def member_rows(ours: Embedded, proto: Protocol, second_look_fpir: float) -> dict:
    """Each member of an ensemble alone, from the same photos and chips: one look, every face flipped, and
    (where `second_look_fpir`) its default, the second look gated by its own calibration (or, without a
    packaged one, by this run's stranger pairs)."""
    out = {}
    n_id = len(proto.identities)
    per_person = len(proto.young) / n_id
    for name, variants in ours.members.items():
        scores = {v: cosine(variants[v][proto.adult], variants[v][proto.young]) for v in ("plain", "flip")}
        persons = {v: person_matrix(scores[v], proto.young_person, n_id) for v in scores}
        r = {"one_look": proto.run(persons["plain"]), "flip": proto.run(persons["flip"])}
        if second_look_fpir:
            model_id = ours.info["members"][name]["model_id"]
            cal, source = calibration_for(model_id, False, scores["plain"], proto)
            gate = cal.threshold_for_fpir(second_look_fpir, len(proto.splits[0]), per_person).threshold
            r["default"] = second_look(persons["plain"], persons["flip"], proto, second_look_fpir, gate=gate)
            r["default"]["gate_calibration"] = source
        else:
            r["default"] = r["one_look"]
        out[name] = {"default": r.pop("default"), **r}
    return out


# ---------------------------------------------------------------- main


def evaluate_method(emb: Embedded, variant: str, proto: Protocol, similarity) -> tuple[dict, np.ndarray, np.ndarray]:
    X = emb.variants[variant]
    S = similarity(X[proto.adult], X[proto.young])
    P_all = person_matrix(S, proto.young_person, len(proto.identities))
    return proto.run(P_all), S, P_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder in the LAG layout")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--config", type=Path, help="unit config file; its [engine] table is used (default: defaults)")
    ap.add_argument("--splits", type=int, default=20, help="random identity splits to average over")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N identities (quick runs)")
    ap.add_argument(
        "--half",
        choices=("a", "b"),
        help="only the identities of one fixed half (identity_half): the ensemble's weights were chosen on a, "
        "its figures are reported on b",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the face_recognition comparison")
    ap.add_argument("--no-levers", action="store_true", help="skip multi-crop (5x the embedding work)")
    ap.add_argument(
        "--second-look",
        type=float,
        default=DecisionConfig().second_look_fpir,
        help="the unit's [matching] second_look_fpir: faces above the calibrated threshold for this FPIR are "
        "flip-averaged (default: the unit's default; 0: off)",
    )
    ap.add_argument(
        "--record-misses",
        action="store_true",
        help="measure only the miss curve at fixed thresholds, one look and flip-averaged, and write it into the "
        "model's packaged calibrations (engines/calibrations/) as their misses section",
    )
    args = ap.parse_args(argv)
    if args.splits < 1:
        ap.error("--splits must be at least 1")
    if not 0 <= args.second_look < 1:
        ap.error("--second-look must lie in [0, 1)")

    from engines.config import EngineConfig, EngineConfigError, load_engine_config

    try:
        config = load_engine_config(args.config) if args.config else EngineConfig()
    except EngineConfigError as exc:
        sys.exit(f"error: {exc}")
    root = require_data(args.data)
    photos = select_half(list_photos(root), args.half)
    if args.limit:
        keep = sorted({p.identity for p in photos})[: args.limit]
        photos = [p for p in photos if p.identity in keep]
    proto = Protocol(photos, args.splits)
    t0 = time.perf_counter()
    ours = embed_ours(photos, config, levers=not args.no_levers)
    default_variant = "flip" if config.flip_average else "plain"
    looks = "every face flipped" if config.flip_average else "one look"
    if not config.flip_average and args.second_look:
        looks = f"second look from the calibrated threshold for FPIR {args.second_look:g}"
    results: dict = {
        "data": str(root),
        "images": len(photos),
        "identities": len(proto.identities),
        "identity_half": args.half or "all",
        "splits": args.splits,
        "machine": describe_machine(),
        "enrolled_per_split": len(proto.splits[0]),
        "probes": len(proto.adult),
        "templates": len(proto.young),
        "citation": "S. Bianco, Large Age-Gap Face Verification by Feature Injection in Deep Networks, PRL 90, 2017",
        "configuration": f"engine config {'from ' + str(args.config) if args.config else 'defaults'} "
        f"(flip_average = {str(config.flip_average).lower()}); {looks}",
        "ours_info": ours.info,
    }
    n_id = len(proto.identities)
    scores = {v: cosine(ours.variants[v][proto.adult], ours.variants[v][proto.young]) for v in ("plain", "flip")}
    persons = {v: person_matrix(scores[v], proto.young_person, n_id) for v in scores}
    if args.record_misses:
        command = "python " + shlex.join(["bench/openset.py", *(sys.argv[1:] if argv is None else argv)])
        results["misses"] = record_misses(persons, proto, ours.info["model_id"], command)
        for path, m in results["misses"].items():
            at = {t: f for t, f in zip(m["threshold"], m["fnir"])}
            print(f"{path}: " + ", ".join(f"FNIR {at[t]:.3f} at {t}" for t in m["threshold"][::25]))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
        return 0
    S, P_all = scores[default_variant], persons[default_variant]
    one_look = proto.run(P_all)
    flip = proto.run(persons["flip"])
    second = not config.flip_average and bool(args.second_look)
    # The gate of the second look is on plain scores; alerts are decided on flip-averaged ones whenever
    # faces near the threshold are flip-averaged (engines.calibration.Calibration.for_thresholds).
    gate_cal, _ = calibration_for(ours.info["model_id"], config.flip_average, S, proto)
    flipped = "flip" if (config.flip_average or second) else "plain"
    cal, source = calibration_for(ours.info["model_id"], flipped == "flip", scores[flipped], proto)
    base, rows = one_look, [("ours, one look", one_look)]
    if second:
        # The unit's default: the second look's gate comes from the calibration, as on a unit.
        per_person = len(proto.young) / len(proto.identities)
        gate = gate_cal.threshold_for_fpir(args.second_look, len(proto.splits[0]), per_person).threshold
        base = second_look(persons["plain"], persons["flip"], proto, args.second_look, gate=gate)
        results["ours_one_look"] = one_look
        rows = [("ours (default: second look)", base), ("ours, one look", one_look)]
        # For the figures below that need one score matrix: a face looked at again when its best over every
        # lag-dev person reaches the gate (the largest list this data gives).
        again = persons["plain"].max(axis=1) >= gate
        P_all = np.where(again[:, None], persons["flip"], persons["plain"])
    results.update(base)
    results["ours_flip"] = flip
    rows.append(("ours + flip", flip))
    if ours.members:
        results["members"] = member_rows(ours, proto, args.second_look)
        for name, r in results["members"].items():
            rows += [(f"{name} alone{'' if k == 'default' else ', ' + k.replace('_', ' ')}", r[k]) for k in r]
            results["members"][name]["ours_vs_member_default"] = paired(base, r["default"])
    if not args.no_peer:
        peer = embed_peer(photos)
        if peer is None:
            print("face_recognition is not installed: peer skipped (pip install --no-deps face_recognition dlib-bin)")
        else:
            r, _, _ = evaluate_method(peer, "plain", proto, neg_euclid)
            results["peer_face_recognition"] = {**r, **peer.info}
            rows.append(("face_recognition", r))

    if "peer_face_recognition" in results:
        results["ours_vs_peer"] = paired(results, results["peer_face_recognition"])
        results["ours_flip_vs_peer"] = paired(flip, results["peer_face_recognition"])
    # Levers, each against the plain (default) configuration unless named.
    levers: dict = {}
    for variant in ("multicrop", "multicrop_flip"):
        if variant in ours.variants:
            levers[variant] = evaluate_method(ours, variant, proto, cosine)[0]
    keep = first_photo_only(proto.young_person, ours.ok[proto.young])
    for variant in ("plain", "flip"):
        X = ours.variants[variant]
        T = mean_templates(X[proto.young], proto.young_person, n_id)
        levers[f"{variant}_mean_template"] = proto.run(cosine(X[proto.adult], T))
        one = person_matrix(np.where(keep[None, :], scores[variant], -np.inf), proto.young_person, n_id)
        levers[f"{variant}_one_photo_per_person"] = proto.run(one)
    levers["plain_snorm"] = run_snorm(scores["plain"], proto)
    levers["second_look_flip"] = second_look(persons["plain"], persons["flip"], proto)
    results["levers"] = levers
    rows += [(k, v) for k, v in levers.items()]
    results["scaling"] = run_scaling(P_all, proto)
    results["fpir_model"] = fpir_model_check(cal, source, P_all, proto, base)
    results["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"\n{len(photos)} images, {len(proto.identities)} identities, {args.splits} splits ({root})")
    print(machine_summary(results["machine"]))
    print(f"{'method':<46}" + "".join(f"{'FNIR@' + str(f):>12}" for f in FPIRS))
    for name, r in rows:
        print(f"{name:<46}" + "".join(f"{r['fnir_at_fpir'][str(f)]:>12.3f}" for f in FPIRS))
    print("\nFNIR at FPIR 0.01 as the list grows (synthetic extra distractor templates):")
    for k, v in results["scaling"]["list"].items():
        print(f"  +{int(k):>7} templates: FNIR {v['fnir_at_fpir_0.01']:.3f} (threshold {v['threshold']:.4f})")
    print("\nFPIR measured vs the independence model at the same threshold:")
    for f in FPIRS:
        m = results["fpir_model"]["at_measured_threshold"][str(f)]
        print(
            f"  threshold {m['threshold']:.4f}: measured {m['fpir_measured']:.3f}, predicted {m['fpir_predicted']:.3f}"
        )
    print(f"\nAt the threshold the calibration picks for FPIR 0.01 ({results['fpir_model']['calibration']}):")
    for v in results["fpir_model"]["calibrated_threshold_fpir_0.01"].values():
        print(
            f"  {v['persons']:>7} persons: threshold {v['threshold']:.4f}, FPIR {v['fpir_measured']:.4f}, FNIR {v['fnir']:.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
