"""The operators' receiver and store against a real Mosquitto: once per hit, shared subscriptions,
unit status, bad messages kept aside, and the checkpoint-receiver CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from central.cli import main as cli
from central.receiver import Receiver, ReceiverConfig
from central.store import HitStore, StoreError
from common.version import software_version
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, wait_for
from testing.hits import face_jpeg, make_hit
from wire import records


def rx_config(broker, client_id: str = "rx-1", **kw) -> ReceiverConfig:
    return ReceiverConfig(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
        **kw,
    )


def start_receiver(broker, store, client_id="rx-1", **kw) -> tuple[Receiver, list[dict]]:
    got: list[dict] = []
    rx = Receiver(rx_config(broker, client_id, **kw), store, on_hit=got.append)
    rx.start()
    wait_for(rx.subscribed.is_set, what="receiver subscribed")
    return rx, got


def publisher(broker):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def hit_message(hit, site="site-a") -> bytes:
    return records.hit_payload(records.hit_record(hit, site), hit.crop_jpeg, None)


def test_duplicate_deliveries_are_stored_and_printed_once(mosquitto, tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    rx, got = start_receiver(mosquitto, store)
    pub = publisher(mosquitto)
    h = make_hit(crop=face_jpeg())
    for _ in range(3):
        pub.publish("checkpoint/v1/site-a/unit-1/hits", hit_message(h), qos=1).wait_for_publish(5)
    wait_for(lambda: rx.counts["received"] == 3, what="three deliveries")
    pub.loop_stop()
    rx.close()
    assert [g["id"] for g in got] == [h.id]
    assert rx.counts["duplicates"] == 2
    assert store.count_hits() == 1
    row = store.hit(h.id)
    assert row["review_state"] == "pending" and row["has_crop"] and row["box"] == list(h.box)
    assert store.crop(h.id) == h.crop_jpeg
    store.close()


def test_bad_messages_are_kept_aside_acknowledged_and_do_not_stop_the_receiver(mosquitto, tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    rx, got = start_receiver(mosquitto, store)
    pub = publisher(mosquitto)
    good = make_hit()
    body = json.loads(hit_message(make_hit()))
    bad = {
        "not JSON": b"{nope",
        "schema version": json.dumps({**body, "v": 2}).encode(),
        "says": json.dumps({**body, "unit_id": "unit-9"}).encode(),  # payload claims another unit
        "not a JPEG": json.dumps({**body, "crop_jpeg_b64": base64.b64encode(b"GIF89a....").decode()}).encode(),
        "lacks required key 'person_id'": json.dumps({k: v for k, v in body.items() if k != "person_id"}).encode(),
    }
    for payload in bad.values():
        pub.publish("checkpoint/v1/site-a/unit-1/hits", payload, qos=1).wait_for_publish(5)
    pub.publish("checkpoint/v1/site-a/unit-1/hits", hit_message(good), qos=1).wait_for_publish(5)
    wait_for(lambda: [g["id"] for g in got] == [good.id], what="the good hit after the bad ones")
    rx.close()
    rejects = store.rejects()
    assert len(rejects) == len(bad)
    for (expected, payload), rej in zip(bad.items(), rejects):
        assert expected in rej["error"], rej["error"]
        assert rej["payload"] == payload
    assert "upgrade" in rejects[1]["error"]

    # They were acknowledged: the same persistent session does not get them again. The broker resends
    # a session's unacknowledged messages first on reconnect, and keeps one publisher's order on a
    # topic and QoS, so a marker published now arrives after any of them.
    rx, got = start_receiver(mosquitto, store)
    marker = make_hit()
    pub.publish("checkpoint/v1/site-a/unit-1/hits", hit_message(marker), qos=1).wait_for_publish(5)
    wait_for(lambda: got, what="the marker hit")
    pub.loop_stop()
    rx.close()
    assert [g["id"] for g in got] == [marker.id]
    assert len(store.rejects()) == len(bad)
    store.close()


def test_shared_subscription_splits_hits_between_receivers(mosquitto, tmp_path):
    a_store, b_store = HitStore(tmp_path / "a.sqlite"), HitStore(tmp_path / "b.sqlite")
    a, got_a = start_receiver(mosquitto, a_store, "rx-a")
    b, got_b = start_receiver(mosquitto, b_store, "rx-b")
    pub = publisher(mosquitto)
    hits = [make_hit() for _ in range(40)]
    for h in hits:
        pub.publish("checkpoint/v1/site-a/unit-1/hits", hit_message(h), qos=1)
    wait_for(lambda: len(got_a) + len(got_b) >= 40, what="40 hits across both receivers")
    # A copy of a hit given to both would be queued in each session before any later message. Each
    # session gets its share in the publisher's order, but a marker reaches only one of them: send
    # markers, one at a time, until each receiver has had one; then nothing of the 40 is on its way.
    markers: set[str] = set()

    def ids(got: list[dict]) -> set[str]:
        return {g["id"] for g in got}

    while not (ids(got_a) & markers and ids(got_b) & markers):
        assert len(markers) < 10, "one receiver took every marker: the broker does not split the group"
        marker = make_hit()
        markers.add(marker.id)
        pub.publish("checkpoint/v1/site-a/unit-1/hits", hit_message(marker), qos=1).wait_for_publish(5)
        wait_for(lambda m=marker.id: m in ids(got_a) | ids(got_b), what="the marker")
    pub.loop_stop()
    a.close()
    b.close()
    ids_a, ids_b = ids(got_a) - markers, ids(got_b) - markers
    assert len(got_a) + len(got_b) == 40 + len(markers)
    assert ids_a | ids_b == {h.id for h in hits}
    assert not ids_a & ids_b
    assert ids_a and ids_b, "both receivers should take a share"


def test_hits_sent_while_the_receiver_is_down_wait_in_its_session(mosquitto, tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    rx, _ = start_receiver(mosquitto, store)
    rx.close()  # the session (and its shared subscription) stays on the broker
    reporter = MqttReporter(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, site="site-a", **FAST),
        OutboxConfig(path=tmp_path / "o.sqlite"),
        "unit-1",
    )
    hits = [make_hit() for _ in range(20)]
    for h in hits:
        reporter.submit(h)
    assert reporter.flush(10), "the broker accepts them for the offline receiver"
    rx, got = start_receiver(mosquitto, store)
    wait_for(lambda: len(got) == 20, what="queued hits after the receiver came back")
    assert [g["id"] for g in got] == [h.id for h in hits]
    reporter.close()
    rx.close()
    store.close()


def test_heartbeat_software_version_reaches_the_store(mosquitto, tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    rx, _ = start_receiver(mosquitto, store)
    reporter = MqttReporter(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, site="site-a", **FAST),
        OutboxConfig(path=tmp_path / "o.sqlite"),
        "unit-1",
        lambda: {"cameras_up": 2, "cameras_total": 3, "watchlist": {"version": 9}},
    )
    # Every unit sends its own software version (edge --version) in the heartbeat.
    wait_for(
        lambda: store.units() and store.units()[0]["software_version"] == software_version(), what="software version"
    )
    unit = store.units()[0]
    assert (unit["cameras_up"], unit["cameras_total"], unit["watchlist_version"]) == (2, 3, 9)
    reporter.close()
    rx.close()
    # The heartbeat is unsigned: what it claims is shown, never written into the audit chain.
    assert [e for e in store.audit_entries(limit=None) if e["action"] == "watchlist_seen"] == []
    store.close()


def test_unit_status_and_heartbeat_are_tracked(mosquitto, tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    changes: list[tuple[str, str, str]] = []
    rx = Receiver(rx_config(mosquitto), store, on_unit=lambda *c: changes.append(c))
    rx.start()
    wait_for(rx.subscribed.is_set, what="receiver subscribed")
    reporter = MqttReporter(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, site="site-a", **FAST),
        OutboxConfig(path=tmp_path / "o.sqlite"),
        "unit-1",
        lambda: {"cameras_up": 1},
    )
    wait_for(lambda: [u["health"] for u in store.units()] == ["online"], what="unit online")
    wait_for(lambda: store.units()[0]["heartbeat"] is not None, what="a heartbeat")
    unit = store.units()[0]
    assert unit["heartbeat"]["unit"] == {"cameras_up": 1}
    assert unit["heartbeat_interval_s"] == FAST["heartbeat_interval_s"]
    # No heartbeat for three intervals: stale, even without a Last Will.
    assert store.units(now=unit["last_heartbeat_at"] + 10)[0]["health"] == "stale"
    reporter.close()
    wait_for(lambda: [u["health"] for u in store.units()] == ["offline"], what="unit offline after shutdown")
    assert store.units()[0]["state_reason"] == "shutdown"
    rx.close()
    assert changes == [("site-a", "unit-1", "online"), ("site-a", "unit-1", "offline")]
    store.close()


def test_store_review_state_and_purge(tmp_path):
    store = HitStore(tmp_path / "hits.sqlite")
    fields, crop = records.decode_hit(hit_message(make_hit(crop=face_jpeg())))
    assert store.add_hit(fields, crop, received_at=time.time() - 100 * 86400)
    assert not store.add_hit(fields, crop)
    with pytest.raises(StoreError, match="review state"):
        store.hits(review_state="maybe")
    store.add_user("duty", "operator", "not-a-real-hash", actor="test")
    store.decide(fields["id"], "duty", "reject", "seen on camera: someone else")
    assert store.hits(review_state="rejected")[0]["reviewed_by"] == "duty"
    assert store.purge(90 * 86400) == 1
    assert store.count_hits() == 0 and store.crop(fields["id"]) is None
    store.close()


def test_cli_export_units_hits_review_crop(mosquitto, tmp_path):
    db = tmp_path / "hits.sqlite"
    store = HitStore(db)
    rx, _ = start_receiver(mosquitto, store)
    reporter = MqttReporter(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, site="site-a", **FAST),
        OutboxConfig(path=tmp_path / "o.sqlite"),
        "unit-1",
    )
    face = face_jpeg()
    hits = [make_hit(crop=face, person_id=f"person-{i}") for i in range(3)]
    for h in hits:
        reporter.submit(h)
    wait_for(lambda: store.count_hits() == 3, what="3 hits stored")
    reporter.close()
    rx.close()
    store.close()

    runner = CliRunner()
    out = tmp_path / "hits.jsonl"
    res = runner.invoke(cli, ["export", "--db", str(db), "--jsonl", str(out), "--with-crops"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in lines] == [h.id for h in hits]
    assert base64.b64decode(lines[0]["crop_jpeg_b64"]) == face
    assert lines[0]["review_state"] == "pending" and lines[0]["site"] == "site-a"

    res = runner.invoke(cli, ["units", "--db", str(db)])
    assert res.exit_code == 0 and "site-a/unit-1" in res.output and "offline" in res.output
    pw = tmp_path / "pw"
    pw.write_text("ops-password-1")
    for user in ("ops1", "ops2"):
        assert runner.invoke(cli, ["user", "add", "--db", str(db), "--password-file", str(pw), user]).exit_code == 0
    for user in ("ops1", "ops2"):
        res = runner.invoke(
            cli, ["review", "--db", str(db), hits[1].id[:8], "confirm", "--user", user, "--password-file", str(pw)]
        )
        assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["hits", "--db", str(db), "--state", "confirmed"])
    assert res.exit_code == 0 and hits[1].id in res.output and hits[0].id not in res.output
    res = runner.invoke(cli, ["crop", "--db", str(db), hits[2].id, "--out", str(tmp_path / "f.jpg")])
    assert res.exit_code == 0 and (tmp_path / "f.jpg").read_bytes() == face
    res = runner.invoke(cli, ["export", "--db", str(tmp_path / "none.sqlite"), "--jsonl", "-"])
    assert res.exit_code != 0 and "no hit store" in res.output
    for command in ("run", "serve", "export", "units", "hits", "review", "crop", "purge"):
        help_text = runner.invoke(cli, [command, "--help"]).output
        assert "Example:" in help_text and "checkpoint-receiver " in help_text


def test_cli_run_prints_one_line_per_new_hit_and_stops_on_sigterm(mosquitto, tmp_path):
    db = tmp_path / "hits.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "central.cli",
            "-v",
            "run",
            "--host",
            mosquitto.host,
            "--port",
            str(mosquitto.port),
            "--db",
            str(db),
            "--client-id",
            "cli-rx",
            "--reconnect-max-delay",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: "cli-rx 1 checkpoint/v1/+/+/heartbeat" in mosquitto.log_text(), what="CLI receiver subscribed")
        pub = publisher(mosquitto)
        hits = [make_hit(person_id="person-42") for _ in range(4)]
        # One duplicate, then the last hit as a marker: same publisher, topic and QoS, so it arrives
        # after the duplicate, and a line printed for the duplicate would come before its line.
        for h in hits[:3] + hits[:1] + hits[3:]:
            pub.publish("checkpoint/v1/site-a/unit-1/hits", hit_message(h), qos=1).wait_for_publish(5)
        pub.loop_stop()
        lines = [proc.stdout.readline() for _ in range(4)]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert rest == ""
    for h, line in zip(hits, lines, strict=True):
        assert " HIT " in line and "site-a/unit-1" in line and "person=person-42" in line and h.id in line, line
    assert "4 new hits, 1 duplicates dropped" in err


def test_cli_run_rejects_bad_options_with_the_key(tmp_path):
    res = CliRunner().invoke(cli, ["run", "--db", str(tmp_path / "h.sqlite"), "--unsigned", "reject"])
    assert res.exit_code == 2 and "unit_keys" in res.output, res.output
    (tmp_path / "keys").write_text("checkpoint-unit-key v1 site-a unit-1 not-base64\n")
    res = CliRunner().invoke(cli, ["run", "--db", str(tmp_path / "h.sqlite"), "--unit-keys", str(tmp_path / "keys")])
    assert res.exit_code == 2 and "keys:1: the key is not 32 bytes" in res.output, res.output
    res = CliRunner().invoke(cli, ["run", "--db", str(tmp_path / "h.sqlite"), "--port", "0"])
    assert res.exit_code == 2 and "port" in res.output
    res = CliRunner().invoke(cli, ["run", "--db", str(tmp_path / "h.sqlite"), "--ca-file", str(tmp_path / "x.pem")])
    assert res.exit_code == 2 and "tls.ca_file" in res.output


def test_cli_prints_unit_supplied_text_safely_and_survives_impossible_times(tmp_path):
    # What the decoder refuses today may already sit in an older store: the printing defends itself.
    db = tmp_path / "hits.sqlite"
    store = HitStore(db)
    forged_line = "\n2025-01-01T10:00:00Z  HIT  site-a/unit-1  camera=gate  person=P42"
    fields = dict(records.hit_record(make_hit(), "site-a\x1b[2J"), camera_id="cam" + forged_line, captured_at=1e300)
    store.add_hit(dict(fields, signature="valid"), None)
    store.set_unit_status("site-a\x1b[2J", "unit-1\r", "online", "connected", 1e300, time.time())
    store.close()
    runner = CliRunner()
    res = runner.invoke(cli, ["hits", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert len(res.output.splitlines()) == 1, res.output
    assert "camera=cam\\n2025-01-01T10:00:00Z  HIT" in res.output and "\x1b" not in res.output
    assert "<bad time 1e+300>" in res.output and "sig=valid" in res.output
    res = runner.invoke(cli, ["units", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "site-a\\x1b[2J/unit-1\\r" in res.output and "\r" not in res.output
