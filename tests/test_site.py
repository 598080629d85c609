"""The secured site end to end (issue 11): Mosquitto on deploy/'s own config and ACL with a CA and
certificates made at test time, HQ publishing a list with its account over TLS (`watchlist publish`),
two units of two sites (each its own account, signing key and a real RTSP camera) applying it live
and reporting hits, and the receiver (its own account, the units' public keys, unsigned hits
refused) storing them as signed-valid. A unit cannot read another site's list nor write another
unit's topics; HQ and units fail fast and clearly on a wrong password or CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from central.receiver import Receiver
from central.store import HitStore
from testing.broker import HOST, make_tls_files, wait_for
from testing.media import make_face_clip
from testing.site import Probe, Site, make_site_credentials, start_deployed_broker
from testing.synthetic import Authority, make_persons, person_centers, register_release, samples_of
from tests.edge_support import People
from wire.mqtt import MqttLink

UNITS = {"unit-1": "site-a", "unit-2": "site-b"}


@pytest.fixture
def site(tmp_path: Path, mosquitto_bin: str):
    creds = tmp_path / "creds"
    unit_keys = make_site_credentials(creds)
    broker = start_deployed_broker(tmp_path / "broker", creds)
    yield Site(broker, creds, unit_keys)
    broker.stop()


def unit_config(tmp: Path, site: Site, unit: str, camera_url: str, root_pub: Path) -> Path:
    """The unit's TOML as an installer writes it from make-credentials' mqtt.toml."""
    site_id, d = UNITS[unit], site.creds / unit
    folder = tmp / unit
    folder.mkdir()
    path = folder / "unit.toml"
    path.write_text(f"""
[unit]
id = "{unit}"
site = "{site_id}"

[[cameras]]
id = "gate"
url = "{camera_url}"
analysis_fps = 5
open_timeout_s = 5
reconnect_min_s = 0.2
reconnect_max_s = 1

[watchlist]
root_key = "{root_pub}"
store = "{folder / "watchlist.db"}"
topic = "checkpoint/v1/{site_id}/watchlist"

[mqtt]
host = "{HOST}"
port = {site.broker.port}
username = "{site_id}/{unit}"
password_file = "{d / "mqtt.pw"}"
signing_key = "{d / "signing.key"}"
watchlist_username = "{site_id}/{unit}/watchlist"
watchlist_password_file = "{d / "watchlist.pw"}"
heartbeat_interval_s = 1
reconnect_min_delay_s = 0.1
reconnect_max_delay_s = 0.5

[mqtt.tls]
ca_file = "{site.creds / "broker" / "ca.pem"}"

[outbox]
path = "{folder / "outbox.sqlite"}"

[canary]
# Off: this site is about accounts, TLS and the ACL, and its list is built without the canary person,
# whose picture (scikit-image's astronaut) is the clip's person where lag-dev is absent. The canary on
# the deployed site is tests/test_canary.py's.
enabled = false
""")
    return path


def publish_args(site: Site, bundle: Path, register: Path, site_id: str) -> list[str]:
    return [
        "publish",
        str(bundle),
        "--register",
        str(register),
        "--topic",
        f"checkpoint/v1/{site_id}/watchlist",
        "--host",
        HOST,
        "--port",
        str(site.broker.port),
        "--username",
        "hq",
        "--ca-file",
        str(site.creds / "broker" / "ca.pem"),
        "--password-file",
        str(site.creds / "hq" / "hq.pw"),
        "--timeout",
        "10",
    ]


def test_the_secured_site_end_to_end(
    site: Site, rtsp_server_factory: Any, engine: Any, people: People, tmp_path: Path
) -> None:
    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier
    from testing.demo import build_watchlist
    from watchlist.cli import main as watchlist_cli

    clip = make_face_clip(
        tmp_path / "gate.mp4", [(people.enrolled_face, 0.2, 1.8, 40, 60, 180)], size=(640, 360), fps=10, seconds=2.0
    )
    camera = rtsp_server_factory({"gate-a": clip, "gate-b": clip})
    root_pub, bundle = build_watchlist(
        tmp_path / "hq", engine, {people.enrolled_id: [people.enrolment_photo]}, default_threshold=people.threshold
    )
    register = tmp_path / "hq" / "hq" / "register.db"

    store = HitStore(tmp_path / "hits.sqlite")
    rx = Receiver(
        site.receiver_config("rx-site", unsigned="reject"),
        store,
    )
    rx.start()
    daemons = {
        unit: Daemon(
            load_config(unit_config(tmp_path, site, unit, camera.url(f"gate-{site_id[-1]}"), root_pub)),
            engine=engine,
            notifier=Notifier(environ={}),
        )
        for unit, site_id in UNITS.items()
    }
    try:
        wait_for(rx.subscribed.is_set, what="the receiver subscribed with its account")
        for d in daemons.values():
            d.start()
        wait_for(lambda: len(store.units()) == 2, 30, what="both units online at the receiver")
        assert all(d.watchlist.version == 0 for d in daemons.values()), "no list before HQ publishes"
        # HQ publishes the list to each site with its own account, over TLS; the units apply it live.
        for site_id in ("site-a", "site-b"):
            done = CliRunner().invoke(watchlist_cli, publish_args(site, bundle, register, site_id))
            assert done.exit_code == 0, done.output
        wait_for(lambda: all(d.watchlist.version == 1 for d in daemons.values()), 30, what="both lists applied")
        wait_for(lambda: {h["unit_id"] for h in store.hits(limit=None)} == set(UNITS), 60, what="hits from both units")
    finally:
        for d in daemons.values():
            d.stop()
        rx.close()
    hits = store.hits(limit=None)
    assert {(h["site"], h["unit_id"]) for h in hits} == set((s, u) for u, s in UNITS.items())
    assert all(h["signature"] == "valid" and h["person_id"] == people.enrolled_id for h in hits), hits
    assert store.rejects() == []
    assert {u["unit_id"]: u["health"] for u in store.units()} == {"unit-1": "offline", "unit-2": "offline"}
    store.close()


def test_a_unit_keeps_to_its_own_site_and_topics(site: Site) -> None:
    reader = Probe(site.account("reader-a")).connected()
    unit = Probe(site.account("unit-1")).connected()
    hq = Probe(site.account("hq")).connected()
    try:
        reader.subscribe("checkpoint/v1/site-b/watchlist/#")
        reader.subscribe("checkpoint/v1/site-a/watchlist/#")
        # Site b's first: messages reach a subscriber in order, so once site a's is here, b's would be too.
        assert hq.publish("checkpoint/v1/site-b/watchlist/full/manifest", b"{}") != "Not authorized"
        assert hq.publish("checkpoint/v1/site-a/watchlist/full/manifest", b"{}") != "Not authorized"
        wait_for(lambda: any("site-a" in t for t in reader.topics()), what="site a's list")
        assert not any("site-b" in t for t in reader.topics()), "site a's unit read site b's list"
        for topic in ("site-b/unit-2/hits", "site-b/unit-2/status", "site-a/unit-9/hits", "site-a/watchlist/x"):
            assert unit.publish(f"checkpoint/v1/{topic}") == "Not authorized", topic
    finally:
        for p in (reader, unit, hq):
            p.close()


def test_hq_and_units_fail_fast_on_a_wrong_password_or_ca(site: Site, tmp_path: Path) -> None:
    from watchlist.cli import main as watchlist_cli

    wrong_pw = tmp_path / "wrong.pw"
    wrong_pw.write_text("not-the-password\n")
    wrong_ca = make_tls_files(tmp_path / "other").wrong_ca
    unit = site.account("unit-1")
    for conn, expected in (
        (unit.model_copy(update={"password_file": wrong_pw}), "not authorised"),
        (unit.model_copy(update={"tls": unit.tls.model_copy(update={"ca_file": wrong_ca})}), "certificate"),
    ):
        link = MqttLink(conn, "unit-1-wrong", name="unit")
        link.start()
        try:
            problem = link.wait_connected(10)
        finally:
            link.stop()
        assert problem is not None and expected in problem, problem

    hq = Authority(model_id="synthetic:v1", threshold=0.5)
    bundle = tmp_path / "v1.cpwl"
    bundle.write_bytes(hq.bundle(1, make_persons(["p1"], 1), samples_of(person_centers(1, seed=1), 1, seed=2)))
    args = publish_args(site, bundle, register_release(tmp_path / "hq.db", bundle.read_bytes()), "site-a")
    done = CliRunner().invoke(watchlist_cli, args[:-4] + ["--password-file", str(wrong_pw)] + args[-2:])
    assert done.exit_code == 2 and "not authorised" in done.output, done.output
    ca_at = args.index("--ca-file") + 1
    done = CliRunner().invoke(watchlist_cli, args[:ca_at] + [str(wrong_ca)] + args[ca_at + 1 :])
    assert done.exit_code == 2 and "certificate" in done.output, done.output
