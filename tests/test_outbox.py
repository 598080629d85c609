"""The durable outbox on a real SQLite file: order, durability across reopen and kill -9, the size policy."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from edge.outbox import JOURNAL_RESERVE, Outbox, OutboxConfig, OutboxError
from testing.hits import make_hit, noise_jpeg
from wire import records


def record_of(hit) -> bytes:
    return records.encode_record(records.hit_record(hit, "site-a"))


def put(box: Outbox, hit) -> int | None:
    return box.put(hit.id, record_of(hit), hit.crop_jpeg)


def test_rows_come_out_in_order_and_leave_only_on_ack(tmp_path):
    # PUBACK-only (verdicts = "off"); tests/test_outbox_verdicts.py covers the wait for verdicts.
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite", verdicts="off"))
    hits = [make_hit(id=f"h{i}") for i in range(6)]
    for h in hits:
        put(box, h)
    first = box.take(4)
    assert [r.hit_id for r in first] == ["h0", "h1", "h2", "h3"]
    assert [r.hit_id for r in box.take(10)] == ["h4", "h5"]
    assert box.take(10) == []  # everything is in flight
    assert box.ack([first[1].seq, first[0].seq]) == 2
    box.release([r.seq for r in first[2:]])
    assert [r.hit_id for r in box.take(10)] == ["h2", "h3"]
    assert box.depth == 4
    assert box.counters()["sent"] == 2
    box.close()


def test_pending_rows_and_counters_survive_reopen(tmp_path):
    cfg = OutboxConfig(path=tmp_path / "o.sqlite", verdicts="off")
    box = Outbox(cfg)
    crop = noise_jpeg(3000)
    for i in range(3):
        put(box, make_hit(id=f"h{i}", crop=crop))
    box.ack([box.take(1)[0].seq])
    box.close()

    box = Outbox(cfg)
    rows = box.rows()
    assert [r.hit_id for r in rows] == ["h1", "h2"]
    assert rows[0].crop == crop
    assert box.counters()["accepted"] == 3 and box.counters()["sent"] == 1
    assert box.pending_bytes == sum(len(r.record) + len(r.crop) for r in rows)
    box.close()


def test_hits_written_survive_kill_9(tmp_path):
    path = tmp_path / "o.sqlite"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from edge.outbox import Outbox, OutboxConfig
        box = Outbox(OutboxConfig(path={str(path)!r}))
        for i in range(50):
            box.put(f"h{{i}}", b'{{"id": "h%d"}}' % i, None)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    box = Outbox(OutboxConfig(path=path))  # the lock died with the process
    assert [r.hit_id for r in box.rows()] == [f"h{i}" for i in range(50)]
    box.close()


def test_same_hit_is_not_stored_twice(tmp_path):
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite"))
    h = make_hit()
    assert put(box, h) == put(box, h)
    assert box.depth == 1
    box.close()


def test_oversized_crop_is_dropped_from_its_hit_and_counted(tmp_path):
    big = noise_jpeg(40_000)
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite", max_crop_bytes=len(big) - 1))
    put(box, make_hit(id="big", crop=big))
    put(box, make_hit(id="small", crop=noise_jpeg(2_000)))
    rows = {r.hit_id: r for r in box.rows()}
    assert rows["big"].crop is None and rows["big"].crop_dropped == "oversized"
    assert rows["small"].crop is not None and rows["small"].crop_dropped is None
    assert box.counters()["crops_dropped_oversized"] == 1
    box.close()


def test_full_outbox_drops_oldest_crops_first_then_oldest_records(tmp_path):
    crop = noise_jpeg(20_000)
    # Room for four hits with crops, not five.
    cfg = OutboxConfig(path=tmp_path / "o.sqlite", max_bytes=4 * len(crop) + len(crop) // 2, max_crop_bytes=len(crop))
    box = Outbox(cfg)
    ids = [f"h{i:03d}" for i in range(400)]
    for hid in ids[:4]:
        put(box, make_hit(id=hid, crop=crop))
    assert box.counters()["crops_dropped_full"] == 0
    put(box, make_hit(id=ids[4], crop=crop))
    rows = box.rows()
    assert rows[0].crop is None and rows[0].crop_dropped == "outbox_full"
    assert all(r.crop is not None for r in rows[1:])
    assert box.counters()["crops_dropped_full"] == 1
    assert box.pending_bytes <= cfg.max_bytes

    for hid in ids[5:]:
        put(box, make_hit(id=hid, crop=crop))
        assert box.pending_bytes <= cfg.max_bytes
    rows = box.rows()
    counters = box.counters()
    assert counters["hits_dropped_full"] > 0, "records should go once no old crop is left"
    kept = [r.hit_id for r in rows]
    # The oldest records went, the newest stayed, in order.
    assert kept == ids[len(ids) - len(kept) :]
    # Records go last: by the time one is dropped, no crop is left (the new hits' own crops included).
    with_crop = [r.crop is not None for r in rows]
    assert not any(with_crop)
    assert all(r.crop_dropped == "outbox_full" for r in rows)
    assert counters["accepted"] == len(ids)
    assert counters["hits_dropped_full"] == len(ids) - len(kept)
    # Every crop that is gone is accounted for.
    assert counters["crops_dropped_full"] == len(ids) - sum(with_crop)
    box.close()


def test_in_flight_rows_are_never_dropped(tmp_path):
    crop = noise_jpeg(20_000)
    box = Outbox(
        OutboxConfig(path=tmp_path / "o.sqlite", max_bytes=4 * len(crop) + len(crop) // 2, max_crop_bytes=len(crop))
    )
    for i in range(4):
        put(box, make_hit(id=f"h{i}", crop=crop))
    taken = box.take(2)
    for i in range(4, 12):
        put(box, make_hit(id=f"h{i}", crop=crop))
    rows = {r.hit_id: r for r in box.rows()}
    for r in taken:
        assert r.hit_id in rows and rows[r.hit_id].crop is not None
    box.close()


def test_second_process_cannot_open_the_same_outbox(tmp_path):
    cfg = OutboxConfig(path=tmp_path / "o.sqlite")
    box = Outbox(cfg)
    with pytest.raises(OutboxError, match="in use by another process"):
        Outbox(cfg)
    box.close()
    Outbox(cfg).close()


def test_a_file_that_is_not_sqlite_is_moved_aside_not_lost(tmp_path):
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(OutboxConfig(path=path))
    assert box.moved_aside is not None and box.moved_aside.read_bytes() == b"this is not a database" * 100
    assert box.lost_pending is None and box.depth == 0
    box.close()


def test_a_folder_at_the_outbox_path_gives_a_clear_error(tmp_path):
    (tmp_path / "o.sqlite").mkdir()
    with pytest.raises(OutboxError, match="outbox.path"):
        Outbox(OutboxConfig(path=tmp_path / "o.sqlite"))


def test_a_persistent_rollback_journal_full_sync_and_no_memory_mapping(tmp_path):
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite"))
    put(box, make_hit())
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "persist"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert box._db.execute("PRAGMA mmap_size").fetchone()[0] == 0
    # The journal keeps its room for the next delete; no WAL, no memory-mapped shared index.
    assert box.journal_path.stat().st_size == JOURNAL_RESERVE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.sqlite", "o.sqlite-journal", "o.sqlite.lock"]
    box.close()


def test_an_outbox_left_in_wal_mode_by_an_older_unit_keeps_its_hits(tmp_path):
    path = tmp_path / "o.sqlite"
    old = sqlite3.connect(path, isolation_level=None)
    assert old.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    old.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, hit_id TEXT NOT NULL UNIQUE, "
        "queued_at REAL NOT NULL, record BLOB NOT NULL, crop BLOB, crop_dropped TEXT, size INTEGER NOT NULL);"
        "INSERT INTO outbox(hit_id, queued_at, record, size) VALUES ('old', 1.0, x'7b7d', 2);"
    )
    old.close()
    box = Outbox(OutboxConfig(path=path))
    assert [r.hit_id for r in box.rows()] == ["old"]
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "persist"
    assert not (tmp_path / "o.sqlite-wal").exists() and not (tmp_path / "o.sqlite-shm").exists()
    box.close()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValidationError, match="max_crop_bytes"):
        OutboxConfig(path=tmp_path / "o", max_bytes=100_000, max_crop_bytes=50_000)
    with pytest.raises(ValidationError, match="max_bytes"):
        OutboxConfig(path=tmp_path / "o", max_bytes=10)
    with pytest.raises(ValidationError, match="retention"):
        OutboxConfig(path=tmp_path / "o", retention=3)
