"""The matcher's known-answer test: a small index of worst-case templates searched by the real
`Matcher`, its top-k compared with a plain float64 brute force over the same stored templates.

Why: the coarse pass runs an integer matrix product in ONNX Runtime, whose kernels differ by CPU
(engines/cpu.py); one that saturates (MLAS's AVX2 kernels add pairs of uint8 x int8 products in
int16) drops the right person from the shortlist, and the unit would miss them without a sign. The
index here makes that happen where it can: every value of most templates at the edge of its
dimension's range (high bytes near 0 and 255), queries with extreme coordinates (all of them as
large as they can be, or all weight on one dimension), and crowded scores (dozens of templates a
sign flip or two from the query). The right answer needs no stored file: it is computed here, in
float64, from `TemplateIndex.dequantize` -- exactly the values the matcher scores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from matching.matcher import Matcher, TemplateIndex

SEED = 20261206
K = 5
# The matcher scores in float32 what brute force scores in float64: they agree within ~1e-6.
SCORE_TOLERANCE = 1e-4


class MatcherSelfTestError(RuntimeError):
    """The matcher's top-k differs from brute force on the check index: its coarse pass computes wrong
    numbers on this CPU. The message names the query, the expected and the found persons and scores."""


@dataclass(frozen=True)
class MatcherCheck:
    """What a passed matcher check covered."""

    queries: int
    templates: int
    persons: int
    worst_score_error: float  # largest |matcher score - brute-force score| over every result
    duration_s: float


def _unit(rows: NDArray[np.float64]) -> NDArray[np.float32]:
    # numpy's stubs give this expression as Any; the annotation checks its dtype.
    unit: NDArray[np.float32] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return unit


def check_index(dim: int) -> tuple[list[str], NDArray[np.float32], NDArray[np.float32]]:
    """(person ids, templates (n, dim), queries (q, dim)), unit length, from a fixed seed.

    Templates: sign vectors (every coordinate at +-1/sqrt(dim), the edge of its range, so every high
    byte is near 0 or 255; nothing else in the index widens the ranges) and a crowd of them one to
    three flips from a few of those (scores 1 - 2/dim apart). Queries: near sign vectors (every
    query byte near +-127), negated ones, a Gaussian face, and one with all its weight on one
    dimension.
    """
    rng = np.random.Generator(np.random.PCG64(SEED))
    signs = rng.choice(np.array([-1.0, 1.0]), size=(360, dim))
    crowd = []
    for base in signs[:3]:
        for _ in range(30):
            flipped = base.copy()
            flipped[rng.choice(dim, size=int(rng.integers(1, 4)), replace=False)] *= -1
            crowd.append(flipped)
    templates = _unit(np.vstack([signs, np.array(crowd)]))
    # Most persons have one template, some two or three with their rows far apart, as a real list holds them.
    n = len(templates)
    owners = np.arange(n)
    owners[rng.choice(n, size=n // 4, replace=False)] = rng.integers(0, n // 2, size=n // 4)
    ids = [f"check-{int(o):04d}" for o in owners]
    one_hot = np.zeros((1, dim))
    one_hot[0, int(rng.integers(dim))] = 1.0
    near = signs[:12] + rng.normal(0.0, 0.05, (12, dim))
    queries = _unit(np.vstack([near, -signs[12:14], rng.standard_normal((1, dim)), one_hot]))
    return ids, templates, queries


def _brute_force(index: TemplateIndex, owners: np.ndarray, queries: np.ndarray) -> list[dict[str, float]]:
    """Per query, every person's best exact score (float64) over the stored templates."""
    rows = index.dequantize(np.arange(index.n_templates)).astype(np.float64)
    scores = queries.astype(np.float64) @ rows.T
    out = []
    for row in scores:
        best: dict[str, float] = {}
        for person, s in zip(owners, row):
            if s > best.get(person, -np.inf):
                best[person] = float(s)
        out.append(best)
    return out


def check_matcher(dim: int = 129, threads: int | None = None, cpu_features: Sequence[str] = ()) -> MatcherCheck:
    """Search the check index with a real Matcher and compare its top-k with brute force.

    Raises MatcherSelfTestError at the first query whose result differs beyond the tolerance
    (a person missing from the top-k, or a score off by more than SCORE_TOLERANCE). `dim`: the
    engine's embedding size, so the coarse pass runs on the unit's shapes; `cpu_features`: the
    CPU's integer-kernel features (engines.cpu), named in the error.
    """
    started = time.perf_counter()
    ids, templates, queries = check_index(dim)
    index = TemplateIndex.build(ids, templates, version=1, model_id="selftest")
    found = Matcher(index, threads=threads).search(queries, k=K)
    truth = _brute_force(index, np.asarray(ids), queries)
    worst = 0.0
    for j, (result, best) in enumerate(zip(found, truth)):
        expected = sorted(best.items(), key=lambda item: -item[1])[:K]
        problem = ""
        if len(result) != len(expected):
            problem = f"{len(result)} persons found, {len(expected)} expected"
        for rank, ((person, score), (_, right)) in enumerate(zip(result, expected)):
            # Ties within the tolerance may come in either order: judge each found person by its true score.
            error = max(abs(score - best.get(person, -np.inf)), abs(best.get(person, -np.inf) - right))
            worst = max(worst, error)
            if error > SCORE_TOLERANCE and not problem:
                problem = (
                    f"rank {rank + 1}: found {person} scoring {score:.6f} (its brute-force score "
                    f"{best.get(person, float('nan')):.6f}); expected score {right:.6f}"
                )
        if problem:
            raise MatcherSelfTestError(
                f"matcher known-answer test failed on query {j} of {len(queries)} (index of {index.n_templates} "
                f"worst-case templates, {dim} dimensions): {problem}; expected top {K}: "
                + ", ".join(f"{p} {s:.6f}" for p, s in expected)
                + "; found: "
                + (", ".join(f"{p} {s:.6f}" for p, s in result) or "nobody")
                + f" (score tolerance {SCORE_TOLERANCE:g}). CPU features seen: {', '.join(cpu_features) or 'none read'}. "
                "This machine's integer kernels give other sums than the matcher relies on; do not match "
                "faces with it until that is resolved (docs/edge.md, 'Self-test at start')"
            )
    return MatcherCheck(len(queries), index.n_templates, index.n_persons, worst, time.perf_counter() - started)
