"""Fleet truth (issue 19, item 3): a fleet row is red or amber, with the reason, for every fact that
says a unit is not doing its job; the same reasons in `checkpoint-receiver units` and on the fleet
page. The evaluation over facts, the store on SQLite and PostgreSQL, and the receiver against a real
Mosquitto: a blind unit, HQ's latest list, heartbeats ordered by receive time, a replayed status,
the receiver's account refused HQ's manifests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from central.cli import main as cli
from central.fleet import HealthSettings, centre_problems, evaluate
from central.publications import MANIFEST_SUBSCRIPTION
from central.receiver import Receiver, ReceiverConfig
from central.store import HitStore
from testing.broker import wait_for
from watchlist.format.transport import Manifest, manifest_topic
from wire import records

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_750_000_000.0
CAMERA_ERROR = "rtsp://10.0.0.7/stream: 401 Unauthorized"
SYNC_ERROR = "broker 10.0.0.1:8883 refused the connection: Not authorized (check the user name and password)"


def figures(*, cameras=(("gate", True, None),), version=3, expires_at=None, sync=None, **more):
    """The `unit` part of a heartbeat, shaped as edge/daemon.py's Daemon.status() makes it (the list
    expiring in 20 days unless told otherwise)."""
    expires_at = time.time() + 20 * 86400 if expires_at is None else expires_at
    cams = [{"id": cid, "up": up, "last_error": err} for cid, up, err in cameras]
    return {
        "software_version": "1.0",
        "warnings": [],
        "pipeline": {"healthy": True, "problems": []},
        "cameras": cams,
        "cameras_up": sum(c["up"] for c in cams),
        "cameras_total": len(cams),
        "watchlist": {
            "version": version,
            "expires_at": expires_at,
            "expired": False,
            "matching": True,
            "halted": None,
            "sync": {"connected": True, "last_error": None, "refused": [], **(sync or {})},
        },
        **more,
    }


def row(unit=None, *, health="online", at=NOW, received=NOW, pending=0, **facts):
    """A unit as HitStore.units() gives it to the evaluation."""
    unit = figures() if unit is None else unit
    beat = {"at": at, "interval_s": 30.0, "unit": unit, "outbox": {"pending": pending}, "link": {"last_error": None}}
    wl = unit["watchlist"] if isinstance(unit.get("watchlist"), dict) else {}
    return {
        "health": health,
        "state_reason": facts.pop("state_reason", None),
        "heartbeat": beat,
        "last_heartbeat_at": received,
        "heartbeat_interval_s": 30.0,
        "watchlist_version": wl.get("version"),
        "watchlist_expires_at": wl.get("expires_at"),
        "backlog_since": None,
        "backlog_from": None,
        **facts,
    }


def texts(health) -> list[str]:
    return [f"{r.level}: {r.text}" for r in health.reasons]


# --- the evaluation ---------------------------------------------------------------------------


def test_a_healthy_unit_is_ok_with_no_reasons():
    assert evaluate(row(), NOW) == evaluate(row(), NOW, {"version": 3, "seen_at": NOW - 3600})
    assert evaluate(row(), NOW).level == "ok" and evaluate(row(), NOW).reasons == []


def test_a_blind_unit_is_red_with_its_cameras_error_and_a_failing_list_sync_is_amber():
    blind = figures(cameras=[("gate", False, CAMERA_ERROR)], sync={"connected": False, "last_error": SYNC_ERROR})
    got = evaluate(row(blind), NOW)
    assert got.level == "red"
    assert texts(got) == [f"red: camera gate down: {CAMERA_ERROR}", f"amber: watchlist updates fail: {SYNC_ERROR}"]
    # One camera of two down: the unit still sees part of what it should.
    half = evaluate(row(figures(cameras=[("gate", False, None), ("hall", True, None)])), NOW)
    assert texts(half) == ["amber: camera gate down"]
    # Units that send only the counts.
    counts = {"cameras_up": 0, "cameras_total": 2}
    assert texts(evaluate(row(counts), NOW)) == ["red: 2 of 2 cameras down"]


def test_a_list_behind_hqs_latest_is_amber_after_the_grace_period_only():
    published = {"version": 5, "seen_at": NOW - 600}
    settings = HealthSettings(behind_grace_s=900)
    assert evaluate(row(), NOW, published, settings).level == "ok", "HQ published 10 min ago: still fetching"
    later = evaluate(row(), NOW + 301, published, settings)
    assert texts(later) == ["amber: watchlist v3 behind HQ's v5 (published 15 min ago)"]
    assert evaluate(row(figures(version=5)), NOW + 301, published, settings).level == "ok"


def test_expired_and_missing_lists_dead_threads_and_warnings():
    expired = evaluate(row(figures(expires_at=NOW - 7200)), NOW)
    assert texts(expired) == ["red: watchlist v3 expired 2.0 h ago"]
    assert texts(evaluate(row(figures(expires_at=NOW + 3600)), NOW)) == ["amber: watchlist v3 expires in 60 min"]
    assert texts(evaluate(row(figures(version=0)), NOW)) == ["red: no watchlist: no face can match"]
    halted = figures()
    halted["watchlist"].update(matching=False, halted="list made with model m-1, the unit runs m-2")
    halted["warnings"] = ["list made with model m-1, the unit runs m-2", "int8 embedder failed its check: float32"]
    assert texts(evaluate(row(halted), NOW)) == [
        "red: watchlist: matching stopped: list made with model m-1, the unit runs m-2",
        "amber: unit warns: int8 embedder failed its check: float32",
    ]
    dead = figures(pipeline={"healthy": False, "problems": ["pipeline thread embed died: CUDA error"]})
    dead["warnings"] = ["pipeline thread embed died: CUDA error", "outbox cannot write: disk full"]
    assert texts(evaluate(row(dead), NOW)) == [
        "red: pipeline: pipeline thread embed died: CUDA error",
        "amber: unit warns: outbox cannot write: disk full",
    ], "a problem the unit repeats in its warnings is said once"


def test_a_site_whose_units_run_a_list_the_centre_never_saw_published_is_said_once():
    units = [
        {"site": "site-a", "watchlist_version": 3},
        {"site": "site-a", "watchlist_version": 4},
        {"site": "site-b", "watchlist_version": 2},
        {"site": "site-c", "watchlist_version": 0},
        {"site": "site-d", "watchlist_version": None},
    ]
    got = centre_problems(units, {"site-b": {"version": 2}})
    assert got == [
        "site site-a: units run watchlist v4 but the centre saw no publication for it, so no unit there can be "
        f"shown behind HQ's list (the receivers' broker account needs read on {MANIFEST_SUBSCRIPTION})"
    ]
    assert "the newest the centre saw is v1" in centre_problems(units, {"site-a": {"version": 1}, "site-b": {}})[0]


def test_offline_silent_and_unknown_units():
    off = evaluate(row(health="offline", state_reason="connection lost"), NOW)
    assert texts(off) == ["red: offline: connection lost"], "the last heartbeat of a gone unit is history"
    stale = evaluate(row(health="stale", received=NOW - 600), NOW)
    assert texts(stale) == ["red: silent: no heartbeat for 10 min (one expected every 30 s)"]
    assert texts(evaluate({"health": "unknown"}, NOW)) == ["amber: no status from the unit yet"]


def test_clock_skew_and_a_backlog_that_grows_or_never_drains():
    assert texts(evaluate(row(at=NOW + 20), NOW)) == []
    assert texts(evaluate(row(at=NOW + 120), NOW)) == [
        "amber: clock 2 min ahead of the centre's (hit times and list expiry are off)"
    ]
    assert texts(evaluate(row(at=NOW - 7200), NOW)) == [
        "red: clock 2.0 h behind the centre's (hit times and list expiry are off)"
    ]
    growing = row(pending=40, backlog_since=NOW - 300, backlog_from=3)
    assert texts(evaluate(growing, NOW)) == [
        "amber: outbox backlog growing: 40 hits waiting, 3 when it began 5 min ago"
    ]
    assert evaluate(row(pending=40, backlog_since=NOW - 60, backlog_from=3), NOW).level == "ok"
    stuck = row(pending=3, backlog_since=NOW - 900, backlog_from=3)
    assert texts(evaluate(stuck, NOW)) == ["amber: outbox backlog not draining: 3 hits waiting for 15 min"]


def test_hits_the_centre_refused_and_the_unit_keeps_are_red_and_said_once():
    unit = figures(warnings=["the centre refused 2 hits (latest: unsigned: ...); they are kept in the outbox ..."])
    refused = row(unit)
    refused["heartbeat"]["outbox"]["quarantined_kept"] = 2
    health = evaluate(refused, NOW)
    assert health.level == "red"
    assert texts(health) == ["red: hits refused by the centre: 2 kept at the unit (see Quarantine)"]


def test_hostile_figures_are_ignored_or_escaped():
    hostile = figures(cameras=[("gate\u202e", False, "bad\x1b[2J\nforged line" + "x" * 5000)])
    hostile["pipeline"] = "not an object"
    hostile["warnings"] = [1, None, {"a": 1}, "w\u2066"]
    hostile["watchlist"]["sync"] = ["not", "an", "object"]
    got = evaluate(row(hostile), NOW)
    assert [r.level for r in got.reasons] == ["red", "amber"]
    camera, warning = (r.text for r in got.reasons)
    assert camera.startswith("camera gate\\u202e down: bad\\x1b[2J\\nforged line") and camera.endswith("...")
    assert len(camera) < 400 and warning == "unit warns: w\\u2066"
    for junk in ({"cameras": "x", "cameras_up": True, "watchlist": 7}, {"cameras": [None, 3, {"up": "no"}]}):
        assert evaluate(row(junk), NOW).level == "ok"
    assert (
        evaluate({"health": "online", "heartbeat": {"at": float("nan")}, "last_heartbeat_at": NOW}, NOW).level == "ok"
    )


# --- the store, on SQLite and PostgreSQL --------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path}/hits.sqlite" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = HitStore(url)
    yield s
    s.close()


def beat(unit=None, pending=0, at=None) -> dict:
    return {
        "at": NOW if at is None else at,
        "interval_s": 30.0,
        "unit": figures() if unit is None else unit,
        "outbox": {"pending": pending},
        "link": {"last_error": None},
    }


def test_the_store_keeps_the_backlogs_history_and_hqs_latest_list(store):
    store.set_unit_status("site-a", "unit-1", "online", "connected", NOW, NOW)
    for pending, at in ((0, NOW), (2, NOW + 30), (1, NOW + 60), (9, NOW + 200)):
        store.set_heartbeat("site-a", "unit-1", beat(pending=pending, at=at), at)
    unit = store.units(now=NOW + 200)[0]
    assert (unit["backlog_since"], unit["backlog_from"], unit["level"]) == (NOW + 30, 2, "amber")
    assert [r.text for r in unit["reasons"]] == ["outbox backlog growing: 9 hits waiting, 2 when it began 3 min ago"]
    store.set_heartbeat("site-a", "unit-1", beat(pending=0, at=NOW + 230), NOW + 230)
    unit = store.units(now=NOW + 230)[0]
    assert (unit["backlog_since"], unit["backlog_from"], unit["level"]) == (None, None, "ok")

    assert store.set_publication("site-a", 5, NOW - 50, NOW, "checkpoint/v1/site-a/watchlist/full/manifest")
    assert not store.set_publication("site-a", 4, NOW, NOW + 10, "checkpoint/v1/site-a/watchlist/delta/manifest")
    assert store.publications()["site-a"]["version"] == 5 and store.publications()["site-a"]["seen_at"] == NOW
    store.set_heartbeat("site-a", "unit-1", beat(at=NOW + 1000), NOW + 1000)
    unit = store.units(now=NOW + 1000)[0]
    assert [r.text for r in unit["reasons"]] == ["watchlist v3 behind HQ's v5 (published 17 min ago)"]


def test_a_heartbeat_stored_in_the_future_before_the_fix_holds_back_no_later_one(store):
    store.set_heartbeat("site-a", "unit-1", beat(at=NOW + 1e8), NOW + 1e8)
    store.set_heartbeat("site-a", "unit-1", beat(unit=figures(version=4)), time.time())
    assert store.units()[0]["watchlist_version"] == 4


# --- the receiver, against a real Mosquitto -----------------------------------------------------


def rx_config(broker, client_id="rx-fleet", **kw) -> ReceiverConfig:
    return ReceiverConfig(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
        **kw,
    )


def publisher(broker, **credentials):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    if credentials:
        c.username_pw_set(credentials["username"], credentials["password"])
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def heartbeat(unit: dict, at: float | None = None, site: str = "site-a", unit_id: str = "unit-1") -> bytes:
    outbox = dict.fromkeys(records.HEARTBEAT_OUTBOX_KEYS, 0)
    link = {"state": "connected", "connects": 1, "connect_attempts": 1, "last_error": None}
    return records.heartbeat_payload(
        site, unit_id, interval_s=30.0, uptime_s=5.0, unit=unit, outbox=outbox, link=link, at=at
    )


def send(pub, kind: str, payload: bytes, *, retain: bool, site="site-a", unit_id="unit-1") -> None:
    pub.publish(f"checkpoint/v1/{site}/{unit_id}/{kind}", payload, qos=1, retain=retain).wait_for_publish(5)


def manifest(version: int, published_at: float, slot: str = "full") -> bytes:
    return Manifest(slot, version, None, 1000, "ab" * 32, 1000, 1, published_at).to_bytes()


def started(broker, store, **kw) -> Receiver:
    rx = Receiver(rx_config(broker, **kw), store)
    rx.start()
    wait_for(rx.subscribed.is_set, what="receiver subscribed")
    return rx


def units_listing(db: Path) -> str:
    res = CliRunner().invoke(cli, ["units", "--db", str(db)])
    assert res.exit_code == 0, res.output
    return res.output


def test_a_blind_unit_with_a_wrong_list_password_is_red_with_both_reasons_in_the_cli(mosquitto, tmp_path):
    db = tmp_path / "hits.sqlite"
    store = HitStore(db)
    rx = started(mosquitto, store)
    pub = publisher(mosquitto)
    try:
        send(pub, "status", records.status_payload("site-a", "unit-1", "online", "connected"), retain=True)
        blind = figures(cameras=[("gate", False, CAMERA_ERROR)], sync={"connected": False, "last_error": SYNC_ERROR})
        send(pub, "heartbeat", heartbeat(blind), retain=True)
        unit = wait_for(lambda: next((u for u in store.units() if u["heartbeat"]), None), what="the heartbeat stored")
    finally:
        pub.loop_stop()
        rx.close()
        store.close()
    assert (unit["health"], unit["level"]) == ("online", "red")
    line = next(line for line in units_listing(db).splitlines() if line.startswith("site-a/unit-1"))
    assert " online   red " in line, line
    assert f"camera gate down: {CAMERA_ERROR}; watchlist updates fail: {SYNC_ERROR}" in line


def test_heartbeats_go_by_receive_time_so_one_stamped_in_the_future_freezes_nothing(mosquitto, tmp_path):
    """A retained heartbeat from a unit whose clock ran ten years ahead (or a forged one) waits on the
    broker; a receiver that subscribes later must still take the unit's next heartbeats."""
    store = HitStore(tmp_path / "hits.sqlite")
    pub = publisher(mosquitto)
    ahead = time.time() + 10 * 365 * 86400
    send(pub, "heartbeat", heartbeat(figures(version=3), at=ahead), retain=True)
    rx = started(mosquitto, store)
    try:
        first = wait_for(
            lambda: next((u for u in store.units() if u["heartbeat"]), None), what="the replayed heartbeat"
        )
        assert first["last_seen"] <= time.time() and first["last_heartbeat_at"] <= time.time()
        assert first["level"] == "red" and "clock 3650 days ahead of the centre's" in first["reasons"][0].text
        send(pub, "heartbeat", heartbeat(figures(version=4)), retain=True)
        unit = wait_for(
            lambda: next((u for u in store.units() if u["watchlist_version"] == 4), None),
            what=lambda: f"the next heartbeat stored (row says v{store.units()[0]['watchlist_version']})",
        )
        assert unit["reasons"] == [] or all("clock" not in r.text for r in unit["reasons"])
    finally:
        pub.loop_stop()
        rx.close()
        store.close()


def test_a_replayed_offline_status_and_heartbeat_are_no_sign_of_life(mosquitto, tmp_path):
    """The unit shut down an hour ago; its retained status and heartbeat are replayed to a receiver
    that subscribes now. The fleet must say 'offline (shutdown), last seen an hour ago', not '0 s ago'."""
    store = HitStore(tmp_path / "hits.sqlite")
    pub = publisher(mosquitto)
    hour_ago = time.time() - 3600
    send(pub, "heartbeat", heartbeat(figures(), at=hour_ago - 20), retain=True)
    send(pub, "status", records.status_payload("site-a", "unit-1", "offline", "shutdown", at=hour_ago), retain=True)
    rx = started(mosquitto, store)
    try:
        unit = wait_for(
            lambda: next((u for u in store.units() if u["state"] == "offline" and u["heartbeat"]), None),
            what="the replayed status and heartbeat",
        )
    finally:
        pub.loop_stop()
        rx.close()
        store.close()
    assert unit["last_seen"] <= hour_ago, f"last seen {time.time() - unit['last_seen']:.0f} s ago"
    assert (unit["level"], [r.text for r in unit["reasons"]]) == ("red", ["offline: shutdown"])


def test_the_receiver_reads_hqs_manifests_and_a_unit_behind_them_turns_amber(mosquitto, tmp_path):
    db = tmp_path / "hits.sqlite"
    store = HitStore(db)
    hq = publisher(mosquitto)
    prefix = "checkpoint/v1/site-a/watchlist"
    published = time.time() - 7200
    # Retained before the receiver runs (it replays them), and one newer while it runs.
    hq.publish(manifest_topic(prefix, "full"), manifest(4, published), qos=1, retain=True).wait_for_publish(5)
    hq.publish(manifest_topic(prefix, "delta"), manifest(5, published, "delta"), qos=1, retain=True).wait_for_publish(5)
    hq.publish(f"{prefix}/full/4/0", b"x" * 1000, qos=1, retain=True).wait_for_publish(5)
    rx = started(mosquitto, store)
    pub = publisher(mosquitto)
    try:
        wait_for(lambda: store.publications().get("site-a", {}).get("version") == 5, what="HQ's v5 recorded")
        assert store.publications()["site-a"]["seen_at"] == pytest.approx(published), "replayed: HQ's own time"
        send(pub, "status", records.status_payload("site-a", "unit-1", "online", "connected"), retain=True)
        send(pub, "heartbeat", heartbeat(figures(version=3)), retain=True)
        wait_for(lambda: store.units() and store.units()[0]["heartbeat"], what="the unit's heartbeat")
        assert [r.text for r in store.units()[0]["reasons"]] == ["watchlist v3 behind HQ's v5 (published 2.0 h ago)"]
        line = next(line for line in units_listing(db).splitlines() if line.startswith("site-a/unit-1"))
        assert " amber " in line and "watchlist v3 behind HQ's v5" in line, line
        # A new publication while the receiver runs counts from when it was seen: within the grace, ok.
        hq.publish(manifest_topic(prefix, "full"), manifest(6, time.time() - 86400), qos=1).wait_for_publish(5)
        wait_for(lambda: store.publications()["site-a"]["version"] == 6, what="HQ's v6 recorded")
        assert store.publications()["site-a"]["seen_at"] > time.time() - 60
        assert store.units()[0]["level"] == "ok"
        # A manifest that is not one is quarantined, with why; the rest goes on.
        hq.publish(manifest_topic(prefix, "full"), b'{"kind": "full", "version": true}', qos=1).wait_for_publish(5)
        wait_for(lambda: store.rejects(), what="the bad manifest quarantined")
        assert "'version' must be a whole number" in store.rejects()[0]["error"]
        assert store.publications()["site-a"]["version"] == 6
    finally:
        hq.loop_stop()
        pub.loop_stop()
        rx.close()
        store.close()


RECEIVER_MANIFESTS_ACL_LINE = f"topic read {MANIFEST_SUBSCRIPTION}"


@pytest.mark.parametrize("granted", [False, True], ids=["acl-without-the-manifest-line", "deploy-acl-as-is"])
def test_manifests_the_brokers_acl_withholds_show_as_what_the_centre_cannot_judge(broker_factory, tmp_path, granted):
    """deploy/mosquitto/acl gives the receiver read on HQ's manifests. A site's older ACL without
    that line makes Mosquitto grant the subscription and deliver nothing: the receiver still takes
    every unit's messages, and the fleet says what it cannot judge."""
    acl = (ROOT / "deploy" / "mosquitto" / "acl").read_text()
    assert RECEIVER_MANIFESTS_ACL_LINE + "\n" in acl
    if not granted:
        acl = acl.replace(RECEIVER_MANIFESTS_ACL_LINE + "\n", "")
    users = {"receiver": "receiver-pw-1", "hq": "hq-pw-1", "site-a/unit-1": "unit-pw-1"}
    broker = broker_factory(users=users, acl=acl).start()
    db = tmp_path / "hits.sqlite"
    store = HitStore(db)
    hq = publisher(broker, username="hq", password="hq-pw-1")
    hq.publish(
        manifest_topic("checkpoint/v1/site-a/watchlist", "full"), manifest(5, time.time()), qos=1, retain=True
    ).wait_for_publish(5)
    rx = started(broker, store, username="receiver", password="receiver-pw-1")
    unit = publisher(broker, username="site-a/unit-1", password="unit-pw-1")
    try:
        send(unit, "heartbeat", heartbeat(figures()), retain=True)
        wait_for(lambda: store.units() and store.units()[0]["heartbeat"], what="the unit's heartbeat taken")
        if granted:
            wait_for(lambda: store.publications().get("site-a"), what="HQ's manifest read")
            assert units_listing(db).startswith("UNIT ")
        else:
            # Everything the broker had for the receiver came before the unit's heartbeat, which is here.
            assert store.publications() == {}
            first = units_listing(db).splitlines()[0]
            assert first.startswith("centre: site site-a: units run watchlist v3 but the centre saw no "), first
            assert first.endswith(f"needs read on {MANIFEST_SUBSCRIPTION})")
    finally:
        hq.loop_stop()
        unit.loop_stop()
        rx.close()
        store.close()


# --- the fleet page, in Debian's Chromium -------------------------------------------------------


def test_the_fleet_page_shows_red_and_amber_rows_with_their_reasons_live(mosquitto, tmp_path, new_page):
    from playwright.sync_api import expect

    from central import accounts
    from central.console import ConsoleSettings, create_app
    from central.webserver import BackgroundServer

    store = HitStore(tmp_path / "hits.sqlite")
    store.add_user("ana", "operator", accounts.hash_password("ana-password-1"), actor="test")
    pub = publisher(mosquitto)
    # HQ published v5 two hours ago; the receiver starts now and is replayed the retained manifest.
    topic = manifest_topic("checkpoint/v1/site-a/watchlist", "full")
    pub.publish(topic, manifest(5, time.time() - 7200), qos=1, retain=True).wait_for_publish(5)
    rx = started(mosquitto, store)
    server = BackgroundServer(create_app(store, settings=ConsoleSettings(poll_s=0.25))).start()
    try:
        wait_for(lambda: store.publications().get("site-a"), what="HQ's v5 recorded")
        blind = figures(
            cameras=[("gate<script>alert(1)</script>", False, CAMERA_ERROR)],
            sync={"connected": False, "last_error": SYNC_ERROR},
            version=5,
        )
        for unit_id, unit in (("unit-1", blind), ("unit-2", figures(version=3)), ("unit-3", figures(version=5))):
            send(
                pub,
                "status",
                records.status_payload("site-a", unit_id, "online", "connected"),
                retain=True,
                unit_id=unit_id,
            )
            send(pub, "heartbeat", heartbeat(unit, unit_id=unit_id), retain=True, unit_id=unit_id)
        wait_for(lambda: sum(1 for u in store.units() if u["heartbeat"]) == 3, what="three heartbeats")

        page = new_page()
        page.goto(server.url + "/fleet")
        page.fill("input[name=username]", "ana")
        page.fill("input[name=password]", "ana-password-1")
        page.click("button[type=submit]")
        page.goto(server.url + "/fleet")
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        row1, row2, row3 = (page.locator(f"tr[data-unit='site-a/unit-{i}']") for i in (1, 2, 3))
        expect(row1).to_have_class("unit level-red health-online watchlist-ok")
        expect(row1.locator("li.reason.red")).to_have_text(f"camera gate<script>alert(1)</script> down: {CAMERA_ERROR}")
        expect(row1.locator("li.reason.amber")).to_have_text(f"watchlist updates fail: {SYNC_ERROR}")
        expect(row2).to_have_class("unit level-amber health-online watchlist-ok")
        expect(row2.locator("td.reasons")).to_have_text("watchlist v3 behind HQ's v5 (published 2.0 h ago)")
        expect(row3).to_have_class("unit level-ok health-online watchlist-ok")
        # The red row looks red, not green: its badge and its cells.
        assert row1.locator(".badge").first.evaluate("e => getComputedStyle(e).color") == "rgb(179, 38, 30)"
        page.screenshot(path=str(tmp_path / "fleet.png"), full_page=True)
        # The camera comes back: the row turns ok without a reload.
        page.evaluate("window.__notReloaded = true")
        fixed = figures(sync={"connected": True}, version=5)
        send(pub, "heartbeat", heartbeat(fixed), retain=True)
        expect(row1).to_have_class("unit level-ok health-online watchlist-ok", timeout=15000)
        assert page.evaluate("window.__notReloaded") is True and dialogs == []
    finally:
        pub.loop_stop()
        server.stop()
        rx.close()
        store.close()
