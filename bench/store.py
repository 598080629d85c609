"""How fast the hit store takes hits, SQLite beside PostgreSQL, and a probe that reads progress from
either (for bench/reporting.py's receiver-in-a-subprocess measurement).

    python bench/store.py --hits 5000 --json store.json             # SQLite, and PostgreSQL
                                                                            # in a temporary cluster
    python bench/store.py --db postgresql://bench@db/checkpoint     # one given store

Each hit carries an 8.8 kB JPEG crop, as in bench/reporting.py. Hits go in as the receiver writes
them: `add_hits` batches of `--batch` (the receiver's batch_max is 200; under a trickle of hits a
batch is one hit, so both are measured). A temporary PostgreSQL cluster needs initdb/pg_ctl
(Debian's postgresql package) and runs with fsync on, as a real one would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine, machine_summary
from central.store import HitFilter, HitStore


class StoreProbe:
    """Progress of hits tagged by person id in any store URL (read-only use)."""

    def __init__(self, url: str | Path) -> None:
        self.store = HitStore(url)

    def rows(self, tag: str) -> list[dict[str, Any]]:
        return self.store.hits(limit=None, where=HitFilter(person_id=tag), newest_first=False)

    def count(self, tag: str) -> int:
        return len(self.rows(tag))

    def latencies_ms(self, tag: str) -> list[float]:
        """received_at (receiver) - queued_at (unit) per hit, in ms."""
        return [1000.0 * (r["received_at"] - r["queued_at"]) for r in self.rows(tag)]

    def last_received_at(self, tag: str) -> float:
        return max(r["received_at"] for r in self.rows(tag))

    def close(self) -> None:
        self.store.close()


def _crop() -> bytes:
    import cv2

    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return buf.tobytes()


def _fields(i: int, tag: str) -> dict[str, Any]:
    now = time.time()
    return {
        "id": uuid.uuid4().hex,
        "site": "bench",
        "unit_id": f"unit-{i % 8}",
        "camera_id": "cam-1",
        "person_id": tag,
        "captured_at": now,
        "queued_at": now,
        "score": 0.8,
        "threshold": 0.6,
        "margin": 0.2,
        "box": [1.0, 1.0, 50.0, 60.0],
        "model_id": "bench",
        "watchlist_version": 1,
        "track_id": i,
        "crop_dropped": None,
        "v": 1,
    }


def measure(url: str | Path, hits: int, batch: int) -> dict[str, Any]:
    """Store `hits` new hits in batches of `batch`; hits/s and the per-batch commit time."""
    crop = _crop()
    store = HitStore(url)
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    commits: list[float] = []
    try:
        start = time.perf_counter()
        for i in range(0, hits, batch):
            items = [(_fields(j, tag), crop, time.time()) for j in range(i, min(hits, i + batch))]
            t0 = time.perf_counter()
            store.add_hits(items)
            commits.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        dup_start = time.perf_counter()
        store.add_hits(items)  # the last batch again: duplicates are dropped by id
        dup_s = time.perf_counter() - dup_start
    finally:
        store.close()
    ms = np.asarray(commits) * 1000
    return {
        "backend": type(store).__name__,
        "hits": hits,
        "batch": batch,
        "hits_per_s": hits / elapsed,
        "commit_ms_p50": float(np.percentile(ms, 50)),
        "commit_ms_p99": float(np.percentile(ms, 99)),
        "duplicate_batch_ms": dup_s * 1000,
        "crop_bytes": len(crop),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", action="append", default=None, help="store URL (repeatable) [temporary SQLite + PG]")
    ap.add_argument("--hits", type=int, default=5000)
    ap.add_argument("--batch", type=int, action="append", default=None, help="batch sizes [1 and 200]")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    batches = args.batch or [1, 200]
    results = []
    with tempfile.TemporaryDirectory(prefix="checkpoint-store-bench-") as tmp:
        cluster = None
        urls = args.db
        if urls is None:
            from testing.postgres import PostgresCluster, find_pg_bin

            urls = [str(Path(tmp) / "hits.sqlite")]
            bindir = find_pg_bin()
            if bindir is not None:
                # Its own top-level folder: the server's user must reach it, and tmp is private to us.
                cluster = PostgresCluster(bindir, Path(tempfile.mkdtemp(prefix="checkpoint-pg-")), fsync=True).start()
                urls.append(cluster.create_database())
            else:
                print("PostgreSQL not installed: SQLite only", file=sys.stderr)
        try:
            for url in urls:
                for batch in batches:
                    results.append(measure(url, args.hits, batch))
        finally:
            if cluster is not None:
                cluster.stop()
                shutil.rmtree(cluster.workdir, ignore_errors=True)
    print(machine_summary(describe_machine()))
    print(f"{'backend':<18} {'batch':>5} {'hits/s':>9} {'commit p50 ms':>14} {'p99 ms':>8}")
    for r in results:
        print(
            f"{r['backend']:<18} {r['batch']:>5} {r['hits_per_s']:>9.0f} {r['commit_ms_p50']:>14.2f} "
            f"{r['commit_ms_p99']:>8.2f}"
        )
    if args.json:
        machine = {**describe_machine(), "load_avg": os.getloadavg()}
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
