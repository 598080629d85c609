"""The MQTT reporter against a real Mosquitto: nothing lost through broker outages, kill -9 and
a full outbox; connection problems are reported and retried, never raised."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from central.receiver import Receiver, ReceiverConfig
from central.store import HitStore
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter, ReporterError
from edge.sinks import HitSink
from testing.broker import FAST, wait_for
from testing.hits import face_jpeg, make_hit, noise_jpeg, schema_errors
from wire import records

CHILD = Path(__file__).with_name("reporter_child.py")


def reporter_for(
    broker, tmp_path: Path, unit: str = "unit-1", outbox: OutboxConfig | None = None, status_provider=None, **overrides
) -> MqttReporter:
    cfg = MqttConfig(host=broker.host, port=broker.port, site="site-a", **{**FAST, **overrides})
    return MqttReporter(cfg, outbox or OutboxConfig(path=tmp_path / f"{unit}-outbox.sqlite"), unit, status_provider)


class Collected:
    """A receiver on the broker that remembers every new hit in arrival order."""

    def __init__(self, broker, tmp_path: Path, client_id: str = "test-receiver", **overrides) -> None:
        self.ids: list[str] = []
        self.rows: list[dict] = []
        self.store = HitStore(tmp_path / f"{client_id}.sqlite")
        cfg = ReceiverConfig(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            reconnect_min_delay_s=0.1,
            reconnect_max_delay_s=0.5,
            **overrides,
        )
        self.receiver = Receiver(cfg, self.store, on_hit=self._on_hit)
        self.receiver.start()

    def _on_hit(self, row: dict) -> None:
        self.ids.append(row["id"])
        self.rows.append(row)

    def wait_connected(self) -> Collected:
        wait_for(self.receiver.subscribed.is_set, what="receiver subscribed")
        return self

    def close(self) -> None:
        self.receiver.close()
        self.store.close()


@pytest.fixture
def collect(request, tmp_path):
    """Start receivers: `collect()` on the `mosquitto` broker, `collect(broker, **config)` elsewhere."""
    made: list[Collected] = []

    def make(broker=None, **kw) -> Collected:
        c = Collected(broker or request.getfixturevalue("mosquitto"), tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_reporter_is_a_hit_sink_and_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValidationError, match="port"):
        MqttConfig(site="s", port=70000)
    with pytest.raises(ValidationError, match="tls.ca_file"):
        MqttConfig(site="s", tls={"ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(ValidationError, match="password_file"):
        MqttConfig(site="s", username="u", password_file=str(tmp_path / "nope"))
    with pytest.raises(ValidationError, match="site"):
        MqttConfig(site="a/b")
    with pytest.raises(ValidationError, match="keepalive"):
        MqttConfig(site="s", keepalive=10)
    r = MqttReporter(MqttConfig(site="s"), OutboxConfig(path=tmp_path / "o.sqlite"), "unit-1", start=False)
    assert isinstance(r, HitSink)
    with pytest.raises(ReporterError, match="unit-2"):
        r.submit(make_hit(unit_id="unit-2"))
    r.close(0.1)


def test_hits_status_and_heartbeat_follow_the_schemas(mosquitto, tmp_path, collect, payload_schemas):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    raw: list[tuple[str, bytes, bool]] = []
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=mqtt.MQTTv5)
    spy.on_message = lambda _c, _u, m: raw.append((m.topic, bytes(m.payload), bool(m.retain)))
    spy.connect(mosquitto.host, mosquitto.port)
    spy.subscribe("checkpoint/#", qos=1)
    spy.loop_start()
    rx = collect().wait_connected()

    face = face_jpeg()
    reporter = reporter_for(
        mosquitto, tmp_path, status_provider=lambda: {"cameras_up": 2, "fps": 12.5, "watchlist_version": 4}
    )
    hits = [make_hit(crop=face, person_id="person-1"), make_hit(person_id="person-2")]
    for h in hits:
        reporter.submit(h)
    wait_for(lambda: len(rx.ids) == 2, what="2 hits at the receiver")
    wait_for(lambda: any(t.endswith("/heartbeat") for t, _, _ in raw), what="a heartbeat")
    reporter.close()
    wait_for(lambda: any(b'"offline"' in p for t, p, _ in raw if t.endswith("/status")), what="offline status")
    spy.loop_stop()
    spy.disconnect()

    assert rx.ids == [h.id for h in hits]
    assert rx.store.crop(hits[0].id) == face
    assert rx.store.crop(hits[1].id) is None
    kinds = Counter(t.rsplit("/", 1)[1] for t, _, _ in raw)
    assert kinds["hits"] == 2 and kinds["status"] >= 2 and kinds["heartbeat"] >= 1 and kinds["verdicts"] >= 1
    for t, payload, _ in raw:
        kind = {"hits": "hit", "verdicts": "verdict"}.get(t.rsplit("/", 1)[1], t.rsplit("/", 1)[1])
        body = json.loads(payload)
        assert schema_errors(body, payload_schemas[kind]) == [], (t, body)
        assert t.startswith("checkpoint/v1/site-a/unit-1/")
    hb = json.loads(next(p for t, p, _ in raw if t.endswith("/heartbeat")))
    assert hb["unit"] == {"cameras_up": 2, "fps": 12.5, "watchlist_version": 4}
    assert hb["outbox"]["max_bytes"] == OutboxConfig(path=tmp_path / "x").max_bytes
    states = [json.loads(p)["state"] for t, p, _ in raw if t.endswith("/status")]
    assert states[0] == "online" and states[-1] == "offline"
    # The receiver decodes exactly what the schema allows: required keys match.
    assert set(payload_schemas["hit"]["required"]) == set(records.HIT_FIELDS) | {
        "schema",
        "v",
        "box",
        "crop_jpeg_b64",
        "crop_dropped",
    }


def test_broker_outage_every_hit_arrives_exactly_once(mosquitto, tmp_path, collect):
    rx = collect().wait_connected()
    reporter = reporter_for(mosquitto, tmp_path)
    sent: list[str] = []

    def produce(n: int) -> None:
        for _ in range(n):
            h = make_hit(crop=noise_jpeg(2_000))
            reporter.submit(h)
            sent.append(h.id)

    produce(40)
    wait_for(lambda: len(rx.ids) >= 10, what="first hits arriving")
    mosquitto.stop()
    produce(60)  # while the broker is down: these wait in the outbox on disk
    wait_for(lambda: reporter.state != "connected", what="reporter noticing the outage")
    assert reporter.outbox.depth >= 60
    # Retried, not given up: two more refused attempts while the broker stays down.
    attempts = reporter.link.connect_attempts
    wait_for(lambda: reporter.link.connect_attempts >= attempts + 2, what="attempts to reconnect during the outage")
    assert reporter.last_error and "refused" in reporter.last_error
    mosquitto.start()
    produce(40)
    wait_for(lambda: len(rx.ids) >= len(sent), timeout=30, what="all hits after the restart")
    assert reporter.flush(10)
    # A duplicate of a hit would be published before the marker, on the same topic, QoS and
    # connection, and the broker keeps that order to the receiver's session: once the marker is in,
    # nothing sent earlier is still on its way.
    marker = make_hit()
    reporter.submit(marker)
    wait_for(lambda: marker.id in rx.ids, what="the marker hit sent last")
    reporter.close()
    ids = rx.ids[:]
    assert ids.pop() == marker.id, "the marker came last"

    assert sorted(ids) == sorted(sent), "every hit exactly once"
    assert Counter(ids).most_common(1)[0][1] == 1
    assert rx.store.count_hits() == len(sent) + 1
    # Order is kept except where the broker refused a publish while the receiver's shared
    # subscription was not yet back (docs/protocol.md, "Delivery guarantees"): a refused hit is
    # retried after later ones. What must hold: the held hits come after those sent before.
    pos = {hid: i for i, hid in enumerate(ids)}
    assert max(pos[h] for h in sent[:10]) < min(pos[h] for h in sent[40:100])
    assert reporter.link.connects >= 2


def test_kill_9_with_hits_pending_then_restart_delivers_all(mosquitto, tmp_path, collect):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    outbox = tmp_path / "child-outbox.sqlite"
    args = [sys.executable, str(CHILD), "--port", str(mosquitto.port), "--outbox", str(outbox)]
    # The unit's retained status, watched without subscribing to hits: 'online' means it connected,
    # and so left its Last Will with the broker before the kill.
    status: list[bytes] = []
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="status-spy", protocol=mqtt.MQTTv5)
    spy.on_message = lambda _c, _u, m: status.append(bytes(m.payload))
    spy.connect(mosquitto.host, mosquitto.port)
    spy.subscribe("checkpoint/v1/site-a/unit-1/status", qos=1)
    spy.loop_start()
    # No receiver yet: the broker answers "no matching subscribers", so the hits stay pending.
    child = subprocess.Popen(args + ["--count", "50", "--prefix", "k"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "submitted 50"
        wait_for(lambda: any(b'"online"' in p for p in status), what="the child unit online")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        spy.loop_stop()
        spy.disconnect()
    assert child.returncode == -signal.SIGKILL
    con = sqlite3.connect(outbox)
    pending = [r[0] for r in con.execute("SELECT hit_id FROM outbox ORDER BY seq")]
    con.close()
    assert pending == [f"k-{i:05d}" for i in range(50)]

    rx = collect().wait_connected()
    # The broker sent the Last Will when the process died; the retained status says so.
    wait_for(lambda: [u["health"] for u in rx.store.units()] == ["offline"], what="unit shown offline")

    # The marker goes out after the 50 are delivered, on the same topic, QoS and connection: the
    # broker keeps that order, so once it is in, a duplicate of any of the 50 would be in too.
    done = subprocess.run(
        args + ["--drain", "--timeout", "20", "--marker", "k-marker"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: "k-marker" in rx.ids, what="50 hits and the marker after the restart")
    assert rx.ids == [f"k-{i:05d}" for i in range(50)] + ["k-marker"], "all, once, in order"


def test_unreachable_broker_is_retried_and_reported(broker_factory, tmp_path):
    broker = broker_factory()  # made, never started: nobody listens on its port
    reporter = reporter_for(broker, tmp_path, require_subscriber=False)
    reporter.submit(make_hit())
    wait_for(lambda: reporter.link.connect_attempts >= 3, what="several connection attempts")
    assert reporter.state in ("connecting", "disconnected")
    assert "connection refused" in reporter.last_error and str(broker.port) in reporter.last_error
    assert reporter.stats()["pending"] == 1
    broker.start()
    wait_for(lambda: reporter.state == "connected", what="connection once the broker is up")
    assert reporter.flush(5)
    assert reporter.last_error is None
    reporter.close(1.0)


def test_wrong_credentials_are_retried_and_reported(broker_factory, tmp_path):
    broker = broker_factory(users={"unit-1": "right-secret"}).start()
    reporter = reporter_for(broker, tmp_path, username="unit-1", password="wrong-secret")
    reporter.submit(make_hit())
    wait_for(lambda: reporter.link.connect_attempts >= 3, what="several connection attempts")
    assert reporter.state != "connected"
    assert "refused the connection" in reporter.last_error
    assert "username" in reporter.last_error
    assert reporter.outbox.depth == 1
    reporter.close(0.5)


def test_the_documented_acl_lets_units_publish_only_their_own_topics(broker_factory, tmp_path, collect):
    acl = "pattern write checkpoint/v1/+/%u/#\nuser ops\ntopic read checkpoint/v1/#\n"
    broker = broker_factory(users={"unit-1": "pw1", "unit-2": "pw2", "ops": "ops-pw"}, acl=acl).start()
    rx = collect(broker, username="ops", password="ops-pw").wait_connected()
    own = reporter_for(broker, tmp_path, username="unit-1", password="pw1")
    # unit-2's credentials used for another unit's topics: the broker drops the connection.
    other = reporter_for(broker, tmp_path, unit="unit-3", username="unit-2", password="pw2")
    h = make_hit()
    own.submit(h)
    other.submit(make_hit(unit_id="unit-3"))
    wait_for(lambda: rx.ids == [h.id], what="the permitted hit")
    wait_for(lambda: other.last_error and other.link.connects >= 2, what="the refused unit retrying")
    assert "ACL" in other.last_error
    assert other.outbox.depth == 1
    own.close()
    other.close(0.2)


def test_password_file_and_311_fallback(broker_factory, tmp_path, collect):
    broker = broker_factory(users={"unit-1": "s3cret", "ops": "ops-pw"}).start()
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    rx = collect(broker, username="ops", password="ops-pw").wait_connected()
    reporter = reporter_for(broker, tmp_path, username="unit-1", password_file=pw, protocol="3.1.1")
    h = make_hit(crop=face_jpeg())
    reporter.submit(h)
    wait_for(lambda: rx.ids == [h.id], what="the hit over MQTT 3.1.1")
    reporter.close()


def test_tls_with_client_certificate_and_a_wrong_ca(broker_factory, tmp_path, tls_files, collect):
    broker = broker_factory(tls=tls_files, require_certificate=True).start()
    client_tls = {"ca_file": tls_files.ca, "cert_file": tls_files.client_cert, "key_file": tls_files.client_key}
    rx = collect(broker, tls=client_tls).wait_connected()

    wrong = reporter_for(broker, tmp_path, unit="unit-w", tls={**client_tls, "ca_file": tls_files.wrong_ca})
    wrong.submit(make_hit(unit_id="unit-w"))
    wait_for(lambda: wrong.link.connect_attempts >= 2 and wrong.last_error, what="TLS failures")
    assert wrong.state != "connected"
    assert "certificate" in wrong.last_error and "tls.ca_file" in wrong.last_error
    assert wrong.outbox.depth == 1
    wrong.close(0.2)

    no_cert = reporter_for(broker, tmp_path, unit="unit-n", tls={"ca_file": tls_files.ca})
    wait_for(lambda: no_cert.link.connect_attempts >= 2 and no_cert.last_error, what="missing client cert refusal")
    assert no_cert.state != "connected"
    assert "tls.cert_file" in no_cert.last_error
    no_cert.close(0.2)

    good = reporter_for(broker, tmp_path, unit="unit-g", tls=client_tls)
    h = make_hit(unit_id="unit-g")
    good.submit(h)
    wait_for(lambda: rx.ids == [h.id], what="the hit over TLS")
    good.close()


def test_full_outbox_and_oversized_crops_follow_the_policy_and_show_in_the_heartbeat(broker_factory, tmp_path, collect):
    broker = broker_factory()  # down while the hits pile up
    crop = noise_jpeg(20_000)
    big = noise_jpeg(40_000, seed=1)
    outbox = OutboxConfig(
        path=tmp_path / "o.sqlite", max_bytes=4 * len(crop) + len(crop) // 2, max_crop_bytes=len(crop) + 100
    )
    reporter = reporter_for(broker, tmp_path, outbox=outbox)
    oversized = make_hit(crop=big)
    reporter.submit(oversized)
    hits = [make_hit(crop=crop) for _ in range(300)]
    for h in hits:
        reporter.submit(h)
    stats = reporter.stats()
    assert stats["crops_dropped_oversized"] == 1
    assert stats["crops_dropped_full"] >= 4
    assert stats["hits_dropped_full"] > 0
    assert stats["pending_bytes"] <= outbox.max_bytes

    broker.start()
    rx = collect(broker).wait_connected()
    wait_for(lambda: len(rx.ids) == stats["pending"], what="the hits that were kept")
    wait_for(
        lambda: any(u["heartbeat"] and u["heartbeat"]["outbox"]["sent"] == len(rx.ids) for u in rx.store.units()),
        what="a heartbeat with the figures after sending",
    )
    reporter.close()
    kept = rx.ids
    assert kept == [h.id for h in hits][-len(kept) :], "the newest hits are kept, in order"
    rows = {r["id"]: r for r in rx.rows}
    assert all(rows[i]["crop_dropped"] == "outbox_full" and not rows[i]["has_crop"] for i in kept)
    hb = rx.store.units()[0]["heartbeat"]["outbox"]
    assert hb["crops_dropped_oversized"] == 1
    assert hb["hits_dropped_full"] == 301 - len(kept)
    assert hb["accepted"] == 301 and hb["sent"] == len(kept)


def test_no_subscriber_keeps_hits_until_a_receiver_comes(mosquitto, tmp_path, collect):
    reporter = reporter_for(mosquitto, tmp_path)
    hits = [make_hit() for _ in range(3)]
    for h in hits:
        reporter.submit(h)
    wait_for(lambda: reporter.last_error and "no subscriber" in reporter.last_error, what="no-subscriber report")
    assert reporter.outbox.depth == 3
    rx = collect().wait_connected()
    wait_for(lambda: len(rx.ids) == 3, what="held hits after the receiver subscribed")
    assert rx.ids == [h.id for h in hits]
    reporter.close()


def test_submit_never_waits_for_the_network(broker_factory, tmp_path):
    broker = broker_factory()  # never started
    reporter = reporter_for(broker, tmp_path, connect_timeout_s=5)
    done = threading.Event()

    def submit_many() -> None:
        for _ in range(20):
            reporter.submit(make_hit())
        done.set()

    threading.Thread(target=submit_many).start()
    assert done.wait(10), "submit blocked while the broker is unreachable"
    assert reporter.outbox.depth == 20
    reporter.close(0.2)
