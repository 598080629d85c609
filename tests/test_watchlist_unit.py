"""The unit side with a real SQLite store: apply, removal, restart, expiry policy, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from matching.matcher import Matcher
from testing.synthetic import Authority, make_persons, person_centers, samples_of, unit_rows
from watchlist.format.errors import BundleRejected
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.store import UnitStore

MODEL = "synthetic:v1"
REPO = Path(__file__).resolve().parents[1]


def _list(n: int, seed: int, prefix: str = "case", per: int = 3):
    centers = person_centers(n, seed=seed)
    return make_persons([f"{prefix}-{i:05d}" for i in range(n)], per), samples_of(centers, per, seed=seed + 1), centers


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def _unit(tmp_path: Path, hq: Authority, **cfg) -> Watchlist:
    root = tmp_path / "root.pub"
    if not root.exists():
        hq.write_root(root)
    clock = cfg.pop("clock", None) or time.time
    config = WatchlistConfig(root_key=root, store=tmp_path / "wl.db", **cfg)
    wl = Watchlist(config, Matcher(), MODEL, clock=clock)
    wl.start()
    return wl


def test_full_then_delta_removes_and_forgets(tmp_path: Path) -> None:
    hq = Authority(model_id=MODEL, threshold=0.5)
    wl = _unit(tmp_path, hq)
    persons, emb, centers = _list(50, seed=1)
    assert wl.offer(hq.bundle(1, persons, emb), source="t") == 1
    found = unit_rows(centers[[7]])
    assert wl.matcher.match(found)[0].person_id == "case-00007"

    new_persons, new_emb, new_centers = _list(2, seed=9, prefix="new")
    changed = make_persons(["case-00003"], 1)
    changed_emb = samples_of(new_centers[[0]], 1, seed=99)
    delta = hq.bundle(
        2, new_persons + changed, np.concatenate([new_emb, changed_emb]), kind="delta", base=1, removed=("case-00007",)
    )
    assert wl.offer(delta, source="t") == 2
    assert wl.matcher.match(found) == [None]  # stops matching as soon as the delta is applied
    assert wl.matcher.match(unit_rows(new_centers[[1]]))[0].person_id == "new-00001"
    st = wl.status()
    assert (st["version"], st["persons"], st["templates"]) == (2, 51, 150 - 3 - 3 + 6 + 1)

    store = UnitStore(tmp_path / "wl.db")
    assert "case-00007" not in store.person_ids()
    assert store.counts() == (51, 151)
    store.close()
    # The removed person's embeddings are gone from the file itself, not just unlinked.
    raw = (tmp_path / "wl.db").read_bytes()
    for row in emb[21:24].astype("<f2"):
        assert row.tobytes()[:64] not in raw
    assert emb[0].astype("<f2").tobytes()[:64] in raw  # (and the check can find one that is there)
    assert not (tmp_path / "wl.db-journal").exists()
    wl.close()


def test_restart_loads_the_applied_list(tmp_path: Path) -> None:
    hq = Authority(model_id=MODEL, threshold=0.5)
    wl = _unit(tmp_path, hq)
    persons, emb, centers = _list(40, seed=2)
    wl.offer(hq.bundle(3, persons, emb), source="t")
    q = unit_rows(centers[:10])
    before = wl.matcher.search(q, k=3)
    wl.close()
    again = _unit(tmp_path, hq)
    assert again.matcher.version == 3
    assert again.matcher.search(q, k=3) == before
    again.close()


def test_expired_list_warn_keeps_matching_stop_stops(tmp_path: Path) -> None:
    hq = Authority(model_id=MODEL, threshold=0.5)
    persons, emb, centers = _list(10, seed=3)
    q = unit_rows(centers[[2]])
    for policy, matching in (("warn", True), ("stop", False)):
        d = tmp_path / policy
        d.mkdir()
        clock = Clock()
        wl = _unit(d, hq, on_expired=policy, clock=clock)
        wl.offer(hq.bundle(1, persons, emb, valid_for_s=3600), source="t")
        assert wl.matcher.match(q)[0] is not None
        clock.t += 7200
        wl.tick()
        st = wl.status()
        assert st["expired"] is True and st["matching"] is matching
        assert (wl.matcher.match(q)[0] is not None) is matching
        # A fresh bundle (an empty delta is enough) lifts the policy.
        wl.offer(
            hq.bundle(2, (), np.zeros((0, 128), np.float32), kind="delta", base=1, created_at=int(clock.t)), source="t"
        )
        assert wl.status()["expired"] is False and wl.matcher.match(q)[0] is not None
        wl.close()


def test_list_of_another_model_is_not_matched_after_an_engine_change(tmp_path: Path) -> None:
    old_hq = Authority(model_id="old-model:v1", threshold=0.5)
    persons, emb, centers = _list(10, seed=4)
    config = WatchlistConfig(root_key=old_hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db")
    wl = Watchlist(config, Matcher(), "old-model:v1")
    wl.start()
    wl.offer(old_hq.bundle(1, persons, emb), source="t")
    wl.close()
    wl = Watchlist(config, Matcher(), MODEL)  # the unit's engine was upgraded
    wl.start()
    assert wl.status()["halted"] and wl.matcher.match(unit_rows(centers[[1]])) == [None]
    new_hq = Authority(model_id=MODEL, threshold=0.5, root=old_hq.root, signing=old_hq.signing, keyset=old_hq.keyset)
    wl.offer(new_hq.bundle(2, persons, emb), source="t")
    assert wl.status()["halted"] is None and wl.matcher.match(unit_rows(centers[[1]]))[0] is not None
    wl.close()


def test_list_applied_by_another_process_is_picked_up(tmp_path: Path) -> None:
    hq = Authority(model_id=MODEL, threshold=0.5)
    wl = _unit(tmp_path, hq)
    persons, emb, centers = _list(10, seed=5)
    bundle = tmp_path / "v4.cpwl"
    bundle.write_bytes(hq.bundle(4, persons, emb))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "watchlist",
            "apply",
            str(bundle),
            "--store",
            str(tmp_path / "wl.db"),
            "--root-key",
            str(tmp_path / "root.pub"),
            "--model-id",
            MODEL,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "version 4" in out.stdout
    assert wl.matcher.version == 0
    wl.tick()
    assert wl.matcher.version == 4 and wl.matcher.match(unit_rows(centers[[0]]))[0].person_id == "case-00000"
    wl.close()


# Applies the bundle with SQLite's statement trace on. On reaching `stop` (the n-th template insert,
# or the COMMIT after the inserts), it says "at <stop>" and holds there until the test's SIGKILL, so
# the kill lands at that statement whatever the machine's speed; "commit running" says so at the COMMIT
# and goes on, so the kill lands during or after the commit. After the apply it says "applied" and
# waits for the kill too.
_CHILD = textwrap.dedent("""
    import signal, sys
    from pathlib import Path
    from matching.matcher import Matcher
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    store, root, bundle, stop = sys.argv[1:5]
    wl = Watchlist(WatchlistConfig(root_key=root, store=store), Matcher(), "synthetic:v1")
    wl.start()
    inserts = 0
    def trace(stmt):
        global inserts
        if stmt.startswith("INSERT INTO templates"):
            inserts += 1
            at = f"insert {inserts}"
        elif stmt == "COMMIT" and inserts:
            at = "commit"
        else:
            return
        if stop in (at, at + " running"):
            print("at", stop, flush=True)
            if stop == at:
                signal.pause()
    wl.store.db.conn.set_trace_callback(trace)
    wl.offer(Path(bundle).read_bytes(), source="child")
    print("applied", flush=True)
    signal.pause()
""")


def _store_content(path: Path) -> tuple[int, frozenset[str], int]:
    s = UnitStore(path)
    try:
        persons, templates = s.counts()
        return s.state().version, frozenset(s.person_ids()), templates
    finally:
        s.close()


def test_sigkill_during_apply_leaves_old_or_new_never_a_mix(tmp_path: Path) -> None:
    hq = Authority(model_id=MODEL, threshold=0.5)
    root = hq.write_root(tmp_path / "root.pub")
    old_p, old_e, _ = _list(300, seed=6, prefix="old")
    new_p, new_e, _ = _list(3000, seed=7, prefix="new")
    bundle = tmp_path / "v2.cpwl"
    bundle.write_bytes(hq.bundle(2, new_p, new_e))
    old = (1, frozenset(p.person_id for p in old_p), 900)
    new = (2, frozenset(p.person_id for p in new_p), 9000)

    def fresh_store() -> Path:
        path = tmp_path / f"wl-{time.monotonic_ns()}.db"
        wl = Watchlist(WatchlistConfig(root_key=root, store=path), Matcher(), MODEL)
        wl.start()
        wl.offer(hq.bundle(1, old_p, old_e), source="setup")
        wl.close()
        return path

    def killed_at(stop: str) -> tuple[Path, tuple[int, frozenset[str], int]]:
        path = fresh_store()
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(root), str(bundle), stop],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            said = child.stdout.readline().strip()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            child.stdout.close()
        assert said == ("applied" if stop == "applied" else f"at {stop}"), f"the child never reached {stop!r}"
        return path, _store_content(path)

    # Killed before the commit, at the first, a middle and the last template, and just before the
    # COMMIT runs: the old list, whole. After the apply: the new list, whole.
    for stop in ("insert 1", "insert 4500", "insert 9000", "commit"):
        path, content = killed_at(stop)
        assert content == old, f"killed at {stop}: version {content[0]}, {content[2]} templates"
    path, content = killed_at("applied")
    assert content == new
    # Killed while the commit writes: one list or the other, never a mix.
    path, content = killed_at("commit running")
    assert content in (old, new), f"mixed store after a kill during the commit: version {content[0]}"

    # And a unit restarted on a crashed store runs the list the store holds.
    wl = Watchlist(WatchlistConfig(root_key=root, store=path), Matcher(), MODEL)
    wl.start()
    assert wl.matcher.version == content[0] and wl.matcher.index.n_templates == content[2]
    wl.close()
    assert os.path.exists(path)


def test_a_held_list_of_another_size_is_named_matches_nothing_and_a_full_bundle_replaces_it(tmp_path: Path) -> None:
    """Issue 20, item 4: a signed list of the wrong size, applied where the engine's size was not known
    (`edge watchlist apply --config`, then `watchlist apply`, before it passed it), blinded the unit and
    then blocked the fix."""
    hq = Authority(model_id=MODEL, dim=64, threshold=0.5)
    persons, emb, centers = _list(3, seed=5)
    emb64 = samples_of(person_centers(3, dim=64, seed=5), 3, seed=6)
    blind = _unit(tmp_path, hq)  # no embedding_dim: as `edge watchlist apply` without the engine's size
    assert blind.offer(hq.bundle(1, persons, emb64)) == 1
    blind.close()

    wl = Watchlist(
        WatchlistConfig(root_key=tmp_path / "root.pub", store=tmp_path / "wl.db"), Matcher(), MODEL, embedding_dim=128
    )
    wl.start()
    st = wl.status()
    assert st["version"] == 1 and not st["matching"]
    assert "64-d" in st["halted"] and "128-d" in st["halted"] and "full bundle" in st["halted"]
    # Faces of the engine's size meet an empty index of that size: no match, and no failure per face.
    probe = unit_rows(person_centers(1, dim=128, seed=5))
    assert wl.matcher.match(probe) == [None]

    # A delta cannot change a list of another size; a full bundle of the engine's size replaces it.
    hq.dim = 128
    with pytest.raises(BundleRejected) as exc:
        wl.offer(hq.bundle(2, persons[:1], emb[:3], kind="delta", base=1))
    assert exc.value.reason == "wrong_dimension" and "send a full bundle" in exc.value.message
    assert wl.offer(hq.bundle(2, persons, emb)) == 2
    st = wl.status()
    assert st["halted"] is None and st["matching"]
    assert wl.matcher.match(unit_rows(centers[[0]]))[0].person_id == "case-00000"
    wl.close()
