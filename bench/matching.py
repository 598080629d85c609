"""Watchlist search benchmark: matching.matcher against FAISS's exact flat index on 1,000,000 templates.

    python bench/matching.py --json OUT.json            # 1M templates x 128-d, batches of 8, top-5

Data (testing.synthetic): 333,334 persons x 3 templates of 128-d unit vectors, clustered per person
with an anisotropic spread, carried as bundles carry them (float16 around their mean). --shape:
  engine-like  (default) faces share one direction, as with the default engine: strangers score
               about 0.97, two photos of one person about 0.985 -- crowded scores, the hard case;
  sphere       persons spread over the sphere: strangers near 0, one person's photos near 0.7.
Queries: batches of 8, half new photos of enrolled persons, half strangers (most faces a camera
sees match nobody).

Measured in one run, same data, same threads:
  * time per batch of 8, top-5 persons: Matcher.search; also Matcher.match (top person + margin);
  * FAISS IndexFlatIP.search (top-5 templates) on the same templates widened to float32;
  * top-1 agreement of the matcher's best person with the person of FAISS's best template
    (exact float32 search over the templates the unit holds), and with an exact float32 search
    over the embeddings before float16 rounding (numpy, in large batches);
  * index memory: the arrays' bytes and the process's RSS growth while building;
  * the index side of a 1,000-person delta at this size (TemplateIndex.with_changes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine, machine_summary
from matching.matcher import Matcher, TemplateIndex
from testing.synthetic import ENGINE_LIKE, person_centers, samples_of

SHAPES = {"engine-like": ENGINE_LIKE, "sphere": {"shared": 0.0, "spread": 0.55}}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def exact_top1(queries: np.ndarray, templates: np.ndarray, block: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Best template index and score per query: float32 BLAS products in blocks (untimed ground truth)."""
    best = np.full(len(queries), -1, np.int64)
    score = np.full(len(queries), -np.inf, np.float32)
    for s in range(0, len(templates), block):
        sc = queries @ templates[s : s + block].T
        i = sc.argmax(axis=1)
        v = sc[np.arange(len(queries)), i]
        better = v > score
        best[better], score[better] = i[better] + s, v[better]
    return best, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--templates", type=int, default=1_000_000)
    ap.add_argument("--per-person", type=int, default=3)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=400, help="timed batches (queries = batches x batch)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both indexes")
    ap.add_argument("--delta-persons", type=int, default=1000)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="engine-like")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    n_persons = -(-args.templates // args.per_person)
    shape = SHAPES[args.shape]
    print(
        f"generating {n_persons} persons x {args.per_person} templates of {args.dim}-d ({args.shape}) ...", flush=True
    )
    centers = person_centers(n_persons, args.dim, seed=1, shared=shape["shared"])
    original = samples_of(centers, args.per_person, seed=2, spread=shape["spread"])[: args.templates]
    person_of = np.arange(len(original)) // args.per_person
    ids = [f"case-{i:07d}" for i in person_of]
    offset = original.mean(axis=0, dtype=np.float64).astype(np.float32)
    rows16 = (original - offset).astype(np.float16)  # what a bundle carries

    gc.collect()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    index = TemplateIndex.build(ids, rows16, offset=offset, version=1, model_id="synthetic", default_threshold=0.5)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_index = rss_mb() - rss0
    matcher = Matcher(index, threads=args.threads)
    flat32 = offset + rows16.astype(np.float32)  # the templates the unit holds, in float32
    templates = flat32
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(flat32)

    rng = np.random.default_rng(3)
    nq = args.batches * args.batch
    n_gen = nq // 2
    genuine_person = rng.integers(0, n_persons, n_gen)
    queries = np.concatenate(
        [
            samples_of(centers[genuine_person], 1, seed=4, spread=shape["spread"]),
            samples_of(
                person_centers(nq - n_gen, args.dim, seed=5, shared=shape["shared"]), 1, seed=6, spread=shape["spread"]
            ),
        ]
    )
    is_genuine = np.arange(nq) < n_gen
    order = rng.permutation(nq)  # mix genuine and strangers within batches
    queries, is_genuine = queries[order], is_genuine[order]
    true_person = np.full(nq, -1)
    true_person[np.flatnonzero(is_genuine)] = genuine_person[order[is_genuine]]

    print("warming up ...", flush=True)
    for _ in range(3):
        matcher.search(queries[: args.batch], k=args.k)
        flat.search(queries[: args.batch], args.k)

    ours_s, match_s, faiss_s = [], [], []
    ours_top1 = np.empty(nq, np.int64)
    ours_score = np.empty(nq, np.float32)
    faiss_top1 = np.empty(nq, np.int64)
    faiss_score = np.empty(nq, np.float32)
    print(f"timing {args.batches} batches of {args.batch} ...", flush=True)
    for b in range(args.batches):
        q = queries[b * args.batch : (b + 1) * args.batch]
        t = time.perf_counter()
        res = matcher.search(q, k=args.k)
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        matcher.match(q)
        match_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        d, i = flat.search(q, args.k)
        faiss_s.append(time.perf_counter() - t)
        for j, row in enumerate(res):
            ours_top1[b * args.batch + j] = int(row[0][0][5:])
            ours_score[b * args.batch + j] = row[0][1]
        faiss_top1[b * args.batch : (b + 1) * args.batch] = person_of[i[:, 0]]
        faiss_score[b * args.batch : (b + 1) * args.batch] = d[:, 0]

    print("exact search over the unrounded embeddings ...", flush=True)
    orig_best, _ = exact_top1(queries, original)
    orig_top1 = person_of[orig_best]

    agree_flat = float(np.mean(ours_top1 == faiss_top1))
    agree_orig = float(np.mean(ours_top1 == orig_top1))
    score_diff = float(np.max(np.abs(ours_score - faiss_score)))

    # A delta of half removals, half new persons.
    gone = [f"case-{i:07d}" for i in rng.choice(n_persons, args.delta_persons // 2, replace=False)]
    n_new = args.delta_persons - len(gone)
    new_emb = samples_of(
        person_centers(n_new, args.dim, seed=7, shared=shape["shared"]), args.per_person, seed=8, spread=shape["spread"]
    )
    new_rows = (new_emb - offset).astype(np.float16)
    new_ids = [f"new-{i // args.per_person:07d}" for i in range(len(new_emb))]
    t = time.perf_counter()
    nxt = index.with_changes(remove=gone, add_person_ids=new_ids, add_embeddings=new_rows, add_offset=offset, version=2)
    matcher.swap(nxt)
    delta_s = time.perf_counter() - t

    def stats(xs: list[float]) -> dict:
        a = np.asarray(xs) * 1000
        return {
            "median_ms": round(float(np.median(a)), 2),
            "p90_ms": round(float(np.percentile(a, 90)), 2),
            "mean_ms": round(float(a.mean()), 2),
        }

    result = {
        "shape": args.shape,
        "templates": len(templates),
        "persons": n_persons,
        "dim": args.dim,
        "batch": args.batch,
        "k": args.k,
        "queries": nq,
        "genuine_queries": int(is_genuine.sum()),
        "threads": args.threads,
        "matcher_search": stats(ours_s),
        "matcher_match": stats(match_s),
        "faiss_flat_ip": stats(faiss_s),
        "speedup_vs_faiss_median": round(float(np.median(faiss_s) / np.median(ours_s)), 2),
        "top1_agreement_vs_faiss_flat": agree_flat,
        "top1_agreement_vs_exact_unrounded": agree_orig,
        "top1_agreement_genuine_vs_faiss": float(np.mean((ours_top1 == faiss_top1)[is_genuine])),
        "top1_agreement_strangers_vs_faiss": float(np.mean((ours_top1 == faiss_top1)[~is_genuine])),
        "top1_identity_correct_genuine": float(np.mean((ours_top1 == true_person)[is_genuine])),
        "max_top1_score_diff_vs_faiss": score_diff,
        "index_bytes": index.nbytes,
        "index_mb": round(index.nbytes / 2**20, 1),
        "index_rss_growth_mb": round(rss_index, 1),
        "faiss_flat_mb": round(flat.ntotal * args.dim * 4 / 2**20, 1),
        "index_build_s": round(build_s, 2),
        "delta_persons": args.delta_persons,
        "delta_index_swap_s": round(delta_s, 3),
        "machine": {
            **describe_machine(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "numpy": np.__version__,
            "faiss": faiss.__version__,
        },
    }
    print()
    print(machine_summary(result["machine"]))
    print(
        f"{len(templates):,} {args.shape} templates x {args.dim}-d, batch {args.batch}, top-{args.k}, {args.threads} threads, "
        f"{nq} queries ({int(is_genuine.sum())} genuine); load average {result['machine']['load_average_1_5_15']}"
    )
    print(f"{'':28} {'median ms':>10} {'p90 ms':>8} {'memory MB':>10}")
    print(
        f"{'matching.matcher search':28} {result['matcher_search']['median_ms']:>10} {result['matcher_search']['p90_ms']:>8} "
        f"{result['index_mb']:>10}"
    )
    print(
        f"{'matching.matcher match':28} {result['matcher_match']['median_ms']:>10} {result['matcher_match']['p90_ms']:>8}"
    )
    print(
        f"{'faiss IndexFlatIP':28} {result['faiss_flat_ip']['median_ms']:>10} {result['faiss_flat_ip']['p90_ms']:>8} "
        f"{result['faiss_flat_mb']:>10}"
    )
    print(
        f"speed-up {result['speedup_vs_faiss_median']}x; top-1 agreement {agree_flat:.5f} vs FAISS flat, "
        f"{agree_orig:.5f} vs exact float32 before float16 rounding; max top-1 score diff {score_diff:.2e}"
    )
    print(
        f"index build {build_s:.2f} s, RSS growth {rss_index:.0f} MB; {args.delta_persons}-person delta "
        f"(index side) {delta_s:.3f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
