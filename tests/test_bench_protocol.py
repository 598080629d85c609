"""The cross-age protocol's figures (bench/lag.py) on small hand-made cases."""

from __future__ import annotations

import numpy as np

from bench.lag import Photo, evaluate, identification, tar_at_far


def test_tar_at_far_uses_the_impostor_quantile():
    impostor = np.arange(1000, dtype=float)  # 0..999
    genuine = np.array([995.5, 998.5, 999.5, 10.0])
    tar, thr = tar_at_far(genuine, impostor, 1e-3)  # one impostor may pass: threshold at 998
    assert thr == 998
    assert tar == 0.5  # 998.5 and 999.5 pass


def test_missing_faces_count_as_misses():
    photos = [
        Photo(None, "a", False),
        Photo(None, "b", False),
        Photo(None, "a", True),
        Photo(None, "b", True),
    ]
    e = np.eye(4, dtype=np.float32)
    emb = [e[0], None, e[0], e[1]]  # b's adult photo had no face
    res = evaluate(photos, emb, lambda A, B: A @ B.T)
    assert res["rank1"] == 0.5
    assert res["genuine_pairs"] == 2


def test_identification_ranks():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.0, 0.0]])
    truth = np.array([0, 0, -1])
    r = identification(scores, truth, ranks=(1, 2))
    assert r[1] == 1 / 3
    assert r[2] == 2 / 3
