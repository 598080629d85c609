"""End-to-end verdicts (issue 19, item 2) against a real Mosquitto and the receiver: a unit keeps each
hit until the receiver's verdict, not just the broker's PUBACK. Measured before: a unit whose key the
centre holds but whose config has no signing_key logged HIT, deleted the hit on PUBACK, and the
receiver quarantined it as `unsigned`; nothing at the unit or on the console showed it. Now the
refused hit stays in the outbox with its reason, is logged at ERROR and shows in the heartbeat; hits
wait out a receiver outage; a lost verdict is made up by sending the hit again ('duplicate'); a unit
whose receivers never answer falls back to the PUBACK; forged verdicts change nothing; and on the
deployed site (deploy/mosquitto/acl) only the receiver account may write verdicts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from central.receiver import Receiver
from central.store import HitStore
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, wait_for
from testing.hits import make_hit
from testing.site import Probe, Site, make_site_credentials, start_deployed_broker
from tests import console_support
from wire import records
from wire.records import Verdict


@pytest.fixture
def site(tmp_path: Path, mosquitto_bin: str):
    creds = tmp_path / "creds"
    unit_keys = make_site_credentials(creds)
    broker = start_deployed_broker(tmp_path / "broker", creds)
    yield Site(broker, creds, unit_keys)
    broker.stop()


def site_reporter(site: Site, tmp_path: Path, unit: str, site_id: str, *, sign: bool) -> MqttReporter:
    conn = site.account(unit)
    cfg = MqttConfig(
        **conn.model_dump(include={"host", "port", "username", "password_file", "tls"}),
        site=site_id,
        signing_key=site.creds / unit / "signing.key" if sign else None,
        **FAST,
    )
    return MqttReporter(cfg, OutboxConfig(path=tmp_path / f"{unit}.sqlite"), unit)


def hit_rejects(store: HitStore) -> list[dict]:
    # The unsigned unit's status messages are quarantined too.
    return [r for r in store.rejects() if r["topic"].endswith("/hits")]


def plain_reporter(broker, tmp_path: Path, **outbox) -> MqttReporter:
    cfg = MqttConfig(host=broker.host, port=broker.port, site="site-a", **FAST)
    return MqttReporter(cfg, OutboxConfig(path=tmp_path / "unit-1.sqlite", **outbox), "unit-1")


def start_receiver(broker, store: HitStore, **kw) -> Receiver:
    return console_support.start_receiver(broker, store, "rx", reconnect_max_delay_s=0.5, **kw)


class OldReceiver:
    """A receiver from before verdicts: takes every hit (a shared subscription in the receivers' group,
    so the broker acknowledges them) and answers nothing."""

    def __init__(self, broker) -> None:
        self.probe = Probe(
            MqttConfig(host=broker.host, port=broker.port, site="x").model_copy(update={"username": None})
        ).connected()
        self.probe.subscribe("$share/checkpoint-receivers/checkpoint/v1/+/+/hits")

    def hit_ids(self) -> list[str]:
        return [json.loads(p)["id"] for t, p in list(self.probe.messages) if t.endswith("/hits")]

    def close(self) -> None:
        self.probe.close()


def test_a_hit_the_centre_refuses_stays_at_the_unit_with_its_reason(site: Site, tmp_path: Path, caplog) -> None:
    """The measured case: the unit's key is registered (make-credentials --unit-keys), its config has
    no signing_key. Before, the outbox was empty once the broker acknowledged the hit."""
    store = HitStore(tmp_path / "hits.sqlite")
    rx = Receiver(
        site.receiver_config("rx-site"),
        store,
    )
    rx.start()
    wait_for(rx.subscribed.is_set, what="the receiver subscribed with its account")
    unsigned = site_reporter(site, tmp_path, "unit-1", "site-a", sign=False)
    signed = site_reporter(site, tmp_path, "unit-2", "site-b", sign=True)
    try:
        refused, good = make_hit(unit_id="unit-1"), make_hit(unit_id="unit-2")
        with caplog.at_level(logging.ERROR, logger="edge.outbox"):
            unsigned.submit(refused)
            signed.submit(good)
            wait_for(lambda: len(hit_rejects(store)) == 1, what="the unsigned hit quarantined at the centre")
            wait_for(
                lambda: [r.hit_id for r in unsigned.outbox.rows()] == [refused.id],
                what=lambda: f"the refused hit kept in the unit's outbox (rows: {unsigned.outbox.rows()})",
            )
            wait_for(lambda: unsigned.outbox.quarantined == 1, what="the hit marked refused")
        (row,) = unsigned.outbox.rows()
        assert row.state == "quarantined" and row.reason == "unsigned"
        assert "site-a/unit-1" in row.error and "registered key" in row.error
        assert any(r.levelno == logging.ERROR and refused.id in r.getMessage() for r in caplog.records)
        # The signed unit's hit is stored and leaves its outbox on the verdict.
        wait_for(lambda: signed.outbox.depth == 0, what="the stored hit deleted on its verdict")
        assert [h["id"] for h in store.hits(limit=None)] == [good.id]
        assert signed.outbox.counters()["verdicts_stored"] == 1
        # The heartbeat carries the count and the reason to the centre.
        wait_for(
            lambda: any(
                (u["heartbeat"] or {}).get("outbox", {}).get("quarantined_kept") == 1
                for u in store.units()
                if u["unit_id"] == "unit-1"
            ),
            what="a heartbeat counting the refused hit",
        )
        hb = next(u for u in store.units() if u["unit_id"] == "unit-1")["heartbeat"]
        assert hb["outbox"]["quarantined"] == 1 and hb["outbox"]["pending"] == 0
        assert any("refused 1 hits" in w and "unsigned" in w for w in hb["unit"]["warnings"])
        # Not sent again: the receiver holds one reject, however long the unit runs.
        assert rx.stats()["verdicts"] == 2 and len(hit_rejects(store)) == 1
    finally:
        unsigned.close()
        signed.close()
        rx.close()
        store.close()


def test_only_the_receiver_account_may_write_verdicts(site: Site) -> None:
    unit = Probe(site.account("unit-1")).connected()
    receiver = Probe(site.account("receiver")).connected()
    try:
        for topic in ("site-a/unit-1/verdicts", "site-b/unit-2/verdicts"):
            assert unit.publish(f"checkpoint/v1/{topic}") == "Not authorized", topic
        assert receiver.publish("checkpoint/v1/site-a/unit-1/verdicts") != "Not authorized"
        # ... and never into a site's watchlist tree, which the site's units read.
        assert receiver.publish("checkpoint/v1/site-a/watchlist/verdicts") == "Not authorized"
    finally:
        unit.close()
        receiver.close()


def test_hits_wait_out_a_receiver_outage_until_their_verdict(mosquitto, tmp_path: Path) -> None:
    store = HitStore(tmp_path / "hits.sqlite")
    rx = start_receiver(mosquitto, store)
    rx.close()  # its persistent session stays subscribed: the broker queues the hits for it
    reporter = plain_reporter(mosquitto, tmp_path)
    try:
        hits = [make_hit() for _ in range(3)]
        for h in hits:
            reporter.submit(h)
        wait_for(lambda: reporter.outbox.counters()["sent"] == 3, what="the broker's PUBACKs")
        assert reporter.outbox.depth == 3, "acknowledged by the broker, not yet by the centre"
        rx = start_receiver(mosquitto, store)
        wait_for(lambda: reporter.outbox.depth == 0, what="the hits deleted on the receiver's verdicts")
        assert reporter.outbox.counters()["verdicts_stored"] == 3
        assert sorted(h["id"] for h in store.hits(limit=None)) == sorted(h.id for h in hits)
    finally:
        reporter.close()
        rx.close()
        store.close()


def test_a_lost_verdict_is_made_up_by_sending_again_and_answered_duplicate(mosquitto, tmp_path: Path) -> None:
    old = OldReceiver(mosquitto)
    reporter = plain_reporter(mosquitto, tmp_path, verdicts="require", verdict_timeout_s=0.3)
    store = HitStore(tmp_path / "hits.sqlite")
    rx = None
    try:
        h = make_hit()
        reporter.submit(h)
        # Taken and acknowledged, never answered (as if the verdict were lost): sent again when overdue.
        wait_for(lambda: old.hit_ids().count(h.id) >= 2, what="the unanswered hit sent again")
        wait_for(lambda: reporter.outbox.counters()["resent"] >= 1, what="the resend acknowledged and counted")
        assert reporter.outbox.depth == 1
        # The centre already holds the hit (its verdict was what got lost): the next copy is a duplicate.
        fields, crop = records.decode_hit(records.hit_payload(records.hit_record(h, "site-a"), None, None))
        store.add_hits([(fields, crop, time.time())])
        old.close()
        rx = start_receiver(mosquitto, store)
        wait_for(lambda: reporter.outbox.depth == 0, 10, "the hit deleted on the 'duplicate' verdict")
        assert reporter.outbox.counters()["verdicts_duplicate"] == 1 and store.count_hits() == 1
    finally:
        old.close()
        reporter.close()
        if rx is not None:
            rx.close()
        store.close()


def test_with_a_receiver_older_than_verdicts_the_unit_does_not_grow(mosquitto, tmp_path: Path, caplog) -> None:
    old = OldReceiver(mosquitto)
    reporter = plain_reporter(mosquitto, tmp_path, verdict_timeout_s=0.3)
    try:
        hits = [make_hit() for _ in range(5)]
        with caplog.at_level(logging.WARNING, logger="edge.outbox"):
            for h in hits:
                reporter.submit(h)
            wait_for(lambda: reporter.outbox.counters()["unconfirmed"] == 5, what="hits deleted on PUBACK alone")
        assert reporter.outbox.depth == 0 and old.hit_ids() == [h.id for h in hits], "each sent once"
        assert any("older than verdicts" in r.getMessage() for r in caplog.records)
    finally:
        reporter.close()
        old.close()


def test_forged_verdicts_change_nothing(mosquitto, tmp_path: Path) -> None:
    """Where the ACL does not keep others off the verdict topic (this test broker has none), the unit's
    own checks still hold: a verdict must decode, name this unit and be about a hit it holds."""
    old = OldReceiver(mosquitto)  # the hit is acknowledged and awaits a verdict that never comes
    reporter = plain_reporter(mosquitto, tmp_path, verdicts="require")
    forger = Probe(MqttConfig(host=mosquitto.host, port=mosquitto.port, site="x")).connected()
    try:
        h = make_hit()
        reporter.submit(h)
        wait_for(lambda: reporter.outbox.awaiting == 1, what="the hit awaiting its verdict")
        topic = reporter.verdict_topic
        forger.publish(topic, records.verdict_payload("site-a", "unit-1", [Verdict("not-held", "stored")]))
        forger.publish(topic, records.verdict_payload("site-a", "unit-9", [Verdict(h.id, "stored")]))
        forger.publish(topic, b'{"schema": "checkpoint/verdict", "v": 1, "verdicts": "all stored"}')
        forger.publish(topic, json.dumps({"id": h.id, "outcome": "stored"}).encode())
        wait_for(lambda: reporter.outbox.counters()["verdicts_ignored"] == 4, what="four forged verdicts ignored")
        assert [r.hit_id for r in reporter.outbox.rows()] == [h.id] and reporter.outbox.awaiting == 1
    finally:
        forger.close()
        reporter.close()
        old.close()
