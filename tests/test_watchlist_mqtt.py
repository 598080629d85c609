"""Live updates over a real Mosquitto broker: chunked retained bundles, deltas, refusals, revocation."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from matching.matcher import Matcher
from testing.broker import wait_for
from testing.synthetic import Authority, make_persons, person_centers, register_release, samples_of, unit_rows
from tests.services import missing_service
from watchlist.format.keys import generate_key, key_id, make_keyset
from watchlist.format.transport import Manifest, manifest_topic
from watchlist.hq.publish import publish_bundle, publish_keyset
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.subscriber import WatchlistSubscriber
from wire.mqtt import MqttConnection

MODEL = "synthetic:v1"
TOPIC = "checkpoint/site-7/watchlist"


def _list(n: int, seed: int, prefix: str = "case"):
    centers = person_centers(n, seed=seed)
    return make_persons([f"{prefix}-{i:04d}" for i in range(n)], 2), samples_of(centers, 2, seed=seed + 1), centers


@pytest.fixture
def hq() -> Authority:
    return Authority(model_id=MODEL, threshold=0.5)


@pytest.fixture
def unit(tmp_path: Path, hq: Authority, mosquitto):
    cfg = WatchlistConfig(
        root_key=hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db", topic=TOPIC, max_bundle_bytes=200_000
    )
    wl = Watchlist(cfg, Matcher(), MODEL)
    wl.start()
    subs: list[WatchlistSubscriber] = []

    def connect() -> WatchlistSubscriber:
        sub = WatchlistSubscriber(wl, TOPIC, host=mosquitto.host, port=mosquitto.port, tick_interval_s=0.5)
        sub.start()
        subs.append(sub)
        wait_for(lambda: sub.connected, what="sub.connected")
        return sub

    wl.connect = connect
    yield wl
    for s in subs:
        s.stop()
    wl.close()


def _publish(broker, data: bytes, chunk_bytes: int = 4096, snapshot: bytes | None = None) -> Manifest:
    return publish_bundle(data, TOPIC, snapshot=snapshot, host=broker.host, port=broker.port, chunk_bytes=chunk_bytes)


def _after(persons, emb, removed=(), added=None):
    """The persons and rows of a list after removing `removed` and adding `added` (persons, rows)."""
    keep = [i for i, p in enumerate(persons) if p.person_id not in removed]
    rows = emb.reshape(len(persons), -1, emb.shape[1])[keep].reshape(-1, emb.shape[1])
    persons = tuple(persons[i] for i in keep)
    if added is not None:
        persons, rows = persons + tuple(added[0]), np.concatenate([rows, added[1]])
    return persons, rows


def test_full_then_delta_over_mqtt_with_a_unit_that_joins_late(unit: Watchlist, hq: Authority, mosquitto) -> None:
    persons, emb, centers = _list(60, seed=1)
    full = hq.bundle(1, persons, emb)
    m = _publish(mosquitto, full)
    assert m.chunks > 5  # really chunked
    sub = unit.connect()  # joins after the publication: retained messages bring the list
    wait_for(lambda: unit.version == 1, what=lambda: f"unit.version == 1: {unit.status()}")
    leaver = unit_rows(centers[[9]])
    assert unit.matcher.match(leaver)[0].person_id == "case-0009"

    # While the cameras match continuously, HQ publishes a delta removing a found person.
    stop, errors, calls = threading.Event(), [], [0]
    keeper = unit_rows(centers[[3]])

    def camera() -> None:
        while not stop.is_set():
            try:
                m = unit.matcher.match(keeper)[0]
                if m is None or m.person_id != "case-0003":
                    errors.append(m)
                calls[0] += 1
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

    cam = threading.Thread(target=camera)
    cam.start()
    new_p, new_e, new_c = _list(3, seed=2, prefix="new")
    t0 = time.monotonic()
    after = _after(persons, emb, ("case-0009",), (new_p, new_e))
    _publish(
        mosquitto,
        hq.bundle(2, new_p, new_e, kind="delta", base=1, removed=("case-0009",)),
        snapshot=hq.bundle(2, *after),
    )
    wait_for(lambda: unit.version == 2, what="unit.version == 2")
    took = time.monotonic() - t0
    stop.set()
    cam.join()
    assert not errors and calls[0] > 0
    assert unit.matcher.match(leaver) == [None]
    assert unit.matcher.match(unit_rows(new_c[[2]]))[0].person_id == "new-0002"
    assert took < 5.0  # "within seconds of the bundle's arrival"
    # The full snapshot of version 2 went out after the delta: a unit in step did not fetch it.
    # Manifests seen: full 1 (retained at the start), then delta 2 and full 2.
    wait_for(lambda: sub.status()["received"]["manifest"] == 3, what=lambda: f"three manifests: {sub.status()}")
    assert sub.wait_idle()
    assert sub.downloads == 2 and sub.fetches == 2 and unit.status()["rejections_since_start"] == 0
    assert sub.status()["behind"] is None


def test_old_chunks_are_cleared_when_a_new_version_is_published(hq: Authority, mosquitto) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    p1, e1, _ = _list(20, seed=3)
    _publish(mosquitto, hq.bundle(1, p1, e1))
    _publish(mosquitto, hq.bundle(2, p1, e1))
    seen: dict[str, bytes] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    c.on_message = lambda cl, u, msg: seen.__setitem__(msg.topic, msg.payload) if msg.retain else None
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    marker = threading.Event()
    c.message_callback_add(f"{TOPIC}/full/marker", lambda cl, u, msg: marker.set())
    c.subscribe(f"{TOPIC}/full/#", qos=1)
    # The broker sends the retained messages at the subscription, before anything published after it.
    c.publish(f"{TOPIC}/full/marker", b"", qos=1)
    assert marker.wait(15), "the marker published after subscribing never came back"
    c.disconnect()
    c.loop_stop()
    versions = {t.split("/")[-2] for t in seen if not t.endswith(("manifest", "marker"))}
    assert versions == {"2"}
    assert Manifest.from_bytes(seen[manifest_topic(TOPIC, "full")]).version == 2


def test_tampered_and_oversized_bundles_are_refused_once(unit: Watchlist, hq: Authority, mosquitto) -> None:
    persons, emb, _ = _list(10, seed=4)
    data = bytearray(hq.bundle(1, persons, emb))
    data[-300] ^= 1
    sub = unit.connect()
    _publish(mosquitto, bytes(data))
    wait_for(lambda: unit.status()["last_rejection"] is not None, what='unit.status()["last_rejection"] is not None')
    assert unit.status()["last_rejection"]["reason"] == "bad_signature" and unit.version == 0
    # The worker re-evaluates the retained manifest again and again: the same bytes are not
    # fetched and refused again.
    for _ in range(5):
        sub._work.put(("evaluate", None))
    assert sub.wait_idle()
    assert unit.status()["rejections_since_start"] == 1 and sub.fetches == 1

    big_p, big_e, _ = _list(500, seed=5)
    _publish(mosquitto, hq.bundle(2, big_p, big_e), chunk_bytes=64 * 1024)
    wait_for(
        lambda: unit.status()["last_rejection"]["reason"] == "oversized",
        what='unit.status()["last_rejection"]["reason"] == "oversized"',
    )
    assert unit.version == 0

    _publish(mosquitto, hq.bundle(3, persons, emb))
    wait_for(lambda: unit.version == 3, what="unit.version == 3")


def test_revocation_published_on_the_keyset_topic(unit: Watchlist, hq: Authority, mosquitto) -> None:
    persons, emb, centers = _list(10, seed=6)
    unit.connect()
    _publish(mosquitto, hq.bundle(1, persons, emb))
    wait_for(lambda: unit.version == 1, what="unit.version == 1")
    stolen = hq.signing
    revoking = make_keyset(hq.root, 2, [generate_key().public_key()], [key_id(stolen.public_key())])
    publish_keyset(revoking, TOPIC, host=mosquitto.host, port=mosquitto.port)
    wait_for(lambda: unit.status()["keyset_serial"] == 2, what='unit.status()["keyset_serial"] == 2')
    # A bundle from whoever holds the stolen key (with the old key set inside) is refused.
    _publish(mosquitto, hq.bundle(2, persons, np.flipud(emb).copy(), kind="full"))
    wait_for(
        lambda: (unit.status()["last_rejection"] or {}).get("reason") == "revoked_key",
        what='(unit.status()["last_rejection"] or {}).get("reason") == "revoked_key"',
    )
    assert unit.version == 1 and unit.matcher.match(unit_rows(centers[[0]]))[0].person_id == "case-0000"


def test_a_keyset_flood_is_bounded_counted_and_recorded_once(unit: Watchlist, hq: Authority, mosquitto) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from watchlist.format.keys import MAX_KEYSET_BYTES

    sub = unit.connect()
    flood = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="keyset-flood", protocol=mqtt.MQTTv5)
    flood.connect(mosquitto.host, mosquitto.port)
    flood.loop_start()
    topic = f"{TOPIC}/keyset"
    garbage = [bytes([n % 251]) * MAX_KEYSET_BYTES for n in range(300)]  # each different, none a key set
    # While a list is being applied (it holds the list's lock), the sync worker is stuck behind it:
    # the flood piles up in front of the worker instead of being handled as it comes.
    with unit._lock:
        for payload in garbage:
            flood.publish(topic, payload, qos=1)
        for _ in range(20):
            flood.publish(topic, b"\0" * (MAX_KEYSET_BYTES + 1), qos=1)
        flood.publish(topic, garbage[0], qos=1).wait_for_publish(10)
        wait_for(lambda: sub.status()["received"]["keyset"] == 321, what=lambda: f"the flood: {sub.status()}")
        assert sub.status()["queue_max_seen"] <= 2, "one pending key set, not one per message"
    assert sub.wait_idle()
    st = sub.status()
    assert st["dropped"]["keyset_oversized"] == 20
    refused = unit.status()["rejections_since_start"] + st["rejections_not_recorded"]
    assert st["dropped"]["keyset_superseded"] + refused == 301, "every key set is either checked or counted"
    assert st["dropped"]["keyset_superseded"] == 299, "all but the first (the worker was on it) and the last"
    assert st["queue_max_seen"] <= 2
    # One store write for the reason, however many came.
    assert [e["reason"] for e in unit.store.events(limit=1000) if e["kind"] == "rejected"] == ["not_a_bundle"]
    # The flood wedged nothing: a real key set published next is taken.
    publish_keyset(
        make_keyset(hq.root, 2, [hq.signing.public_key()], []), TOPIC, host=mosquitto.host, port=mosquitto.port
    )
    wait_for(lambda: unit.status()["keyset_serial"] == 2, what='unit.status()["keyset_serial"] == 2')
    flood.loop_stop()
    flood.disconnect()


# ---- one MQTT link for every client: accounts, TLS, refusals (issue 11) ----------------------------

SECURE_TOPIC = "checkpoint/v1/site-7/watchlist"  # the deploy/ layout: checkpoint/v1/<site>/watchlist
SECURE_ACL = "pattern read checkpoint/v1/%u/#\nuser hq\ntopic readwrite checkpoint/v1/+/watchlist/#\n"


def _cli(*args: object):
    from click.testing import CliRunner

    from watchlist.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _secure_broker(broker_factory, **kw):
    users = {"hq": "hq-secret", "site-7/watchlist": "reader-secret", "site-8/watchlist": "other-secret"}
    return broker_factory(users=users, acl=SECURE_ACL, **kw).start()


def test_publish_with_an_account_and_a_unit_that_reads_with_its_site_account(
    tmp_path: Path, hq: Authority, broker_factory
) -> None:
    broker = _secure_broker(broker_factory)
    (tmp_path / "hq.pw").write_text("hq-secret\n")
    persons, emb, _ = _list(10, seed=11)
    (tmp_path / "v1.cpwl").write_bytes(hq.bundle(1, persons, emb))
    register = register_release(tmp_path / "hq.db", (tmp_path / "v1.cpwl").read_bytes())
    common = ["--topic", SECURE_TOPIC, "--host", broker.host, "--port", broker.port, "--chunk-bytes", 4096]
    common += ["--register", register]
    done = _cli("publish", tmp_path / "v1.cpwl", *common, "--username", "hq", "--password-file", tmp_path / "hq.pw")
    assert done.exit_code == 0, done.output
    (tmp_path / "reader.pw").write_text("reader-secret\n")
    cfg = WatchlistConfig(root_key=hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db", topic=SECURE_TOPIC)
    wl = Watchlist(cfg, Matcher(), MODEL)
    wl.start()
    conn = MqttConnection(
        host=broker.host, port=broker.port, username="site-7/watchlist", password_file=tmp_path / "reader.pw"
    )
    sub = WatchlistSubscriber(wl, SECURE_TOPIC, connection=conn, tick_interval_s=0.2)
    sub.start()
    try:
        wait_for(lambda: wl.version == 1, what=lambda: f"wl.version == 1: {(wl.status(), sub.status())}")
    finally:
        sub.stop()
        wl.close()


def test_publish_fails_fast_and_clearly(tmp_path: Path, hq: Authority, broker_factory, tls_files) -> None:
    broker = _secure_broker(broker_factory)
    (tmp_path / "wrong.pw").write_text("not-the-password\n")
    persons, emb, _ = _list(5, seed=12)
    (tmp_path / "v1.cpwl").write_bytes(hq.bundle(1, persons, emb))
    register = register_release(tmp_path / "hq.db", (tmp_path / "v1.cpwl").read_bytes())
    common = ["--topic", SECURE_TOPIC, "--host", broker.host, "--chunk-bytes", 4096, "--timeout", 30]
    common += ["--register", register]

    t0 = time.monotonic()
    done = _cli("publish", tmp_path / "v1.cpwl", *common, "--port", broker.port)  # anonymous
    assert done.exit_code == 2 and "not authorised" in done.output, done.output
    done = _cli(
        "publish", tmp_path / "v1.cpwl", *common, "--port", broker.port, "--username", "hq",
        "--password-file", tmp_path / "wrong.pw",
    )  # fmt: skip
    assert done.exit_code == 2 and "not authorised" in done.output, done.output
    assert time.monotonic() - t0 < 15, "a refusal must not wait for the 30 s timeout"

    # An account that may read but not write the topics: the PUBACK refusal is reported.
    (tmp_path / "reader.pw").write_text("reader-secret\n")
    done = _cli(
        "publish", tmp_path / "v1.cpwl", "--topic", SECURE_TOPIC, "--host", broker.host, "--port", broker.port,
        "--username", "site-7/watchlist", "--password-file", tmp_path / "reader.pw", "--register", register,
    )  # fmt: skip
    assert done.exit_code == 2 and "not authorised" in done.output and "ACL" in done.output, done.output

    nobody = broker_factory()  # made, never started
    done = _cli("publish", tmp_path / "v1.cpwl", *common, "--port", nobody.port)
    assert done.exit_code == 2 and "unreachable" in done.output, done.output

    tls = broker_factory(tls=tls_files).start()
    done = _cli("publish", tmp_path / "v1.cpwl", *common, "--port", tls.port, "--ca-file", tls_files.wrong_ca)
    assert done.exit_code == 2 and "certificate" in done.output, done.output
    done = _cli("publish", tmp_path / "v1.cpwl", *common, "--port", tls.port, "--ca-file", tls_files.ca)
    assert done.exit_code == 0, done.output


def test_the_subscriber_follows_disconnects_and_reconnects(unit: Watchlist, hq: Authority, broker_factory) -> None:
    broker = broker_factory().start()
    conn = MqttConnection(host=broker.host, port=broker.port, reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.5)
    sub = WatchlistSubscriber(unit, TOPIC, connection=conn, tick_interval_s=0.2)
    sub.start()
    try:
        wait_for(lambda: sub.connected, what="sub.connected")
        broker.stop()
        wait_for(lambda: not sub.connected, what="connected must fall when the broker goes")
        assert sub.status()["state"] == "disconnected"
        broker.start()
        wait_for(lambda: sub.connected, what=lambda: f"sub.connected: {sub.status()}")
        persons, emb, _ = _list(5, seed=13)
        _publish(broker, hq.bundle(1, persons, emb))
        wait_for(lambda: unit.version == 1, what="unit.version == 1")
    finally:
        sub.stop()


def test_a_manifest_of_size_10_to_the_400_does_not_kill_the_network_thread(
    unit: Watchlist, hq: Authority, mosquitto, caplog
) -> None:
    import paho.mqtt.publish as single

    sub = unit.connect()
    bad = json.dumps(
        {
            "kind": "full", "version": 9, "base_version": None, "size": 10**400, "sha256": "0" * 64,
            "chunk_bytes": 1024, "chunks": 1, "published_at": 1.0,
        }
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="watchlist.unit.subscriber"):
        single.single(
            manifest_topic(TOPIC, "full"), bad, qos=1, retain=True, hostname=mosquitto.host, port=mosquitto.port
        )
        wait_for(lambda: "manifest" in caplog.text, what='"manifest" in caplog.text')
    assert sub.client._thread is not None and sub.client._thread.is_alive()
    persons, emb, _ = _list(5, seed=14)
    _publish(mosquitto, hq.bundle(1, persons, emb))
    wait_for(lambda: unit.version == 1, what="the subscriber must still work after the bad manifest")


def test_a_subscription_the_acl_silently_refuses_is_reported(unit: Watchlist, tmp_path: Path, broker_factory) -> None:
    broker = _secure_broker(broker_factory)
    (tmp_path / "other.pw").write_text("other-secret\n")
    # site-8's account on site-7's list: Mosquitto grants the subscription and delivers nothing.
    conn = MqttConnection(
        host=broker.host, port=broker.port, username="site-8/watchlist", password_file=tmp_path / "other.pw"
    )
    sub = WatchlistSubscriber(unit, SECURE_TOPIC, connection=conn, tick_interval_s=0.1, silence_warning_s=0.5)
    sub.start()
    try:
        wait_for(lambda: sub.status()["last_error"] is not None, what='sub.status()["last_error"] is not None')
        err = sub.status()["last_error"]
        assert "site-8/watchlist" in err and "ACL" in err and SECURE_TOPIC in err
    finally:
        sub.stop()


def test_a_refused_subscription_is_reported_with_its_topic(unit: Watchlist, tmp_path: Path, broker_factory) -> None:
    """Mosquitto's dynamic-security plugin answers a forbidden SUBSCRIBE with a SUBACK failure."""
    import shutil
    import subprocess

    from testing.broker import HOST

    plugins = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    ctrl = shutil.which("mosquitto_ctrl")
    if not plugins or ctrl is None:
        missing_service("needs Mosquitto's dynamic-security plugin and mosquitto_ctrl (Debian package mosquitto)")
    plugin = plugins[0]
    work = tmp_path / "dynsec"
    work.mkdir()
    subprocess.run(
        [ctrl, "dynsec", "init", str(work / "dynsec.json"), "admin", "admin-pw"], check=True, capture_output=True
    )
    broker = broker_factory()
    conf = broker.conf_path.read_text().replace("allow_anonymous true\n", "")
    conf += f"plugin {plugin}\nplugin_opt_config_file {work / 'dynsec.json'}\n"
    broker.conf_path.write_text(conf)
    broker.start()
    admin = [ctrl, "-h", HOST, "-p", str(broker.port), "-u", "admin", "-P", "admin-pw", "dynsec"]
    subprocess.run(admin + ["createClient", "site-9/watchlist", "-p", "pw9"], check=True, capture_output=True)
    conn = MqttConnection(host=HOST, port=broker.port, username="site-9/watchlist", password="pw9")
    sub = WatchlistSubscriber(unit, SECURE_TOPIC, connection=conn, tick_interval_s=0.1)
    sub.start()
    try:
        wait_for(lambda: sub.refused, what=lambda: f"sub.refused: {sub.status()}")
        assert manifest_topic(SECURE_TOPIC, "full") in sub.refused
        err = sub.status()["last_error"]
        assert "refused the subscription" in err and manifest_topic(SECURE_TOPIC, "full") in err and "ACL" in err
    finally:
        sub.stop()
