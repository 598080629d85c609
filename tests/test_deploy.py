"""The site as files: Mosquitto runs with deploy/mosquitto/checkpoint.conf and deploy/mosquitto/acl
themselves (only the folder of the certificates, generated here, and the port are replaced), with
accounts made by deploy/make-credentials. Units publish their own topics and read their own site's
list, and nothing else; HQ writes the lists; receivers read the hits; wrong passwords and CAs fail
fast and clearly (issue 11). No account can take another's client id and so end its session; the
broker installed exactly as docs/protocol.md says runs as Debian's mosquitto user on the files
make-credentials wrote; the example unit config names the files make-credentials writes (issue 19,
item 7)."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib

from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from matching.matcher import Matcher
from testing.broker import HOST, make_tls_files, wait_for
from testing.hits import face_jpeg, make_hit
from testing.site import DEPLOY, Probe, Site, make_site_credentials, start_deployed_broker
from testing.synthetic import Authority, make_persons, person_centers, register_release, samples_of
from tests.services import missing_service
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
        watchlist_username="site-a/unit-1/watchlist",
        watchlist_password_file=unit_dir / "watchlist.pw",
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
    )
    reporter = MqttReporter(cfg, OutboxConfig(path=tmp_path / "outbox.sqlite"), "unit-1")
    wl = Watchlist(
        WatchlistConfig(root_key=site.hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db"), Matcher(), MODEL
    )
    wl.start()
    sub = WatchlistSubscriber(
        wl, "checkpoint/v1/site-a/watchlist", connection=cfg.watchlist_connection("unit-1"), tick_interval_s=0.2
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


def test_no_account_ends_another_accounts_session(site: Site) -> None:
    """Issue 19, item 7: a unit's account (or a watchlist reader's) connecting with a receiver's
    client id used to end that receiver's persistent session, and the hits queued for it while it
    was down were lost. The broker now binds a client id to its account."""
    topic = "$share/takeover/checkpoint/v1/+/+/hits"
    receivers = {
        who: Probe(site.account(who), client_id=f"rx-{who}", clean_start=False) for who in ("receiver", "receiver-2")
    }
    for rx in receivers.values():
        rx.connected().subscribe(topic)
        rx.close()  # down: the broker keeps its session and queues its share of the hits
    unit = Probe(site.account("unit-1")).connected()
    try:
        for i in range(6):
            assert unit.publish("checkpoint/v1/site-a/unit-1/hits", b'{"n": %d}' % i) == "Success"
        # Others connect asking for the receivers' ids, as a clean start would end their sessions.
        for who, other in (("receiver", "unit-2"), ("receiver-2", "reader-a")):
            Probe(site.account(other), client_id=f"rx-{who}").connected().close()
        back = {who: Probe(site.account(who), client_id=f"rx-{who}", clean_start=False) for who in receivers}
        try:
            for rx in back.values():
                rx.connected()
            wait_for(lambda: sum(len(rx.messages) for rx in back.values()) >= 6, what="the six queued hits")
            # A receiver that is up stays up while another account asks for its id.
            intruder = Probe(site.account("unit-2"), client_id="rx-receiver").connected()
            intruder.close()
            assert unit.publish("checkpoint/v1/site-a/unit-1/hits", b'{"n": 6}') == "Success"
            wait_for(lambda: sum(len(rx.messages) for rx in back.values()) == 7, what="a hit after the intruder")
            assert all(rx.link.connects == 1 for rx in back.values()), "a receiver was cut off"
        finally:
            for rx in back.values():
                rx.close()
    finally:
        unit.close()
    assert "closing old connection" not in site.broker.log_text()


def test_the_broker_installed_as_the_docs_say_runs_as_mosquitto(mosquitto_bin: str) -> None:
    """Issue 19, item 7: the steps of docs/protocol.md "Deployment" (the install folder and port
    replaced, nothing else): Mosquitto starts as root and drops to Debian's mosquitto user, which
    must read server.key, passwd and the ACL that make-credentials wrote (it stopped with "Unable to
    open pwfile" when they were root's alone). A unit then publishes with its account."""
    if os.geteuid() != 0:
        missing_service("the install steps run as root (install -o root -g mosquitto; CI runs as root)")
    if shutil.which("id") is None or subprocess.run(["id", "mosquitto"], capture_output=True).returncode != 0:
        missing_service("no mosquitto user: apt-get install mosquitto")
    top = Path(tempfile.mkdtemp(prefix="checkpoint-install-"))
    try:
        top.chmod(0o755)  # the mosquitto user must reach the folders below (/etc is world-searchable too)
        creds, state = top / "creds", top / "state"
        broker_dir = creds / "broker"
        creds.mkdir()
        subprocess.run(["install", "-d", "-m", "750", "-o", "root", "-g", "mosquitto", str(broker_dir)], check=True)
        subprocess.run(
            ["install", "-m", "640", "-g", "mosquitto", str(DEPLOY / "mosquitto" / "acl"), str(broker_dir / "acl")],
            check=True,
        )
        subprocess.run(["install", "-d", "-o", "mosquitto", "-g", "mosquitto", str(state)], check=True)

        def make(*args: object) -> None:
            done = subprocess.run(
                [sys.executable, str(DEPLOY / "make-credentials"), *map(str, args)], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr

        make("ca", "--out", broker_dir, "--broker-host", HOST)
        at = ["--passwd", broker_dir / "passwd", "--acl", broker_dir / "acl"]
        make("receiver", "--out", creds / "rx", *at)
        make("unit", "--site", "north", "--unit", "gate-2", "--out", creds / "gate-2", *at)
        make("hq", "--out", creds / "hq", "--passwd", broker_dir / "passwd")
        broker = start_deployed_broker(state, creds, own_user=True)
        try:
            uid = next(
                line.split()[1]
                for line in Path(f"/proc/{broker._proc.pid}/status").read_text().splitlines()
                if line.startswith("Uid:")
            )
            assert int(uid) == int(subprocess.run(["id", "-u", "mosquitto"], capture_output=True, text=True).stdout), (
                "not the mosquitto user"
            )
            installed = Site(broker, creds, creds / "unit-keys")
            rx = Probe(installed.conn("receiver", creds / "rx" / "receiver.pw")).connected()
            unit = Probe(installed.conn("north/gate-2", creds / "gate-2" / "mqtt.pw")).connected()
            try:
                rx.subscribe("checkpoint/v1/+/+/hits")
                assert unit.publish("checkpoint/v1/north/gate-2/hits") == "Success"
                assert rx.wait_messages(1)[0][0] == "checkpoint/v1/north/gate-2/hits"
            finally:
                unit.close()
                rx.close()
        finally:
            broker.stop()
        assert "Unable to" not in broker.log_text(), broker.log_text()
    finally:
        shutil.rmtree(top)


def test_the_example_config_names_the_files_make_credentials_writes(tmp_path: Path) -> None:
    """Issue 19, item 7: systemd/unit.example.toml named hq-ca.pem and mqtt-password, and had no
    signing_key, while make-credentials writes ca.pem, mqtt.pw and signing.key (so a unit installed
    by the docs sent unsigned hits the centre quarantined)."""
    from testing.site import install_acl, make_credentials

    install_acl(tmp_path / "broker")
    group = ["--broker-group", grp.getgrgid(os.getegid()).gr_name]
    make_credentials(
        "unit",
        "--site",
        "station-12",
        "--unit",
        "station-12-gate-a",
        "--out",
        tmp_path / "unit",
        "--passwd",
        tmp_path / "broker" / "passwd",
        "--acl",
        tmp_path / "broker" / "acl",
        *group,
    )
    made = tomllib.loads((tmp_path / "unit" / "mqtt.toml").read_text())
    example = tomllib.loads((DEPLOY.parent / "systemd" / "unit.example.toml").read_text())
    for key in ("username", "password_file", "signing_key", "watchlist_username", "watchlist_password_file"):
        assert example["mqtt"].get(key) == made["mqtt"][key], key
    assert example["mqtt"]["tls"]["ca_file"] == made["mqtt"]["tls"]["ca_file"]
    assert example["watchlist"]["topic"] == made["watchlist"]["topic"]
    for name in ("mqtt.pw", "watchlist.pw", "signing.key"):
        assert (tmp_path / "unit" / name).is_file(), name
    assert (
        (tmp_path / "broker" / "acl")
        .read_text()
        .endswith("user station-12/station-12-gate-a/watchlist\ntopic read checkpoint/v1/station-12/watchlist/#\n")
    )
