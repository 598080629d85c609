"""The receiver under hostile input, against a real Mosquitto: one bad message never holds up the
others, quarantine is bounded, a unit's status follows the receiver's clock, and signed hits from
real unit reporters are told apart from hits forged with a stolen broker account."""

from __future__ import annotations

import json
import sqlite3
import time

from central.receiver import Receiver, ReceiverConfig
from central.store import HitStore
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, wait_for
from testing.hits import face_jpeg, make_hit
from wire import records
from wire.signing import generate_unit_key, public_key_line, write_unit_key

TOPIC = "checkpoint/v1/{site}/{unit}/{kind}"


def publisher(broker, client_id: str = "raw-pub"):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def start_receiver(broker, store, **kw) -> tuple[Receiver, list[dict]]:
    got: list[dict] = []
    config = ReceiverConfig(host=broker.host, port=broker.port, client_id="rx-hostile", reconnect_min_delay_s=0.1, **kw)
    rx = Receiver(config, store, on_hit=got.append)
    rx.start()
    wait_for(rx.subscribed.is_set, what="receiver subscribed")
    return rx, got


def hit_body(hit, site: str = "site-a") -> dict:
    return json.loads(records.hit_payload(records.hit_record(hit, site), hit.crop_jpeg, None))


def test_one_bad_message_never_blocks_the_others(mosquitto, tmp_path):
    path = tmp_path / "hits.sqlite"
    HitStore(path).close()
    # A hit that passes every check of the decoder and still fails in the store: a real SQL error
    # raised by the database for this one row (as a constraint the receiver cannot foresee would).
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER poison BEFORE INSERT ON hits WHEN NEW.person_id = 'person-poison' "
        "BEGIN SELECT RAISE(ABORT, 'this row cannot be kept'); END"
    )
    conn.commit()
    conn.close()
    store = HitStore(path)
    rx, got = start_receiver(mosquitto, store, batch_max=50)
    pub = publisher(mosquitto)
    template = hit_body(make_hit("unit-1"))
    hostile = {
        "score 10**30": json.dumps({**template, "score": 10**30}).encode(),
        "track_id 2**63": json.dumps({**template, "track_id": 2**63}).encode(),
        "lone surrogate in person_id": json.dumps({**template, "person_id": "p\ud800"}).encode(),
        "JSON 200,000 levels deep": b'{"schema":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        "JSON 100,000 levels deep, under the size limit": b'{"schema":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "5,000-digit integer": json.dumps(template)[:-1].encode() + b',"watchlist_version":' + b"9" * 5000 + b"}",
        "fails in the store": json.dumps({**template, "person_id": "person-poison"}).encode(),
    }
    good = [make_hit(f"unit-{u}", crop=face_jpeg() if u == 1 else None) for u in range(1, 6) for _ in range(4)]
    # Interleaved, so that bad messages share batches with good ones.
    messages = [("unit-1", p) for p in hostile.values()]
    for i, h in enumerate(good):
        messages.insert(min(len(messages), i * 2), (h.unit_id, json.dumps(hit_body(h)).encode()))
    for unit, payload in messages:
        pub.publish(TOPIC.format(site="site-a", unit=unit, kind="hits"), payload, qos=1)
    wait_for(lambda: len(got) == len(good) and rx.counts["rejected"] == len(hostile), what="every message handled")
    rx.close()

    assert {g["id"] for g in got} == {h.id for h in good}
    assert store.count_hits() == len(good)
    assert {u["unit_id"]: u["hits"] for u in store.units()} == {f"unit-{u}": 4 for u in range(1, 6)}
    rejects = {r["payload_bytes"]: r for r in store.rejects()}
    assert len(rejects) == len(hostile)
    for what, payload in hostile.items():
        rej = rejects[len(payload)]
        assert rej["payload"] == payload[:4096], what
        assert rej["reason"] == ("store" if what == "fails in the store" else "protocol"), (what, rej)
    assert "this row cannot be kept" in rejects[len(hostile["fails in the store"])]["error"]

    # Everything was acknowledged: the same persistent session gets nothing again after a restart.
    rx, got = start_receiver(mosquitto, store, batch_max=50)
    marker = make_hit("unit-1")
    pub.publish(TOPIC.format(site="site-a", unit="unit-1", kind="hits"), json.dumps(hit_body(marker)).encode(), qos=1)
    wait_for(lambda: len(got) == 1, what="a fresh hit after the restart")
    rx.close()
    pub.loop_stop()
    assert [g["id"] for g in got] == [marker.id]
    assert len(store.rejects()) == len(hostile) and rx.counts["duplicates"] == 0
    store.close()


def test_rejects_keep_a_bounded_prefix_in_a_bounded_table(tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    store.max_rejects = 5
    garbage = b"\x00" * (5 * 1024 * 1024)
    for n in range(8):
        store.add_reject(f"checkpoint/v1/s/u{n}/hits\n", garbage, "not JSON\x1b[2J", 1000.0 + n)
    rows = store.rejects()
    assert [r["topic"] for r in rows] == [f"checkpoint/v1/s/u{n}/hits\\n" for n in range(3, 8)]
    assert all(len(r["payload"]) == 4096 and r["payload_bytes"] == len(garbage) for r in rows)
    assert rows[0]["error"] == "not JSON\\x1b[2J" and rows[0]["reason"] == "protocol"
    store.close()
    assert (tmp_path / "hits.sqlite").stat().st_size < 1024 * 1024
    # ... and none older than the retention.
    store = HitStore(tmp_path / "hits.sqlite")
    store.purge(older_than_s=10, now=1015.0)
    assert [r["topic"] for r in store.rejects()] == [f"checkpoint/v1/s/u{n}/hits\\n" for n in range(5, 8)]
    store.close()


def status(state: str, reason: str, at: float, unit: str = "unit-1") -> bytes:
    return records.status_payload("site-a", unit, state, reason, at=at)


def test_status_follows_the_receivers_clock_not_the_units(mosquitto, tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    rx, _ = start_receiver(mosquitto, store)
    pub = publisher(mosquitto)
    topic = TOPIC.format(site="site-a", unit="unit-1", kind="status")
    started = time.time() - 100
    ten_years = time.time() + 10 * 365 * 86400
    pub.publish(topic, status("online", "connected", ten_years), qos=1, retain=True).wait_for_publish(5)
    wait_for(lambda: [u["health"] for u in store.units()] == ["online"], what="online")
    # The Last Will: written when the unit connected, so it carries the reporter's start time.
    before = time.time()
    pub.publish(topic, status("offline", "connection lost", started), qos=1, retain=True).wait_for_publish(5)
    wait_for(lambda: [u["health"] for u in store.units()] == ["offline"], what="offline after the Last Will")
    unit = store.units()[0]
    assert before <= unit["state_at"] <= time.time(), "stamped with the time it was received"
    assert unit["state_claimed_at"] == started
    rx.close()

    # A receiver restart replays the retained Last Will: nothing changes, not even its time.
    rx, _ = start_receiver(mosquitto, store)
    wait_for(lambda: rx.counts["status"] == 1, what="the retained status replayed")
    rx.close()
    pub.loop_stop()
    assert store.units()[0]["state_at"] == unit["state_at"]
    store.close()


def unit_key(tmp_path, site: str, unit: str):
    signer = generate_unit_key()
    tmp_path.mkdir(exist_ok=True)
    key = write_unit_key(signer, tmp_path / f"{unit}.key")
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / f"{site}-{unit}.pub").write_text(public_key_line(site, unit, signer.public_raw) + "\n")
    return signer, key


def test_signed_hits_are_verified_and_forgeries_quarantined(mosquitto, tmp_path):
    signer, key = unit_key(tmp_path, "site-a", "unit-1")
    other, _ = unit_key(tmp_path / "elsewhere", "site-a", "unit-1")  # a key the centre never registered
    store = HitStore(tmp_path / "hits.sqlite")
    rx, got = start_receiver(mosquitto, store, unit_keys=tmp_path / "keys")
    reporter = MqttReporter(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, site="site-a", signing_key=key, **FAST),
        OutboxConfig(path=tmp_path / "o.sqlite"),
        "unit-1",
    )
    real = make_hit("unit-1", crop=face_jpeg())
    reporter.submit(real)
    assert reporter.flush(10)
    wait_for(lambda: len(got) == 1, what="the real, signed hit")
    wait_for(lambda: [u["health"] for u in store.units()] == ["online"], what="signed status accepted")

    # A stolen broker account (here: anyone on the broker) without the unit's key.
    pub = publisher(mosquitto, "thief")
    hits_topic = TOPIC.format(site="site-a", unit="unit-1", kind="hits")
    unsigned = make_hit("unit-1", person_id="person-framed")
    wrong_key = make_hit("unit-1", person_id="person-framed")
    tampered = json.loads(records.hit_payload(records.hit_record(real, "site-a"), real.crop_jpeg, None, signer=signer))
    tampered.update(id=make_hit().id, person_id="person-framed")
    forged = {
        "unsigned": json.dumps(hit_body(unsigned)).encode(),
        "unknown_key": records.hit_payload(records.hit_record(wrong_key, "site-a"), None, None, signer=other),
        "bad_signature": json.dumps(tampered).encode(),
    }
    for payload in forged.values():
        pub.publish(hits_topic, payload, qos=1).wait_for_publish(5)
    # A forged Last Will must not take the unit offline either.
    pub.publish(TOPIC.format(site="site-a", unit="unit-1", kind="status"), status("offline", "x", time.time()), qos=1)
    wait_for(lambda: rx.counts["rejected"] == 4, what="the forgeries quarantined")
    # An unregistered unit is accepted while it migrates, with its verdict shown.
    legacy = make_hit("unit-9")
    pub.publish(TOPIC.format(site="site-b", unit="unit-9", kind="hits"), json.dumps(hit_body(legacy, "site-b")), qos=1)
    wait_for(lambda: len(got) == 2, what="the unregistered unit's hit")
    reporter.close()
    rx.close()
    pub.loop_stop()

    assert store.hit(real.id)["signature"] == "valid"
    assert store.hit(legacy.id)["signature"] == "unsigned"
    assert store.count_hits() == 2
    reasons = [r["reason"] for r in store.rejects()]
    assert reasons == ["unsigned", "unknown_key", "bad_signature", "unsigned"], reasons
    assert all("site-a/unit-1" in r["error"] for r in store.rejects())
    assert store.units()[0]["health"] == "offline" and store.units()[0]["state_reason"] == "shutdown"
    store.close()


def test_unsigned_reject_refuses_units_with_no_registered_key(mosquitto, tmp_path):
    unit_key(tmp_path, "site-a", "unit-1")
    store = HitStore(tmp_path / "hits.sqlite")
    rx, got = start_receiver(mosquitto, store, unit_keys=tmp_path / "keys", unsigned="reject")
    pub = publisher(mosquitto)
    legacy = make_hit("unit-9")
    pub.publish(TOPIC.format(site="site-b", unit="unit-9", kind="hits"), json.dumps(hit_body(legacy, "site-b")), qos=1)
    wait_for(lambda: rx.counts["rejected"] == 1, what="the unsigned hit quarantined")
    rx.close()
    pub.loop_stop()
    assert got == [] and [r["reason"] for r in store.rejects()] == ["unsigned"]
    store.close()


def test_console_hit_page_shows_the_signature_verdict_and_survives_impossible_times(tmp_path):
    import httpx

    from central import accounts
    from central.console import create_app
    from central.register_view import RegisterView
    from central.webserver import BackgroundServer

    store = HitStore(tmp_path / "hits.sqlite")
    user, pw = "ana", "ana-password-1"
    store.add_user(user, "operator", accounts.hash_password(pw), actor="test")
    signed, legacy = make_hit("unit-1"), make_hit("unit-2")
    store.add_hit(dict(records.hit_record(signed, "site-a"), signature="valid"), None)
    store.add_hit(dict(records.hit_record(legacy, "site-a"), captured_at=1e300, signature="unsigned"), None)
    server = BackgroundServer(create_app(store, register=RegisterView(None, None))).start()
    try:
        with httpx.Client(base_url=server.url) as c:
            page = c.get("/login").text
            token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            c.post("/login", data={"csrf": token, "username": user, "password": pw})
            r = c.get("/hit", params={"id": signed.id})
            assert r.status_code == 200 and 'class="badge sig-valid"' in r.text
            r = c.get("/hit", params={"id": legacy.id})
            assert r.status_code == 200 and 'class="badge sig-unsigned"' in r.text and "bad time" in r.text
            assert c.get("/hits").status_code == 200 and c.get("/hits/rows").status_code == 200
    finally:
        server.stop()
        store.close()


def heartbeat(unit: str, site: str = "site-a", watchlist_version: int | None = None) -> bytes:
    return records.heartbeat_payload(
        site,
        unit,
        interval_s=30.0,
        uptime_s=1.0,
        unit={} if watchlist_version is None else {"watchlist": {"version": watchlist_version}},
        outbox={k: 0 for k in records.HEARTBEAT_OUTBOX_KEYS},
        link={"state": "connected", "connects": 1, "connect_attempts": 1, "last_error": None},
    )


def test_a_heartbeat_flood_is_dropped_and_counted_while_another_units_hits_are_all_stored(mosquitto, tmp_path):
    path = tmp_path / "hits.sqlite"
    store = HitStore(path)
    rx, got = start_receiver(
        mosquitto, store, receive_maximum=20, batch_max=10, queue_max=30, heartbeat_min_interval_s=3600
    )
    # Another process holds the database's write lock (a console's long write, a slow disk): the
    # receiver's store thread waits on it while the flood arrives, so the queue is what takes it.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    flood = publisher(mosquitto, "unit-x")  # one unit's account, flooding at QoS 0
    hb_x = TOPIC.format(site="site-a", unit="unit-x", kind="heartbeat")
    flood.publish(hb_x, heartbeat("unit-x"), qos=0).wait_for_publish(5)
    for _ in range(200):
        flood.publish(hb_x, heartbeat("unit-x"), qos=0)
    oversized = b"{" + b" " * records.MAX_HEARTBEAT_BYTES + b"}"
    for _ in range(20):
        flood.publish(hb_x, oversized, qos=0)
    flood.publish(hb_x, heartbeat("unit-x"), qos=0).wait_for_publish(10)
    fleet = publisher(mosquitto, "fleet")  # 100 other units' heartbeats, one each
    for n in range(100):
        fleet.publish(TOPIC.format(site="site-a", unit=f"hb-{n}", kind="heartbeat"), heartbeat(f"hb-{n}"), qos=0)
    unit_y = publisher(mosquitto, "unit-y")
    hits = [make_hit("unit-y") for _ in range(60)]
    sent = [
        unit_y.publish(TOPIC.format(site="site-a", unit="unit-y", kind="hits"), json.dumps(hit_body(h)), qos=1)
        for h in hits
    ]
    for info in sent:
        info.wait_for_publish(10)
    # The broker took every hit before this last heartbeat, so whatever hits it sends the receiver
    # arrive before it: once it is in, the count of hits delivered unacknowledged is final.
    fleet.publish(TOPIC.format(site="site-a", unit="last", kind="heartbeat"), heartbeat("last"), qos=0)
    sent_qos0 = 1 + 200 + 20 + 1 + 100 + 1
    wait_for(lambda: rx.stats()["arrived"]["qos0"] == sent_qos0, what=lambda: f"the flood: {rx.stats()['arrived']}")
    assert rx.stats()["arrived"]["acked"] == 20, "QoS 1: the broker sends at most receive_maximum unacknowledged"
    blocker.execute("ROLLBACK")
    blocker.close()

    def handled() -> int:
        s = rx.stats()
        return s["heartbeats"] + sum(s["dropped"].values())

    wait_for(lambda: len(got) == len(hits) and handled() == sent_qos0, what=lambda: f"all handled: {rx.stats()}")
    stats = rx.stats()
    rx.close()
    for c in (flood, fleet, unit_y):
        c.loop_stop()

    # Every hit of the other unit is stored: QoS 1 is flow-controlled by the broker, never dropped.
    assert sorted(g["id"] for g in got) == sorted(h.id for h in hits)
    assert store.count_hits() == len(hits) and stats["arrived"]["acked"] == len(hits)
    # The flood: counted by reason and by unit, never stored or quarantined.
    dropped = stats["dropped"]
    assert (dropped["oversized"], dropped["too_frequent"]) == (20, 201)
    assert stats["dropped_by_unit"]["site-a/unit-x"] == 221
    assert dropped["queue_full"] > 0
    assert dropped["queue_full"] == sum(n for u, n in stats["dropped_by_unit"].items() if u != "site-a/unit-x")
    assert store.rejects() == [] and stats["rejected"] == 0
    # The queue never held more than its bound.
    assert stats["queued_max"]["qos0"] <= 30
    assert stats["queued_max"]["qos0_bytes"] <= 30 * (len(heartbeat("unit-x")) + 8), "the time may take more digits"
    assert stats["queued"] == {"qos0": 0, "qos0_bytes": 0, "acked": 0}
    # What was taken is stored, many heartbeats to a transaction.
    beats = [u for u in store.units() if u["heartbeat"] is not None]
    assert len(beats) == stats["heartbeats"] == 1 + 100 + 1 - dropped["queue_full"] - dropped["superseded"]
    assert stats["heartbeat_writes"] < stats["heartbeats"] / 2
    store.close()


def test_only_signed_hits_write_watchlist_seen_never_heartbeats(mosquitto, tmp_path):
    signer, _ = unit_key(tmp_path, "site-a", "unit-1")
    store = HitStore(tmp_path / "hits.sqlite")
    rx, got = start_receiver(mosquitto, store, unit_keys=tmp_path / "keys")
    pub = publisher(mosquitto)
    # Anyone holding the unit's broker account can send a heartbeat claiming any list version.
    pub.publish(TOPIC.format(site="site-a", unit="unit-1", kind="heartbeat"), heartbeat("unit-1", watchlist_version=9))
    wait_for(lambda: store.units() and store.units()[0]["watchlist_version"] == 9, what="the heartbeat shown")
    hits_topic = TOPIC.format(site="site-a", unit="unit-1", kind="hits")
    signed = [make_hit("unit-1", watchlist_version=v) for v in (5, 5, 6)]
    for h in signed:
        pub.publish(hits_topic, records.hit_payload(records.hit_record(h, "site-a"), None, None, signer=signer), qos=1)
    # A unit with no registered key: its hit is stored (unsigned), its version is not audited.
    legacy = make_hit("unit-9", watchlist_version=7)
    pub.publish(TOPIC.format(site="site-b", unit="unit-9", kind="hits"), json.dumps(hit_body(legacy, "site-b")), qos=1)
    wait_for(lambda: len(got) == 4, what="four hits stored")
    rx.close()
    # A restarted receiver: a version already seen in a stored signed hit is not entered again.
    rx, got = start_receiver(mosquitto, store, unit_keys=tmp_path / "keys")
    again = make_hit("unit-1", watchlist_version=6)
    pub.publish(hits_topic, records.hit_payload(records.hit_record(again, "site-a"), None, None, signer=signer), qos=1)
    wait_for(lambda: len(got) == 1, what="the hit after the restart")
    rx.close()
    pub.loop_stop()

    seen = [e for e in store.audit_entries(limit=None, newest_first=False) if e["action"] == "watchlist_seen"]
    assert [(e["actor"], e["subject"], json.loads(e["detail"])) for e in seen] == [
        ("unit:site-a/unit-1", "site-a/unit-1", {"watchlist_version": 5, "hit": signed[0].id}),
        ("unit:site-a/unit-1", "site-a/unit-1", {"watchlist_version": 6, "hit": signed[2].id}),
    ]
    assert store.verify_audit().ok
    store.close()
