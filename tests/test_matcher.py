"""The matcher: exact results against a brute-force search, thresholds, deltas, and live swaps."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from matching.match import Match
from matching.matcher import Matcher, MatcherError, TemplateIndex
from testing.synthetic import ENGINE_LIKE, person_centers, samples_of, unit_rows

# Exact answers are the matcher's promise on every CPU: CI runs this file under emulated AVX2 too.
pytestmark = pytest.mark.kernels


def _brute_force(index: TemplateIndex, ids: list[str], q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Exact float64 scores against the stored templates, best template per person."""
    stored = index.dequantize(np.arange(index.n_templates)).astype(np.float64)
    scores = q.astype(np.float64) @ stored.T
    out = []
    for row in scores:
        best: dict[str, float] = {}
        for i in np.argsort(-row, kind="stable"):
            best.setdefault(ids[i], float(row[i]))
        out.append(sorted(best.items(), key=lambda t: -t[1])[:k])
    return out


def _data(
    n_persons: int, per: int, seed: int = 0, shape: dict | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    shape = shape or {}
    centers = person_centers(n_persons, seed=seed, shared=shape.get("shared", 0.0))
    emb = samples_of(centers, per, seed=seed + 1, spread=shape.get("spread", 0.55))
    ids = [f"p{i // per:06d}" for i in range(len(emb))]
    return ids, emb, centers


def _queries(
    centers: np.ndarray, n_genuine: int, n_strangers: int, seed: int = 9, shape: dict | None = None
) -> np.ndarray:
    shape = shape or {}
    rng = np.random.default_rng(seed)
    spread = shape.get("spread", 0.55)
    genuine = samples_of(centers[rng.integers(0, len(centers), n_genuine)], 1, seed=seed + 1, spread=spread)
    strangers = samples_of(
        person_centers(n_strangers, seed=seed + 2, shared=shape.get("shared", 0.0)), 1, seed=seed + 3, spread=spread
    )
    return np.concatenate([genuine, strangers])


@pytest.mark.parametrize(
    "n_persons,per,shape",
    [
        (1, 1, None),
        (3, 2, None),
        (400, 3, None),
        (6000, 3, None),
        (6000, 3, ENGINE_LIKE),  # crowded: strangers at 0.97, the shortlist holds thousands of rows
    ],
)
def test_search_equals_brute_force(n_persons: int, per: int, shape: dict | None) -> None:
    ids, emb, centers = _data(n_persons, per, shape=shape)
    index = TemplateIndex.build(ids, emb, version=1, model_id="m")
    matcher = Matcher(index)
    q = _queries(centers, 12, 12, shape=shape)
    for k in (1, 5):
        got = matcher.search(q, k=k)
        want = _brute_force(index, ids, q, k)
        for g, w in zip(got, want):
            assert [p for p, _ in g] == [p for p, _ in w]
            np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=2e-6)


def test_stored_templates_are_within_fixed_point_step_of_input() -> None:
    ids, emb, _ = _data(50, 2)
    index = TemplateIndex.build(ids, emb)
    err = np.abs(index.dequantize(np.arange(len(ids))) - emb).max()
    assert err < 1e-5


def test_person_with_many_templates_does_not_hide_second_person() -> None:
    # 40 near-identical templates of one person would fill a template top-k; persons must still be ranked.
    rng = np.random.default_rng(3)
    base = unit_rows(rng.standard_normal((1, 128)))
    crowd = unit_rows(base + 0.01 * rng.standard_normal((40, 128)))
    other = unit_rows(base + 0.3 * rng.standard_normal((1, 128)))
    far = unit_rows(rng.standard_normal((200, 128)))
    ids = ["crowd"] * 40 + ["other"] + [f"f{i}" for i in range(200)]
    emb = np.concatenate([crowd, other, far])
    matcher = Matcher(TemplateIndex.build(ids, emb, default_threshold=0.5))
    (row,) = matcher.search(base, k=3)
    assert [p for p, _ in row][:2] == ["crowd", "other"]
    (m,) = matcher.match(base)
    assert m.person_id == "crowd"
    assert m.second_score == pytest.approx(float(other[0] @ base[0]), abs=1e-4)


def test_match_thresholds_and_second_score() -> None:
    ids, emb, centers = _data(30, 2, seed=4)
    index = TemplateIndex.build(ids, emb, thresholds={"p000001": 0.99}, default_threshold=0.5, version=3)
    matcher = Matcher(index)
    q = unit_rows(centers[[0, 1]])
    m0, m1 = matcher.match(q)
    assert isinstance(m0, Match) and m0.person_id == "p000000" and m0.threshold == 0.5 and m0.is_hit
    top = matcher.search(q[:1], k=2)[0]
    assert m0.second_score == pytest.approx(top[1][1]) and m0.margin > 0
    assert m1 is None  # p000001's own threshold (0.99) is above its score
    strict = Matcher(index, threshold=0.999)
    assert strict.match(q[:1]) == [None]  # the unit's global threshold replaces the list's default
    assert strict.match(q[1:]) == [None]
    assert matcher.version == 3


def test_no_match_for_stranger_and_empty_index() -> None:
    ids, emb, _ = _data(100, 2)
    matcher = Matcher(TemplateIndex.build(ids, emb, default_threshold=0.6))
    stranger = unit_rows(np.random.default_rng(5).standard_normal((4, 128)))
    assert matcher.match(stranger) == [None] * 4
    empty = Matcher()
    assert empty.match(stranger) == [None] * 4
    assert empty.search(stranger, k=5) == [[]] * 4
    assert empty.version == 0
    assert empty.match(unit_rows(np.ones((2, 512)))) == [None, None]  # before any list: any engine dimension


def test_bad_queries_are_refused_with_a_reason() -> None:
    matcher = Matcher(TemplateIndex.build(["a"], unit_rows(np.ones((1, 128)))))
    with pytest.raises(MatcherError, match=r"shape \(N, 128\)"):
        matcher.match(np.ones((2, 64), np.float32))
    with pytest.raises(MatcherError, match="unit-length"):
        matcher.match(np.ones((1, 128), np.float32))
    with pytest.raises(MatcherError, match="NaN"):
        matcher.match(np.full((1, 128), np.nan, np.float32))
    with pytest.raises(MatcherError, match="one id per row"):
        TemplateIndex.build(["a", "b"], unit_rows(np.ones((1, 128))))
    with pytest.raises(MatcherError, match="person id"):
        TemplateIndex.build([""], unit_rows(np.ones((1, 128))))


def test_with_changes_removes_replaces_and_adds() -> None:
    ids, emb, centers = _data(200, 3, seed=7)
    index = TemplateIndex.build(ids, emb, thresholds={"p000005": 0.9}, version=1, model_id="m")
    new_c = person_centers(3, seed=77)
    add = samples_of(new_c, 2, seed=78)
    replaced = samples_of(centers[5:6], 1, seed=79)  # p000005 now has one new template, no override
    nxt = index.with_changes(
        remove=["p000000", "p000001"],
        add_person_ids=["n0", "n0", "n1", "n1", "n2", "n2", "p000005"],
        add_embeddings=np.concatenate([add, replaced]),
        thresholds={"n1": 0.7, "p000005": None},
        version=2,
    )
    assert index.n_templates == 600 and "p000000" in index  # the old index is untouched
    assert nxt.version == 2 and nxt.model_id == "m"
    assert "p000000" not in nxt and "p000001" not in nxt
    assert nxt.n_persons == 200 - 2 + 3 and nxt.n_templates == 600 - 6 - 3 + 7
    assert nxt.templates_of("p000005").shape == (1, 128)
    assert nxt.threshold_for("n1") == 0.7 and nxt.threshold_for("p000005") == nxt.default_threshold
    # The result is the index a fresh build would give (up to the fresh build's own center and steps).
    fresh_ids = [i for i in ids if i not in ("p000000", "p000001", "p000005")] + [
        "n0",
        "n0",
        "n1",
        "n1",
        "n2",
        "n2",
        "p000005",
    ]
    keep = [i not in ("p000000", "p000001", "p000005") for i in ids]
    fresh = TemplateIndex.build(fresh_ids, np.concatenate([emb[keep], add, replaced]))
    q = _queries(np.concatenate([centers, new_c]), 10, 5)
    got, want = Matcher(nxt).search(q, k=3), Matcher(fresh).search(q, k=3)
    assert [[p for p, _ in r] for r in got] == [[p for p, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=5e-5)


def test_with_changes_widens_range_when_a_template_needs_it() -> None:
    ids, emb, _ = _data(50, 2)
    index = TemplateIndex.build(ids, emb, version=1)
    spike = np.zeros((1, 128), np.float32)
    spike[0, 3] = 1.0
    nxt = index.with_changes(add_person_ids=["spike"], add_embeddings=spike, version=2)
    (m,) = Matcher(nxt).match(spike)
    assert m is not None and m.person_id == "spike" and m.score == pytest.approx(1.0, abs=1e-5)
    assert np.abs(nxt.dequantize(np.arange(100)) - emb).max() < 3e-5  # one more rounding at the wider step


def test_swap_under_load_drops_no_calls_and_removal_is_immediate() -> None:
    ids, emb, centers = _data(300, 2, seed=11)
    keeper_q = unit_rows(centers[[7]])
    leaver_q = unit_rows(centers[[8]])
    matcher = Matcher(TemplateIndex.build(ids, emb, version=1, default_threshold=0.5))
    assert matcher.match(leaver_q)[0].person_id == "p000008"

    stop = threading.Event()
    calls, misses, errors = [0], [0], []

    def reader() -> None:
        while not stop.is_set():
            try:
                m = matcher.match(keeper_q)[0]
                calls[0] += 1
                if m is None or m.person_id != "p000007":
                    misses[0] += 1
            except Exception as exc:  # pragma: no cover - the assertion below reports it
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    index = matcher.index
    for v in range(2, 12):
        index = index.with_changes(remove=["p000008"] if v == 2 else [f"p{100 + v:06d}"], version=v)
        matcher.swap(index)
        if v == 2:
            assert matcher.match(leaver_q) == [None]  # the call right after the swap already misses them
    stop.set()
    for t in threads:
        t.join()
    assert not errors and misses[0] == 0 and calls[0] > 0
    assert matcher.version == 11


def test_coarse_pass_is_exact_at_the_extremes() -> None:
    """The integer kernel itself, on the values that saturate a u8 x s8 pair sum in int16 (high
    bytes at 0 and 255, query bytes at the ends of their range): every sum must be exact."""
    from matching.matcher import _Scorer

    rng = np.random.default_rng(3)
    hi = rng.integers(0, 256, (512, 128)).astype(np.uint8)
    hi[:64], hi[64:128] = 255, 0
    hi[128:192, ::2], hi[128:192, 1::2] = 255, 0
    qq = rng.integers(-127, 128, (128, 16)).astype(np.int16)
    qq[:, :4], qq[:, 4:8] = 127, -127
    qq[::2, 8:12], qq[1::2, 8:12] = 127, -127
    got = _Scorer(threads=1).coarse(hi, np.ascontiguousarray((qq + 128).astype(np.uint8)))
    want = (hi.astype(np.int64) - 128) @ qq.astype(np.int64)
    np.testing.assert_array_equal(got, want)


def test_search_equals_brute_force_on_worst_case_templates() -> None:
    """Templates at the corners of their fixed-point range (every high byte 1 or 255) and queries
    near them (every query byte near +-127): the sums a saturating kernel clips. Each listed
    person must still come back first, as brute force says."""
    rng = np.random.default_rng(5)
    dim, n = 128, 300
    signs = rng.choice([-1.0, 1.0], size=(n, dim))
    emb = (signs / np.sqrt(dim)).astype(np.float32)
    ids = [f"p{i:04d}" for i in range(n)]
    index = TemplateIndex.build(ids, emb, version=1, model_id="m")
    q = signs[:40] + rng.normal(0, 0.05, (40, dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    got = Matcher(index).search(q, k=3)
    want = _brute_force(index, ids, q, 3)
    assert [[p for p, _ in g] for g in got] == [[p for p, _ in w] for w in want]
    assert [g[0][0] for g in got] == ids[:40]
