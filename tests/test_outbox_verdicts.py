"""The outbox keeps a hit the broker acknowledged until the centre's verdict (issue 19, item 2): stored
and duplicate delete it, refused keeps it with the reason under a limit, overdue ones go out again
(with a growing wait), an outbox whose receivers never answer falls back to the broker's PUBACK, and
hits awaiting a verdict are the first to make room. edge/outbox/, no broker."""

from __future__ import annotations

import logging
import sqlite3
import time

import pytest

from edge.outbox import Outbox, OutboxConfig
from testing.broker import wait_for
from testing.hits import make_hit, noise_jpeg
from wire import records
from wire.records import Verdict


def put(box: Outbox, hit) -> int | None:
    return box.put(hit.id, records.encode_record(records.hit_record(hit, "site-a")), hit.crop_jpeg)


def sent(box: Outbox, n: int) -> list:
    """Take `n` rows and have the broker acknowledge them."""
    rows = box.take(n)
    box.ack([r.seq for r in rows])
    return rows


def test_an_acknowledged_hit_waits_for_its_verdict_across_a_restart(tmp_path, caplog):
    cfg = OutboxConfig(path=tmp_path / "o.sqlite")
    box = Outbox(cfg)
    for i in range(4):
        put(box, make_hit(id=f"h{i}"))
    rows = sent(box, 4)
    assert box.depth == 4 and box.awaiting == 4 and box.unsent == 0, "the broker's PUBACK deletes nothing"
    assert box.take(10) == [], "a hit awaiting its verdict is not sent again before it is overdue"
    box.close()

    box = Outbox(cfg)
    assert [r.state for r in box.rows()] == ["awaiting_verdict"] * 4
    with caplog.at_level(logging.ERROR, logger="edge.outbox"):
        outcome = box.apply_verdicts(
            [
                Verdict("h0", "stored"),
                Verdict("h1", "duplicate"),
                Verdict("h2", "refused", "unsigned", "signature unsigned on a record of site-a/unit-1"),
                Verdict("never-held", "stored"),
            ]
        )
    assert (outcome.deleted, outcome.quarantined, outcome.ignored) == (2, 1, 1)
    kept = {r.hit_id: r for r in box.rows()}
    assert set(kept) == {"h2", "h3"}
    assert (kept["h2"].state, kept["h2"].reason) == ("quarantined", "unsigned")
    assert "site-a/unit-1" in kept["h2"].error
    assert any(
        r.levelno == logging.ERROR and "h2" in r.getMessage() and "unsigned" in r.getMessage() for r in caplog.records
    )
    stats = box.stats()
    assert stats["quarantined_kept"] == 1 and stats["awaiting_verdict"] == 1 and stats["pending"] == 1
    assert (stats["verdicts_stored"], stats["verdicts_duplicate"], stats["quarantined"], stats["verdicts_ignored"]) == (
        1,
        1,
        1,
        1,
    )
    assert "unsigned" in box.refusal and "signing_key" in box.refusal
    # A refused hit is not sent again, and a later word on it changes nothing.
    assert box.apply_verdicts([Verdict("h2", "stored")]).ignored == 1
    assert [r.hit_id for r in box.rows()] == ["h2", "h3"]
    box.close()
    box = Outbox(cfg)
    assert box.quarantined == 1 and "h2: unsigned" in box.refusal, "the refusal survives a restart"
    box.close()
    assert len(rows) == 4


def test_refused_hits_are_kept_up_to_quarantine_max(tmp_path):
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite", quarantine_max=2))
    for i in range(5):
        put(box, make_hit(id=f"h{i}"))
    sent(box, 5)
    box.apply_verdicts([Verdict(f"h{i}", "refused", "protocol", "bad") for i in range(3)])
    box.apply_verdicts([Verdict("h3", "refused", "store", "the store refused it")])
    assert [(r.hit_id, r.state) for r in box.rows()] == [
        ("h2", "quarantined"),
        ("h3", "quarantined"),
        ("h4", "awaiting_verdict"),
    ]
    assert box.counters()["quarantined"] == 4 and box.counters()["quarantined_dropped"] == 2
    assert box.quarantined == 2 and box.depth == 3
    box.close()


def test_overdue_hits_go_out_again_with_a_growing_wait_once_verdicts_are_expected(tmp_path):
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite", verdicts="require", verdict_timeout_s=0.2))
    put(box, make_hit(id="h0"))
    sent(box, 1)
    first = time.monotonic()
    again = wait_for(lambda: box.take(5), 5, "the overdue hit handed out again")
    waited = time.monotonic() - first
    assert [r.hit_id for r in again] == ["h0"] and waited >= 0.2
    box.ack([again[0].seq])
    assert box.counters()["resent"] == 1 and box.counters()["sent"] == 1, "sent counts a hit once"
    second = time.monotonic()
    wait_for(lambda: box.take(5), 5, "the hit handed out a third time")
    assert time.monotonic() - second >= 0.4, "the wait doubles with each resend"
    box.close()


def test_with_receivers_that_never_answer_auto_falls_back_to_the_pubacks(tmp_path, caplog):
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite", verdict_timeout_s=0.2))
    for i in range(3):
        put(box, make_hit(id=f"h{i}"))
    sent(box, 3)
    assert box.expire() == 0 and box.depth == 3, "not before the timeout"
    with caplog.at_level(logging.WARNING, logger="edge.outbox"):
        wait_for(lambda: box.expire() or box.depth == 0, 5, "the unanswered hits deleted")
    assert box.depth == 0 and box.counters()["unconfirmed"] == 3
    assert sum("older than verdicts" in r.getMessage() for r in caplog.records) == 1
    # The first verdict switches the outbox to waiting for verdicts for good.
    put(box, make_hit(id="h3"))
    put(box, make_hit(id="h4"))
    sent(box, 2)
    box.apply_verdicts([Verdict("h3", "stored")])
    assert box.expects_verdicts
    again = wait_for(lambda: box.take(5), 5, "h4 handed out again once overdue")
    assert [r.hit_id for r in again] == ["h4"], "sent again, not expired"
    assert box.expire() == 0 and box.depth == 1 and box.counters()["unconfirmed"] == 3
    box.close()


def test_off_deletes_on_the_pubacks_and_counts_them_unconfirmed(tmp_path):
    box = Outbox(OutboxConfig(path=tmp_path / "o.sqlite", verdicts="off"))
    put(box, make_hit(id="h0"))
    sent(box, 1)
    assert box.depth == 0 and box.counters()["unconfirmed"] == box.counters()["sent"] == 1
    box.close()


def test_a_full_outbox_drops_hits_awaiting_a_verdict_then_refused_ones_before_any_pending_crop(tmp_path):
    crop = noise_jpeg(20_000)
    # Room for six hits with their crops (a record is about 400 bytes).
    cfg = OutboxConfig(path=tmp_path / "o.sqlite", max_bytes=6 * (len(crop) + 1000), max_crop_bytes=len(crop))
    box = Outbox(cfg)
    for hid in ("a0", "a1", "q0", "q1"):
        put(box, make_hit(id=hid, crop=crop))
    sent(box, 4)
    box.apply_verdicts([Verdict("q0", "refused", "unsigned", "x"), Verdict("q1", "refused", "unsigned", "y")])
    put(box, make_hit(id="p0", crop=crop))
    put(box, make_hit(id="p1", crop=crop))  # fills max_bytes: the next ones make room
    put(box, make_hit(id="p2", crop=crop))
    assert [r.hit_id for r in box.rows()] == ["a1", "q0", "q1", "p0", "p1", "p2"], "the oldest awaiting hit first"
    put(box, make_hit(id="p3", crop=crop))
    put(box, make_hit(id="p4", crop=crop))
    assert [r.hit_id for r in box.rows()] == ["q1", "p0", "p1", "p2", "p3", "p4"], "then the oldest refused one"
    counters = box.counters()
    assert counters["awaiting_dropped"] == 2 and counters["quarantined_dropped"] == 1
    assert counters["crops_dropped_full"] == 0 and all(r.crop == crop for r in box.rows())
    assert box.pending_bytes <= cfg.max_bytes and box.awaiting == 0 and box.quarantined == 1
    box.close()


def test_an_outbox_from_before_verdicts_keeps_its_hits_pending(tmp_path):
    path = tmp_path / "o.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, hit_id TEXT NOT NULL UNIQUE, queued_at REAL "
        "NOT NULL, record BLOB NOT NULL, crop BLOB, crop_dropped TEXT, size INTEGER NOT NULL);"
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO counters VALUES ('accepted', 1), ('sent', 7);"
    )
    record = records.encode_record(records.hit_record(make_hit(id="old"), "site-a"))
    old.execute("INSERT INTO outbox(hit_id, queued_at, record, size) VALUES ('old', 1.0, ?, ?)", (record, len(record)))
    old.commit()
    old.close()
    box = Outbox(OutboxConfig(path=path))
    assert [(r.hit_id, r.state) for r in box.rows()] == [("old", "pending")]
    assert box.counters()["sent"] == 7 and box.counters()["verdicts_stored"] == 0
    assert [r.hit_id for r in box.take(5)] == ["old"]
    box.close()


def test_config_names_the_verdict_keys(tmp_path):
    with pytest.raises(ValueError, match="verdicts"):
        OutboxConfig(path=tmp_path / "o", verdicts="sometimes")
    with pytest.raises(ValueError, match="verdict_timeout_s"):
        OutboxConfig(path=tmp_path / "o", verdict_timeout_s=0)
