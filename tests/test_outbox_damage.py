"""The outbox when its file is deleted, replaced or corrupt: it fails loudly or starts afresh, never silently."""

from __future__ import annotations

import logging
import os
import sqlite3

import pytest

from edge.outbox import Outbox, OutboxConfig, OutboxError, OutboxGone
from testing.hits import make_hit, noise_jpeg
from wire import records


def put(box: Outbox, hit) -> int | None:
    return box.put(hit.id, records.encode_record(records.hit_record(hit, "site-a")), hit.crop_jpeg)


def test_deleting_the_outbox_file_stops_accepting_hits(tmp_path):
    path = tmp_path / "o.sqlite"
    box = Outbox(OutboxConfig(path=path))
    put(box, make_hit(id="before"))
    path.unlink()
    with pytest.raises(OutboxGone, match="was deleted"):
        put(box, make_hit(id="after"))
    assert box.gone is not None
    with pytest.raises(OutboxGone):  # and it stays refused: no hit goes into the deleted file
        put(box, make_hit(id="later"))
    with pytest.raises(OutboxGone):
        box.ack([1])
    box.close()


def test_a_replaced_outbox_file_is_noticed(tmp_path):
    path = tmp_path / "o.sqlite"
    box = Outbox(OutboxConfig(path=path))
    put(box, make_hit(id="a"))
    os.replace(path, tmp_path / "elsewhere.sqlite")
    sqlite3.connect(path).close()  # another (empty) file at the same path
    with pytest.raises(OutboxGone, match="replaced"):
        put(box, make_hit(id="b"))
    box.close()


def test_deleting_the_lock_file_stops_this_outbox_before_a_second_one_shares_the_path(tmp_path):
    cfg = OutboxConfig(path=tmp_path / "o.sqlite")
    box = Outbox(cfg)
    put(box, make_hit(id="a"))
    os.unlink(str(cfg.path) + ".lock")
    with pytest.raises(OutboxGone, match="lock file"):
        put(box, make_hit(id="b"))
    box.close()


def _filled(path, n: int = 40) -> None:
    box = Outbox(OutboxConfig(path=path))
    for i in range(n):
        h = make_hit(id=f"h{i}")
        box.put(h.id, records.encode_record(records.hit_record(h, "site-a")), noise_jpeg(64, seed=i))
    box.close()


def test_a_corrupt_outbox_is_moved_aside_and_a_new_one_started(tmp_path, caplog):
    path = tmp_path / "o.sqlite"
    _filled(path)
    page = 4096
    size = path.stat().st_size
    assert size >= 6 * page
    with open(path, "r+b") as f:  # the header page stays; table and index pages become garbage
        for p in range(2, size // page, 2):
            f.seek(p * page)
            f.write(os.urandom(page))
    with caplog.at_level(logging.ERROR, logger="edge.outbox"):
        box = Outbox(OutboxConfig(path=path))
    try:
        assert box.moved_aside is not None and box.moved_aside.name.startswith("o.sqlite.corrupt-")
        assert box.moved_aside.stat().st_size == size
        assert box.depth == 0
        put(box, make_hit(id="new"))
        assert [r.hit_id for r in box.rows()] == ["new"]
        line = next(r.getMessage() for r in caplog.records if "corrupt" in r.getMessage())
        assert str(box.moved_aside) in line and "pending hits" in line and "may be lost" in line
    finally:
        box.close()


def test_a_corrupt_outbox_reports_how_many_pending_hits_it_counted(tmp_path, caplog):
    path = tmp_path / "o.sqlite"
    _filled(path, n=40)
    # Damage a page of crops only: the row count is still readable, the integrity check fails.
    con = sqlite3.connect(path)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'outbox'").fetchone()[0]
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    n_pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    victim = n_pages  # the last page: overflow data of the last crops
    assert victim != root
    with open(path, "r+b") as f:
        f.seek((victim - 1) * page_size)
        f.write(b"\xff" * page_size)
    with caplog.at_level(logging.ERROR, logger="edge.outbox"):
        box = Outbox(OutboxConfig(path=path))
    try:
        assert box.moved_aside is not None
        assert box.lost_pending == 40
        assert any("40 pending hits" in r.getMessage() for r in caplog.records)
    finally:
        box.close()


def test_an_unreadable_outbox_is_not_moved_aside(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file: permissions cannot make the outbox unreadable")
    path = tmp_path / "o.sqlite"
    _filled(path, n=2)
    path.chmod(0)
    try:
        with pytest.raises(OutboxError, match="cannot open"):
            Outbox(OutboxConfig(path=path))
        assert path.exists()
    finally:
        path.chmod(0o600)
