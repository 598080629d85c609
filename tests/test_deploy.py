"""The site as files: Mosquitto runs with deploy/mosquitto/checkpoint.conf and deploy/mosquitto/acl
themselves (only the folder of the certificates, generated here, and the port are replaced), with
accounts made by deploy/make-credentials. Units publish their own topics and read their own site's
list, and nothing else; HQ writes the lists; receivers read the hits; wrong passwords and CAs fail
fast and clearly (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from matching.matcher import Matcher
from testing.broker import HOST, make_tls_files, wait_for
from testing.hits import face_jpeg, make_hit
from testing.site import Probe, Site, make_site_credentials, start_deployed_broker
from testing.synthetic import Authority, make_persons, person_centers, register_release, samples_of
from watchlist.hq.publish import publish_bundle
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.subscriber import WatchlistSubscriber
from wire.mqtt import MqttLink
from wire.signing import KnownKeys, Verdict, verify_record

MODEL = "synthetic:v1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, mosquitto_bin: str):
    creds = tmp_path_factory.mktemp("creds")
    unit_keys = make_site_credentials(creds)
    broker = start_deployed_broker(tmp_path_factory.mktemp("broker"), creds)
    yield Site(broker, creds, unit_keys, Authority(model_id=MODEL, threshold=0.5))
    broker.stop()


def _bundle(hq: Authority, version: int, seed: int) -> bytes:
    centers = person_centers(5, seed=seed)
    persons = make_persons([f"p{seed}-{i}" for i in range(5)], 2)
    return hq.bundle(version, persons, samples_of(centers, 2, seed=seed + 1))


def test_units_report_receivers_read_hq_writes_and_a_site_reads_its_list(site: Site, tmp_path: Path) -> None:
    # HQ publishes each site's list with its account.
    for site_id, seed in (("site-a", 1), ("site-b", 2)):
        publish_bundle(
            _bundle(site.hq, 1, seed),
            f"checkpoint/v1/{site_id}/watchlist",
            connection=site.account("hq"),
            chunk_bytes=4096,
        )
    # The receiver's account reads every unit's hits through the shared subscription.
    rx = Probe(site.account("receiver")).connected()
    rx.subscribe("$share/receivers/checkpoint/v1/+/+/hits")
    rx.subscribe("checkpoint/v1/+/+/status")
    # The unit, configured as make-credentials wrote it (own account, TLS, signing key, site reader).
    unit_dir = site.creds / "unit-1"
    cfg = MqttConfig(
        host=HOST,
        port=site.broker.port,
        site="site-a",
        username="site-a/unit-1",
        password_file=unit_dir / "mqtt.pw",
        tls={"ca_file": site.creds / "broker" / "ca.pem"},
        signing_key=unit_dir / "signing.key",
        watchlist_password_file=site.creds / "site-a" / "watchlist.pw",
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
    )
    reporter = MqttReporter(cfg, OutboxConfig(path=tmp_path / "outbox.sqlite"), "unit-1")
    wl = Watchlist(
        WatchlistConfig(root_key=site.hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db"), Matcher(), MODEL
    )
    wl.start()
    sub = WatchlistSubscriber(
        wl, "checkpoint/v1/site-a/watchlist", connection=cfg.watchlist_connection(), tick_interval_s=0.2
    )
    sub.start()
    try:
        hit = make_hit(crop=face_jpeg())
        reporter.submit(hit)
        wait_for(lambda: any(t.endswith("/hits") for t in rx.topics()), what="the hit at the receiver")
        wait_for(lambda: wl.version == 1, what="site-a's list applied by the unit")
        assert reporter.flush(10) and reporter.last_error is None
    finally:
        sub.stop()
        wl.close()
        reporter.close(2)
        rx.close()
    keys = KnownKeys.load(site.unit_keys)
    got = [(t, p) for t, p in rx.messages if t.startswith("checkpoint/v1/site-a/unit-1/")]
    assert {t.rsplit("/", 1)[1] for t, _ in got} >= {"hits", "status"}
    assert all(verify_record(p, keys) == Verdict.VALID for _, p in got)


def test_nobody_reads_or_writes_what_is_not_theirs(site: Site) -> None:
    publish_bundle(
        _bundle(site.hq, 1, 3), "checkpoint/v1/site-b/watchlist", connection=site.account("hq"), chunk_bytes=4096
    )
    publish_bundle(
        _bundle(site.hq, 1, 4), "checkpoint/v1/site-a/watchlist", connection=site.account("hq"), chunk_bytes=4096
    )
    reader = Probe(site.account("reader-a")).connected()
    unit = Probe(site.account("unit-1")).connected()
    rx = Probe(site.account("receiver")).connected()
    try:
        # Site b's list first, then site a's: retained messages follow each SUBACK in order, so once
        # site a's manifest is here, site b's would have been too.
        reader.subscribe("checkpoint/v1/site-b/watchlist/full/manifest")
        reader.subscribe("checkpoint/v1/site-a/watchlist/full/manifest")
        wait_for(lambda: "checkpoint/v1/site-a/watchlist/full/manifest" in reader.topics(), what="site a's manifest")
        assert not any("site-b" in t for t in reader.topics()), "site a's reader got site b's list"

        refused = "Not authorized"
        assert unit.publish("checkpoint/v1/site-a/unit-1/hits") != refused
        assert unit.publish("checkpoint/v1/site-a/unit-1/heartbeat") != refused
        assert unit.publish("checkpoint/v1/site-b/unit-2/hits") == refused, "another site's unit"
        assert unit.publish("checkpoint/v1/site-a/unit-9/hits") == refused, "another unit of its site"
        assert unit.publish("checkpoint/v1/site-a/watchlist/full/manifest") == refused, "the watchlist"
        assert reader.publish("checkpoint/v1/site-a/watchlist/hits") == refused, "a reader posing as a unit"
        assert reader.publish("checkpoint/v1/site-a/watchlist/full/manifest") == refused, "a reader writing the list"
        assert rx.publish("checkpoint/v1/site-a/unit-1/hits") == refused, "a receiver forging hits"
    finally:
        for p in (reader, unit, rx):
            p.close()


def test_wrong_password_and_wrong_ca_fail_fast_and_clearly(site: Site, tmp_path: Path) -> None:
    (tmp_path / "wrong.pw").write_text("not-the-password\n")
    link = MqttLink(site.conn("site-a/unit-1", tmp_path / "wrong.pw"), "wrong-pw", name="test")
    link.start()
    try:
        problem = link.wait_connected(10)
    finally:
        link.stop()
    assert problem is not None and "not authorised" in problem, problem

    wrong_ca = make_tls_files(tmp_path / "other").wrong_ca
    conn = site.account("unit-1").model_copy(
        update={"tls": site.account("unit-1").tls.model_copy(update={"ca_file": wrong_ca})}
    )
    link = MqttLink(conn, "wrong-ca", name="test")
    link.start()
    try:
        problem = link.wait_connected(10)
    finally:
        link.stop()
    assert problem is not None and "certificate" in problem, problem

    from click.testing import CliRunner

    from watchlist.cli import main

    (tmp_path / "v1.cpwl").write_bytes(_bundle(site.hq, 1, 5))
    register = register_release(tmp_path / "hq.db", (tmp_path / "v1.cpwl").read_bytes())
    args = ["publish", str(tmp_path / "v1.cpwl"), "--register", str(register)]
    args += ["--topic", "checkpoint/v1/site-a/watchlist", "--host", HOST]
    args += ["--port", str(site.broker.port), "--username", "hq", "--ca-file", str(site.creds / "broker" / "ca.pem")]
    done = CliRunner().invoke(main, args + ["--password-file", str(tmp_path / "wrong.pw")])
    assert done.exit_code == 2 and "not authorised" in done.output, done.output
    done = CliRunner().invoke(
        main, args[:-2] + ["--ca-file", str(wrong_ca), "--password-file", str(site.creds / "hq" / "hq.pw")]
    )
    assert done.exit_code == 2 and "certificate" in done.output, done.output


def test_client_certificates_when_the_broker_requires_them(site: Site, tmp_path: Path) -> None:
    broker = start_deployed_broker(tmp_path / "strict", site.creds, require_certificate=True)
    try:
        unit_dir = site.creds / "unit-1"
        base = site.account("unit-1").model_copy(update={"port": broker.port})
        with_cert = base.model_copy(
            update={
                "tls": base.tls.model_copy(
                    update={"cert_file": unit_dir / "mqtt-client.pem", "key_file": unit_dir / "mqtt-client.key"}
                )
            }
        )
        ok = Probe(with_cert).connected()
        assert ok.publish("checkpoint/v1/site-a/unit-1/hits") != "Not authorized"
        ok.close()
        link = MqttLink(base, "no-cert", name="test")
        link.start()
        try:
            problem = link.wait_connected(10)
        finally:
            link.stop()
        assert problem is not None and "certificate" in problem, problem
    finally:
        broker.stop()
