"""The store's interface, run against both backends: SQLite files and a real PostgreSQL cluster
started for the tests. Hits once by id, two-person review, accounts and sessions, the audit chain
(and how an edit or a deletion shows), fleet facts from heartbeats, purge, migrations."""

from __future__ import annotations

import io
import json
import sqlite3
import time

import pytest

from central import accounts
from central.fleet import heartbeat_facts
from central.migrations import LATEST
from central.store import HitFilter, HitStore, StoreError
from testing.hits import face_jpeg, make_hit
from wire import records


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hits.sqlite"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url):
    s = HitStore(store_url)
    for name in ("ana", "ben"):
        s.add_user(name, "operator", accounts.hash_password(f"{name}-password-1"), actor="test")
    yield s
    s.close()


def raw_sql(store, sql: str, args=()) -> None:
    """Change the database behind the store's back, as someone with database access could."""
    if store.dialect == "sqlite":
        conn = sqlite3.connect(store.path)
        with conn:
            conn.execute(sql, args)
        conn.close()
    else:
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), args)


def decoded(**kw):
    hit = make_hit(**kw)
    return records.decode_hit(records.hit_payload(records.hit_record(hit, "site-a"), hit.crop_jpeg, None))


def test_backend_is_chosen_by_url(store, store_url):
    assert type(store).__name__ == ("SqliteHitStore" if store_url.startswith("sqlite") else "PostgresHitStore")
    assert store.schema_version == LATEST
    with pytest.raises(StoreError, match="unknown store URL"):
        HitStore("mysql://x/y")


def test_each_hit_is_stored_once_with_its_crop(store):
    fields, crop = decoded(crop=face_jpeg())
    assert store.add_hits([(fields, crop, 10.0), (fields, crop, 11.0)]) == [True, False]
    row = store.hit(fields["id"])
    assert row["received_at"] == 10.0 and row["has_crop"] and row["review_state"] == "pending"
    assert store.crop(fields["id"]) == crop
    assert store.units()[0]["hits"] == 1


def test_two_different_operators_confirm_and_nothing_is_overwritten(store):
    fields, crop = decoded()
    store.add_hit(fields, crop)
    hid = fields["id"]
    assert store.decide(hid, "ana", "confirm") == "pending"
    with pytest.raises(StoreError, match="second, different operator"):
        store.decide(hid, "ana", "confirm")
    assert store.hit(hid)["review_state"] == "pending"
    assert store.decide(hid, "ben", "confirm") == "confirmed"
    with pytest.raises(StoreError, match="already confirmed"):
        store.decide(hid, "ben", "reject", "changed my mind")
    assert [(r["username"], r["decision"]) for r in store.reviews(hid)] == [("ana", "confirm"), ("ben", "confirm")]
    assert store.hit(hid)["reviewed_by"] == "ben"


def test_one_rejection_with_a_reason_closes_a_hit(store):
    fields, crop = decoded()
    store.add_hit(fields, crop)
    hid = fields["id"]
    store.decide(hid, "ana", "confirm")
    with pytest.raises(StoreError, match="needs a reason"):
        store.decide(hid, "ben", "reject", "  ")
    assert store.decide(hid, "ben", "reject", "older man, not the boy") == "rejected"
    with pytest.raises(StoreError, match="already rejected"):
        store.decide(hid, "ana", "confirm")
    assert store.reviews(hid)[-1]["reason"] == "older man, not the boy"
    assert [h["id"] for h in store.hits(review_state="rejected")] == [hid]


def test_only_active_registered_users_decide(store):
    fields, crop = decoded()
    store.add_hit(fields, crop)
    with pytest.raises(StoreError, match="no active user 'mallory'"):
        store.decide(fields["id"], "mallory", "confirm")
    store.disable_user("ana", actor="test")
    with pytest.raises(StoreError, match="no active user 'ana'"):
        store.decide(fields["id"], "ana", "confirm")
    with pytest.raises(StoreError, match="no hit"):
        store.decide("missing", "ben", "confirm")
    with pytest.raises(StoreError, match="decision must be"):
        store.decide(fields["id"], "ben", "maybe")


def test_short_hit_ids_resolve_when_they_name_one_hit(store):
    a, _ = decoded(id="abc123")
    b, _ = decoded(id="abd456")
    store.add_hits([(a, None, 1.0), (b, None, 2.0)])
    assert store.resolve_hit_id("abc") == "abc123"
    assert store.resolve_hit_id("abd456") == "abd456"
    with pytest.raises(StoreError, match="several hit ids"):
        store.resolve_hit_id("ab")
    with pytest.raises(StoreError, match="no hit whose id starts with 'zz'"):
        store.resolve_hit_id("zz")


def test_hit_filters(store):
    rows = [
        decoded(person_id="p1", camera_id="c1", unit_id="unit-1"),
        decoded(person_id="p2", camera_id="c2", unit_id="unit-1"),
        decoded(person_id="p1", camera_id="c2", unit_id="unit-1"),
    ]
    store.add_hits([(f, c, 100.0 + i) for i, (f, c) in enumerate(rows)])
    ids = [f["id"] for f, _ in rows]
    assert [h["id"] for h in store.hits()] == ids[::-1]
    assert [h["id"] for h in store.hits(where=HitFilter(person_id="p1"))] == [ids[2], ids[0]]
    assert [h["id"] for h in store.hits(where=HitFilter(camera_id="c2", person_id="p1"))] == [ids[2]]
    assert [h["id"] for h in store.hits(where=HitFilter(since=101.0, until=102.0))] == [ids[1]]
    assert len(store.hits(where=HitFilter(site="site-a", unit_id="unit-1"))) == 3
    assert store.hits(where=HitFilter(site="site-b")) == []


def test_audit_chain_verifies_and_shows_an_edit_or_a_deletion(store):
    fields, crop = decoded()
    store.add_hit(fields, crop)
    store.decide(fields["id"], "ana", "confirm")
    store.audit("ben", "view_crop", fields["id"])
    store.audit("ben", "login", None, {"ok": True})
    verdict = store.verify_audit()
    assert verdict.ok and verdict.entries == 5  # 2 user_add, decision, view_crop, login
    raw_sql(store, "UPDATE audit SET actor = ? WHERE seq = ?", ("ben", 3))
    verdict = store.verify_audit()
    assert not verdict.ok and verdict.entries == 2 and "entry 3" in verdict.problem
    raw_sql(store, "UPDATE audit SET actor = ? WHERE seq = ?", ("ana", 3))
    assert store.verify_audit().ok
    raw_sql(store, "DELETE FROM audit WHERE seq = ?", (4,))
    verdict = store.verify_audit()
    assert not verdict.ok and "missing" in verdict.problem
    out = io.StringIO()
    assert store.export_audit_jsonl(out, actor="ben") == 4
    assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()] == [1, 2, 3, 5]


def test_heartbeats_give_fleet_facts_and_signed_hits_audit_each_new_watchlist_version(store):
    now = time.time()
    store.set_unit_status("site-a", "unit-1", "online", "connected", now, now)
    body = {
        "interval_s": 30.0,
        "software_version": "1.2.3",
        "unit": {"cameras_up": 3, "cameras_total": 4, "watchlist": {"version": 7, "expires_at": now + 3600}},
        "outbox": {"pending": 5},
    }
    store.set_heartbeat("site-a", "unit-1", body, now)
    store.set_heartbeat("site-a", "unit-1", body, now + 1)
    store.set_heartbeat("site-a", "unit-1", {**body, "unit": {**body["unit"], "watchlist": {"version": 8}}}, now - 5)
    unit = store.units(now=now)[0]
    assert (unit["health"], unit["software_version"], unit["cameras_up"], unit["cameras_total"]) == (
        "online",
        "1.2.3",
        3,
        4,
    )
    assert (unit["watchlist_version"], unit["watchlist_state"], unit["outbox_pending"]) == (7, "expiring", 5)
    assert store.units(now=now, expiry_warning_s=60)[0]["watchlist_state"] == "ok"
    assert store.units(now=now + 7200)[0]["watchlist_state"] == "expired"
    assert store.units(now=now)[0]["watchlist_version"] == 7, "an older heartbeat (v8) is ignored"
    # Heartbeats are unsigned: only a validly signed hit enters a unit's new list version in the audit chain.
    assert [e for e in store.audit_entries(limit=None) if e["action"] == "watchlist_seen"] == []
    hits = [
        dict(records.hit_record(make_hit("unit-1", watchlist_version=v), "site-a"), signature=sig)
        for v, sig in ((7, "unsigned"), (7, "valid"), (7, "valid"), (8, "valid"))
    ]
    store.add_hits([(h, None, now) for h in hits[:3]])
    store.add_hits([(h, None, now) for h in hits[1:]])  # a duplicate delivery of two of them, and v8
    seen = [e for e in store.audit_entries(limit=None, newest_first=False) if e["action"] == "watchlist_seen"]
    assert [(e["subject"], json.loads(e["detail"])) for e in seen] == [
        ("site-a/unit-1", {"watchlist_version": 7, "hit": hits[1]["id"]}),
        ("site-a/unit-1", {"watchlist_version": 8, "hit": hits[3]["id"]}),
    ]
    # The unit's version may also come flat in `unit`, as older units send it.
    assert heartbeat_facts({"unit": {"watchlist_version": 4, "software_version": "x"}})["watchlist_version"] == 4


def test_sessions_end_with_the_account(store):
    token, digest = accounts.new_token()
    store.create_session(digest, "ana", "csrf-token", ttl_s=60)
    assert store.session(digest, idle_s=60)["username"] == "ana"
    assert store.session(accounts.token_hash("other"), idle_s=60) is None
    store.set_password("ana", accounts.hash_password("new-password-1"), actor="test")
    assert store.session(digest, idle_s=60) is None
    assert accounts.check_login(store.user("ana"), "new-password-1")
    assert not accounts.check_login(store.user("ana"), "ana-password-1")
    with pytest.raises(StoreError, match="already exists"):
        store.add_user("ana", "operator", "x", actor="test")
    with pytest.raises(StoreError, match="role"):
        store.add_user("eve", "admin", "x", actor="test")


def test_purge_keeps_the_audit_chain(store):
    fields, crop = decoded(crop=face_jpeg())
    store.add_hit(fields, crop, received_at=time.time() - 100 * 86400)
    store.decide(fields["id"], "ana", "confirm")
    assert store.purge(90 * 86400) == 1
    assert store.count_hits() == 0 and store.crop(fields["id"]) is None and store.reviews(fields["id"]) == []
    assert store.verify_audit().ok and store.verify_audit().entries == 4
    assert store.audit_entries(limit=1)[0]["action"] == "purge", "the purge itself is entered"


def test_a_version_1_sqlite_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('store_version', '1');"
        "CREATE TABLE hits (id TEXT PRIMARY KEY, site TEXT NOT NULL, unit_id TEXT NOT NULL, camera_id TEXT NOT NULL,"
        " person_id TEXT NOT NULL, captured_at FLOAT NOT NULL, queued_at FLOAT, received_at FLOAT NOT NULL,"
        " score FLOAT, threshold FLOAT, margin FLOAT, box TEXT, model_id TEXT, watchlist_version INTEGER,"
        " track_id INTEGER, has_crop INTEGER DEFAULT 0, crop_dropped TEXT, schema_version INTEGER,"
        " review_state TEXT NOT NULL DEFAULT 'pending', reviewed_by TEXT, reviewed_at FLOAT, review_note TEXT);"
        "CREATE TABLE crops (hit_id TEXT PRIMARY KEY REFERENCES hits(id), jpeg BLOB, bytes INTEGER);"
        "CREATE TABLE units (site TEXT, unit_id TEXT, state TEXT DEFAULT 'unknown', state_reason TEXT, state_at FLOAT,"
        " last_seen FLOAT, last_heartbeat_at FLOAT, heartbeat_interval_s FLOAT, heartbeat TEXT, hits INTEGER DEFAULT 0,"
        " PRIMARY KEY (site, unit_id));"
        "CREATE TABLE rejects (id INTEGER PRIMARY KEY, received_at FLOAT, topic TEXT, error TEXT, payload BLOB);"
        "INSERT INTO hits(id, site, unit_id, camera_id, person_id, captured_at, received_at, review_state,"
        " reviewed_by, reviewed_at, review_note) VALUES ('h1', 's', 'u', 'c', 'p', 1, 2, 'rejected', 'duty', 3, 'no');"
    )
    # Rejects were kept whole before version 3: migrating cuts them to the prefix kept from then on.
    conn.execute("INSERT INTO rejects(received_at, topic, error, payload) VALUES (1, 't', 'e', ?)", (b"y" * 10_000,))
    conn.commit()
    conn.close()
    store = HitStore(path)
    assert store.schema_version == LATEST
    assert store.reviews("h1") == [
        {"hit_id": "h1", "username": "duty", "decision": "reject", "reason": "no", "at": 3.0}
    ]
    # Hits stored before sightings each become a sighting of their own, with their decision.
    assert store.sighting("h1")["review_state"] == "rejected" and store.hit("h1")["sighting_id"] == "h1"
    # Hits from before the calibrated stranger rate have none (the console then shows the raw score only).
    assert store.hit("h1")["stranger_rate"] is None
    assert [(r["payload"], r["payload_bytes"]) for r in store.rejects()] == [(b"y" * 4096, 10_000)]
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99.*upgrade"):
        HitStore(path)


def test_quarantine_is_bounded_and_status_follows_receive_time(store):
    # Rejects: a 4 KiB prefix and the full size; the newest max_rejects rows; surrogates escaped (PostgreSQL
    # cannot hold them in TEXT).
    store.max_rejects = 3
    for n in range(5):
        store.add_reject(f"checkpoint/v1/s/u{n}/hits\ud800", b"x" * 100_000, f"error {n}\n", 1000.0 + n, reason="store")
    rows = store.rejects()
    assert [r["topic"] for r in rows] == [f"checkpoint/v1/s/u{n}/hits\\ud800" for n in (2, 3, 4)]
    assert {(len(r["payload"]), r["payload_bytes"], r["reason"]) for r in rows} == {(4096, 100_000, "store")}
    assert rows[0]["error"] == "error 2\\n"
    # Status: the receive time orders it, whatever the unit's clock claims; a retained replay of the
    # state already stored changes nothing.
    ahead = time.time() + 10 * 365 * 86400
    assert store.set_unit_status("s", "u", "online", "connected", ahead, 100.0)
    assert store.set_unit_status("s", "u", "offline", "connection lost", 50.0, 200.0)
    assert not store.set_unit_status("s", "u", "offline", "connection lost", 50.0, 300.0, replay=True)
    unit = store.units()[0]
    assert (unit["state"], unit["state_at"], unit["state_claimed_at"]) == ("offline", 200.0, 50.0)
    assert not store.set_unit_status("s", "u", "online", "connected", ahead, 150.0), "received earlier"
    # The signature verdict is kept with the hit.
    fields, crop = decoded()
    store.add_hit(dict(fields, signature="valid"), crop)
    assert store.hit(fields["id"])["signature"] == "valid"


def test_hits_of_one_person_at_one_unit_close_in_time_form_one_sighting(store):
    t0 = 1_700_000_000.0
    ids = []
    # One person in view: 19 hits 41 s apart (13 minutes), as measured at a station, one of them best.
    for k in range(19):
        fields, crop = decoded(
            person_id="case-1", captured_at=t0 + 41 * k, score=0.9 if k == 7 else 0.7, track_id=k, crop=face_jpeg()
        )
        store.add_hits([(fields, crop, t0 + 41 * k + 1)])
        ids.append(fields["id"])
    # Another person at the unit, the same person at another unit, and the same person 20 minutes on.
    other = [decoded(person_id="case-2", captured_at=t0 + 60)[0], decoded(person_id="case-1", unit_id="unit-2")[0]]
    later, _ = decoded(person_id="case-1", captured_at=t0 + 41 * 18 + 1200, track_id=99)
    # The same track past the gap continues the sighting: the tracker held the face throughout.
    same_track, _ = decoded(person_id="case-3", captured_at=t0, track_id=5)
    held, _ = decoded(person_id="case-3", captured_at=t0 + 900, track_id=5)
    store.add_hits([(f, None, t0 + 2000) for f in (*other, later, same_track, held)])
    sightings = {s["id"]: s for s in store.sightings(limit=None)}
    assert len(sightings) == 5
    first = sightings[ids[0]]
    assert first["hits"] == 19 and first["best_hit_id"] == ids[7] and first["best_has_crop"]
    assert {h["id"] for h in store.sighting_hits(ids[0])} == set(ids)
    assert sightings[same_track["id"]]["hits"] == 2
    assert later["id"] in sightings
    assert [s["id"] for s in store.sightings(where=HitFilter(person_id="case-1", unit_id="unit-1"))] == [
        later["id"],
        ids[0],
    ]
    # Waiting longer than 10 minutes since its first hit arrived: only the 19-hit sighting.
    desk = store.desk(overdue_after_s=600, now=t0 + 2000)
    assert (desk["pending"], desk["overdue"]) == (5, 1)


def test_one_two_person_decision_covers_the_sighting_and_later_hits_show_it(store):
    t0 = time.time() - 600
    a, _ = decoded(person_id="case-1", captured_at=t0, score=0.8)
    b, _ = decoded(person_id="case-1", captured_at=t0 + 30, score=0.7)
    store.add_hits([(a, None, t0 + 1), (b, None, t0 + 31)])
    assert store.decide(b["id"], "ana", "confirm") == "pending"
    with pytest.raises(StoreError, match="second, different operator"):
        store.decide(a["id"], "ana", "confirm")  # the same sighting, whichever hit is open
    assert store.decide(a["id"], "ben", "confirm") == "confirmed"
    assert {store.hit(h["id"])["review_state"] for h in (a, b)} == {"confirmed"}
    c, _ = decoded(person_id="case-1", captured_at=t0 + 90, score=0.95)
    store.add_hit(c, None)
    assert store.hit(c["id"])["review_state"] == "confirmed" and store.hit(c["id"])["sighting_id"] == a["id"]
    assert [r["username"] for r in store.reviews(c["id"])] == ["ana", "ben"]
    with pytest.raises(StoreError, match="already confirmed"):
        store.decide(c["id"], "ana", "reject", "no")
    decisions = [e for e in store.audit_entries(limit=None) if e["action"] == "decision"]
    assert len(decisions) == 2 and json.loads(decisions[0]["detail"])["sighting"] == a["id"]


def _two_sightings_and_a_bridge(t0: float):
    """Track 1 at t0 (sighting A), another track 10 minutes on (B, past the gap), and a hit of track 1
    near B: it continues A (its track) and B (its time)."""
    a, _ = decoded(person_id="case-1", camera_id="cam-1", track_id=1, captured_at=t0, score=0.70)
    b, _ = decoded(person_id="case-1", camera_id="cam-2", track_id=2, captured_at=t0 + 600, score=0.90)
    bridge, _ = decoded(person_id="case-1", camera_id="cam-1", track_id=1, captured_at=t0 + 650, score=0.75)
    return a, b, bridge


def test_a_hit_that_continues_two_pending_sightings_merges_them(store):
    t0 = time.time() - 3000
    a, b, bridge = _two_sightings_and_a_bridge(t0)
    store.add_hits([(a, None, t0 + 1)])
    store.add_hits([(b, None, t0 + 601)])
    assert store.decide(b["id"], "ana", "confirm") == "pending"  # one confirmation, on B
    store.add_hits([(bridge, None, t0 + 651)])
    # One sighting, the older id kept, counts, span and best hit of all three.
    kept = store.sighting(a["id"])
    assert store.sighting(b["id"]) is None
    assert (kept["hits"], kept["best_hit_id"], kept["first_at"], kept["last_at"]) == (3, b["id"], t0, t0 + 650)
    assert kept["created_at"] == t0 + 1 and kept["review_state"] == "pending"
    assert {h["id"] for h in store.sighting_hits(a["id"])} == {a["id"], b["id"], bridge["id"]}
    assert [s["id"] for s in store.sightings(limit=None)] == [a["id"]]
    # B's confirmation is the merged sighting's: another operator's confirms it, the same one's is refused.
    assert [(r["username"], r["hit_id"]) for r in store.reviews(bridge["id"])] == [("ana", b["id"])]
    with pytest.raises(StoreError, match="second, different operator"):
        store.decide(a["id"], "ana", "confirm")
    merged = [e for e in store.audit_entries(limit=None) if e["action"] == "sighting_merged"]
    assert [(e["actor"], e["subject"], json.loads(e["detail"])) for e in merged] == [
        ("receiver", a["id"], {"merged": [b["id"]], "hit": bridge["id"], "hits": 3})
    ]
    assert store.decide(bridge["id"], "ben", "confirm") == "confirmed"
    assert {store.hit(h["id"])["review_state"] for h in (a, b, bridge)} == {"confirmed"}
    assert store.verify_audit().ok


def test_sightings_merge_within_one_batch_too(store):
    t0 = time.time() - 3000
    a, b, bridge = _two_sightings_and_a_bridge(t0)
    store.add_hits([(bridge, None, t0 + 700), (b, None, t0 + 700), (a, None, t0 + 700)])
    assert [(s["id"], s["hits"]) for s in store.sightings(limit=None)] == [(a["id"], 3)]
    assert {store.hit(h["id"])["sighting_id"] for h in (a, b, bridge)} == {a["id"]}
    merged = [json.loads(e["detail"]) for e in store.audit_entries(limit=None) if e["action"] == "sighting_merged"]
    assert merged == [{"merged": [b["id"]], "hit": bridge["id"], "hits": 3}]


def test_decided_sightings_and_split_confirmations_are_never_merged(store):
    t0 = time.time() - 3000
    # A decided (two confirmations), B pending: the hit goes to B, asked about; A stays as decided.
    a, b, bridge = _two_sightings_and_a_bridge(t0)
    store.add_hits([(a, None, t0 + 1), (b, None, t0 + 601)])
    store.decide(a["id"], "ana", "confirm")
    store.decide(a["id"], "ben", "confirm")
    store.add_hits([(bridge, None, t0 + 651)])
    assert store.hit(bridge["id"])["sighting_id"] == b["id"]
    assert store.hit(bridge["id"])["review_state"] == "pending"
    assert (store.sighting(a["id"])["hits"], store.sighting(a["id"])["review_state"]) == (1, "confirmed")
    # A confirmed by ana alone and B by ben alone: joined, two operators would have confirmed a sighting
    # each saw only part of; they stay apart and the hit joins the nearer one.
    t1 = t0 - 86400
    c, d, bridge2 = _two_sightings_and_a_bridge(t1)
    store.add_hits([(c, None, t1 + 1), (d, None, t1 + 601)])
    store.decide(c["id"], "ana", "confirm")
    store.decide(d["id"], "ben", "confirm")
    store.add_hits([(bridge2, None, t1 + 651)])
    assert store.sighting(c["id"])["hits"] == 1 and store.sighting(d["id"])["hits"] == 2
    assert store.hit(bridge2["id"])["sighting_id"] == d["id"]
    assert [e for e in store.audit_entries(limit=None) if e["action"] == "sighting_merged"] == []


def test_a_rejection_covers_only_the_faces_seen(store):
    t0 = time.time() - 600
    a, _ = decoded(person_id="case-1", captured_at=t0, score=0.7)
    store.add_hit(a, None)
    assert store.decide(a["id"], "ana", "reject", "not her") == "rejected"
    weaker, _ = decoded(person_id="case-1", captured_at=t0 + 30, score=0.65)
    stronger, _ = decoded(person_id="case-1", captured_at=t0 + 60, score=0.85)
    store.add_hits([(weaker, None, t0 + 31), (stronger, None, t0 + 61)])
    assert store.hit(weaker["id"])["review_state"] == "rejected"
    assert store.hit(stronger["id"])["review_state"] == "pending"
    assert store.hit(stronger["id"])["sighting_id"] == stronger["id"]


def test_a_closed_case_cannot_be_confirmed(store):
    fields, _ = decoded(person_id="case-1")
    store.add_hit(fields, None)
    with pytest.raises(StoreError, match="case closed"):
        store.decide(fields["id"], "ana", "confirm", closed="HQ removed case-1 in version 5")
    assert store.reviews(fields["id"]) == []


def test_watchlist_version_0_is_not_audited(store):
    fields, _ = decoded(watchlist_version=0)
    store.add_hit({**fields, "signature": "valid"}, None)
    assert [e for e in store.audit_entries(limit=None) if e["action"] == "watchlist_seen"] == []


def test_camera_names_come_from_heartbeats(store):
    cameras = [
        {"id": "cam-1", "name": " Platform 1 <north> "},
        {"id": "cam-2", "name": ""},
        {"id": "cam-3", "name": "Gate 4", "location": "east hall, looking at the barriers"},
        {"id": "cam-4", "location": "car park exit"},
        {"id": "cam-5", "name": 7, "location": ["x"]},
        "x",
    ]
    store.set_heartbeat("site-a", "unit-1", {"unit": {"cameras": cameras}}, time.time())
    assert store.camera_names() == {
        ("site-a", "unit-1", "cam-1"): "Platform 1 <north>",
        ("site-a", "unit-1", "cam-3"): "Gate 4 · east hall, looking at the barriers",
        ("site-a", "unit-1", "cam-4"): "car park exit",
    }
    # One unit's labels and fleet row, read alone (a hit page asks for its own unit only).
    other = {"unit": {"timezone": "Asia/Tokyo", "cameras": [{"id": "cam-1", "name": "Other"}]}}
    store.set_heartbeat("site-b", "unit-9", other, time.time())
    names, zones = store.unit_labels(("site-b", "unit-9"))
    assert names == {("site-b", "unit-9", "cam-1"): "Other"} and zones == {("site-b", "unit-9"): "Asia/Tokyo"}
    assert set(store.camera_names()) == {*store.unit_labels(("site-a", "unit-1"))[0], *names}
    assert [(u["site"], u["unit_id"]) for u in store.units(unit=("site-b", "unit-9"))] == [("site-b", "unit-9")]
    assert store.units(unit=("site-b", "nobody")) == []
