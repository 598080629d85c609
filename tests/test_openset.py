"""The open-set benchmark's metric (FNIR at FPIR) on score matrices with known answers, and a run on lag-dev."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.lag import Photo
from bench.openset import (
    DistractorModel,
    Protocol,
    first_photo_only,
    main,
    mean_templates,
    open_set_rates,
    person_matrix,
)

NEG = -np.inf


def _stranger_rows(n: int = 100) -> np.ndarray:
    """n strangers whose best scores are 1/n, 2/n, ... 1 (on person 0; the other column is low)."""
    best = np.arange(1, n + 1) / n
    return np.stack([best, np.full(n, -1.0)], axis=1)


def test_threshold_is_set_by_the_strangers_and_fnir_counts_misses() -> None:
    mated = np.array(
        [
            [0.95, 0.10],  # person 0 at 0.95: above the threshold 0.90, ranked first -> found
            [0.85, 0.10],  # below the threshold -> missed
            [0.92, 0.93],  # above the threshold, but another person ranks first -> missed
            [0.10, 0.99],  # person 1 at 0.99, first -> found
        ]
    )
    truth = np.array([0, 0, 0, 1] + [-1] * 100)
    r = open_set_rates(np.vstack([mated, _stranger_rows()]), truth, fpirs=(0.1, 0.01))
    assert r[0.1]["threshold"] == pytest.approx(0.90)
    assert r[0.1]["fpir_measured"] == pytest.approx(0.10)
    assert r[0.1]["fnir"] == pytest.approx(2 / 4)
    # FPIR 0.01: one stranger may alert, threshold 0.99; nobody is above it.
    assert r[0.01]["threshold"] == pytest.approx(0.99)
    assert r[0.01]["fnir"] == pytest.approx(1.0)


def test_perfect_separation_misses_nobody() -> None:
    rng = np.random.default_rng(0)
    n = 30
    mated = np.full((n, n), 0.2) + 0.01 * rng.random((n, n))
    mated[np.arange(n), np.arange(n)] = 0.9
    strangers = 0.5 * rng.random((200, n))
    truth = np.concatenate([np.arange(n), np.full(200, -1)])
    r = open_set_rates(np.vstack([mated, strangers]), truth)
    assert all(v["fnir"] == 0.0 for v in r.values())


def test_a_face_not_found_is_a_miss_and_never_a_false_alert() -> None:
    mated = np.array([[NEG, NEG], [0.95, 0.1]])
    strangers = np.vstack([np.full((10, 2), NEG), _stranger_rows(90)])
    truth = np.array([0, 0] + [-1] * 100)
    r = open_set_rates(np.vstack([mated, strangers]), truth, fpirs=(0.1,))
    # 100 stranger probes, 10 allowed to alert: the 11th best of the 90 found faces.
    assert r[0.1]["threshold"] == pytest.approx(80 / 90)
    assert r[0.1]["fnir"] == pytest.approx(1 / 2)


def test_extra_distractors_raise_the_threshold_and_can_outrank_the_mate() -> None:
    mated = np.array([[0.95, 0.1], [0.97, 0.1]])
    truth = np.array([0, 0] + [-1] * 100)
    scores = np.vstack([mated, _stranger_rows()])
    plain = open_set_rates(scores, truth, fpirs=(0.1,))[0.1]
    extra = np.full(102, -np.inf)
    extra[0] = 0.96  # a distractor template beats the first probe's own person
    extra[2:] = 0.935  # and every stranger now reaches 0.935
    more = open_set_rates(scores, truth, fpirs=(0.1,), extra_max=extra)[0.1]
    assert plain["fnir"] == 0.0
    assert more["threshold"] > plain["threshold"]
    assert more["fnir"] == pytest.approx(0.5)


def test_one_kind_of_probe_alone_is_refused() -> None:
    with pytest.raises(ValueError, match="both"):
        open_set_rates(np.zeros((3, 2)), np.array([0, 1, 0]))


def test_person_scores_are_the_best_template_and_mean_templates_are_unit_length() -> None:
    S = np.array([[0.1, 0.7, 0.3], [0.5, NEG, 0.2]])
    P = person_matrix(S, np.array([0, 0, 2]), 3)
    assert P.tolist() == [[0.7, NEG, 0.3], [0.5, NEG, 0.2]]
    Y = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan]])
    T = mean_templates(Y, np.array([0, 0, 1]), 2)
    assert np.allclose(T[0], [2**-0.5, 2**-0.5]) and np.isnan(T[1]).all()
    keep = first_photo_only(np.array([0, 0, 1, 1]), np.array([False, True, True, True]))
    assert keep.tolist() == [False, True, True, False]


def _photos(n_ids: int) -> list[Photo]:
    from pathlib import Path

    out = []
    for i in range(n_ids):
        out += [Photo(Path(f"{i}/a.png"), f"id{i:03d}", False), Photo(Path(f"{i}/y/b.png"), f"id{i:03d}", True)]
    return out


def test_splits_enrol_half_the_identities_reproducibly() -> None:
    a, b = Protocol(_photos(41), splits=5), Protocol(_photos(41), splits=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.splits, b.splits))
    assert all(len(s) == 20 and len(set(s)) == 20 for s in a.splits)
    assert len({tuple(sorted(s)) for s in a.splits}) == 5
    col, truth = a.split_truth(a.splits[0])
    assert (truth >= 0).sum() == 20 and (truth == -1).sum() == 21


def test_synthetic_distractors_follow_each_probes_stranger_scores() -> None:
    rng = np.random.default_rng(3)
    proto = Protocol(_photos(400), splits=1)
    # Probe i's stranger scores centre on its own level: some faces look like many people.
    level = np.linspace(0.90, 0.96, len(proto.adult))
    S = level[:, None] + 0.01 * rng.standard_normal((len(proto.adult), len(proto.young)))
    model = DistractorModel(S, proto)
    one = np.stack([model.best_of(1) for _ in range(200)])
    assert np.allclose(one.mean(axis=0), level, atol=0.003)
    assert one.std(axis=0).mean() == pytest.approx(0.01, rel=0.1)
    means = [model.best_of(k).mean() for k in (1, 100, 10_000)]
    assert means[0] < means[1] < means[2]
    assert np.all(model.best_of(0) == -np.inf)


@pytest.mark.data
def test_openset_bench_on_lag_dev(lag_dir, tmp_path) -> None:
    out = tmp_path / "openset.json"
    assert main(["--data", str(lag_dir), "--limit", "60", "--splits", "3", "--no-peer", "--no-levers",
                 "--json", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert set(r["fnir_at_fpir"]) == {"0.01", "0.03", "0.1"}
    assert r["fnir_at_fpir"]["0.1"] <= r["fnir_at_fpir"]["0.01"] <= 1.0
    assert set(r["ours_flip"]["fnir_at_fpir"]) == {"0.01", "0.03", "0.1"}
    # More distractors on the list can only make FNIR at a fixed FPIR worse (up to sampling noise).
    fnir = [v["fnir_at_fpir_0.01"] for v in r["scaling"]["list"].values()]
    assert fnir[-1] >= fnir[0] - 0.02
