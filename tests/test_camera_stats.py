"""A camera's running figures under the threads that share them (issue 20, item 7: the detector and
embedder threads updated `CameraStats` without a lock while the heartbeat read it)."""

from __future__ import annotations

import sys
import threading

from edge.stats import CameraStats

ROUNDS = 20000


def test_figures_added_from_several_threads_are_all_kept_and_read_whole() -> None:
    stats = CameraStats()
    seen: list[dict] = []
    done = threading.Event()

    def detector() -> None:
        for _ in range(ROUNDS):
            stats.count(frames_sampled=1, faces=2)
            stats.searched(True, 1.0)
            stats.analysed(0.1, 0.0)

    def embedder() -> None:
        for i in range(ROUNDS):
            stats.count(embedded=1, matched=1)
            stats.hit(0.2)
            stats.failed(f"error {i}")

    def heartbeat() -> None:
        while not done.is_set():
            seen.append(stats.snapshot(0.0))

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows: races show, if any
    try:
        reader = threading.Thread(target=heartbeat)
        reader.start()
        workers = [threading.Thread(target=f) for f in (detector, detector, embedder, embedder)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done.set()
        reader.join()
    finally:
        sys.setswitchinterval(previous)
    end = stats.snapshot(0.0)
    assert (end["frames_sampled"], end["faces"], end["frames_full"]) == (2 * ROUNDS, 4 * ROUNDS, 2 * ROUNDS)
    assert (end["frames_analysed"], end["embedded"], end["matched"]) == (2 * ROUNDS, 2 * ROUNDS, 2 * ROUNDS)
    assert (end["hits"], end["errors"]) == (2 * ROUNDS, 2 * ROUNDS)
    assert end["last_error"].startswith("error ")
    assert seen, "the heartbeat read no figures while the threads ran"
    # Each snapshot is taken at one moment: a frame's figures, added together, are read together.
    assert all(s["searched_share"] in (None, 1.0) for s in seen)
    assert all(s["faces"] == 2 * s["frames_sampled"] for s in seen)
