"""The operators' desk (issue 21) in Debian's Chromium via Playwright, against a real receiver fed by
a real Mosquitto and a real unit reporter: sightings decided once, the live count and tab title, a
sound and a desktop notification on a new sighting, escalation, sessions that follow an open page,
the login page after a session's end, who is on duty, the hit page's decision above the fold at
1280x720 with the camera's name and local time, closed cases, audit without noise, CSV exports."""

from __future__ import annotations

import csv
import io
import json
import time
from types import SimpleNamespace

import pytest

from central.console import ConsoleSettings, create_app
from central.register_view import RegisterView
from central.store import HitStore
from central.webserver import BackgroundServer
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, MosquittoBroker, find_mosquitto, wait_for
from testing.console_demo import DEMO_PERSONS, seed_demo
from testing.hits import face_jpeg, make_hit
from tests.console_support import PASSWORDS, add_users, signing_unit, start_receiver
from tests.services import missing_service
from wire import records

CAMERA_NAME = "Platform 1 <north> stairs"
CAMERA_PLACE = "east end, looking at the doors"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Broker, store with three accounts, receiver, the console over HTTP, and one signing unit whose
    heartbeat names its camera. `serve(**settings)` starts another console on the same store."""
    if find_mosquitto() is None:
        missing_service("needs the mosquitto broker binary (apt-get install -y mosquitto mosquitto-clients)")
    tmp = tmp_path_factory.mktemp("desk")
    broker = MosquittoBroker(tmp / "broker").start()
    demo = seed_demo(tmp / "demo")  # its register (releases: case-2019-0007 removed in 42) and photos
    store = HitStore(tmp / "hits.sqlite")
    add_users(store, "ana", "ben", "sam")
    key = signing_unit(tmp)
    rx = start_receiver(broker, store, "rx-desk", reconnect_max_delay_s=0.5, unit_keys=tmp / "unit-keys")
    register = RegisterView(demo.register, demo.photos)
    servers = []

    def serve(**settings) -> str:
        app = create_app(store, register=register, settings=ConsoleSettings(poll_s=0.25, **settings))
        servers.append(BackgroundServer(app).start())
        return servers[-1].url

    url = serve()
    reporter = MqttReporter(
        MqttConfig(host=broker.host, port=broker.port, site="site-a", signing_key=key, **FAST),
        OutboxConfig(path=tmp / "outbox.sqlite"),
        "unit-1",
        lambda: {
            "cameras_up": 1,
            "cameras_total": 1,
            "cameras": [{"id": "platform-1", "name": CAMERA_NAME, "location": CAMERA_PLACE}],
        },
    )
    wait_for(lambda: store.camera_names(), what="the unit's heartbeat with its camera names")
    yield SimpleNamespace(broker=broker, store=store, rx=rx, url=url, serve=serve, reporter=reporter, tmp=tmp)
    reporter.close()
    for server in servers:
        server.stop()
    rx.close()
    store.close()
    broker.kill()


@pytest.fixture
def page_for(chromium):
    """page_for(url, user, **context options) -> a logged-in page in its own browser context."""
    contexts = []

    def make(url: str, user: str, **options):
        ctx = chromium.new_context(**{"viewport": {"width": 1280, "height": 720}, **options})
        ctx.set_default_timeout(15000)
        contexts.append(ctx)
        page = ctx.new_page()
        page.goto(url + "/hits")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", PASSWORDS[user])
        page.click("button[type=submit]")
        page.wait_for_url("**/hits")
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def send(site, **fields) -> str:
    hit = make_hit(crop=face_jpeg(), camera_id="platform-1", **fields)
    site.reporter.submit(hit)
    wait_for(lambda: site.store.hit(hit.id) is not None, what=f"hit {hit.id} stored")
    return hit.id


def test_hits_of_one_person_are_one_sighting_decided_once(site, page_for):
    from playwright.sync_api import expect

    ana, ben = page_for(site.url, "ana"), page_for(site.url, "ben")
    t0 = time.time()
    first = send(site, person_id="case-2022-0088", captured_at=t0, score=0.70, track_id=1)
    row = ana.locator(f"tr[data-sighting-id='{first}']")
    expect(row).to_be_visible()
    ids = [first] + [
        send(site, person_id="case-2022-0088", captured_at=t0 + 40 * k, score=0.70 + 0.02 * k, track_id=1 + k)
        for k in (1, 2)
    ]
    # One row for the three hits, live, its crop the best hit's; nobody is asked three times.
    expect(row).to_have_attribute("data-hits", "3")
    expect(row.locator("td.count")).to_contain_text("3 hits")
    expect(row).to_have_attribute("data-hit-id", ids[2])
    assert ana.locator("tr.sighting[data-sighting-id]").filter(has_text="case-2022-0088").count() == 1

    ana.goto(f"{site.url}/hit?id={ids[0]}")
    ana.click("button.confirm")
    expect(ana.locator("#state")).to_have_text("pending")
    ben.goto(f"{site.url}/hit?id={ids[1]}")  # another hit of the same sighting
    expect(ben.locator("button.confirm")).to_be_enabled()
    ben.click("button.confirm")
    expect(ben.locator("#state")).to_have_text("confirmed")
    expect(ana.locator("#state")).to_have_text("confirmed")
    assert {site.store.hit(h)["review_state"] for h in ids} == {"confirmed"}

    # A later hit of the decided sighting shows the decision instead of asking again.
    later = send(site, person_id="case-2022-0088", captured_at=t0 + 150, score=0.72, track_id=9)
    ana.goto(f"{site.url}/hits")
    expect(ana.locator(f"tr[data-sighting-id='{first}']")).to_have_attribute("data-hits", "4")
    ana.goto(f"{site.url}/hit?id={later}")
    expect(ana.locator("#state")).to_have_text("confirmed")
    expect(ana.locator("#after-decision")).to_be_visible()
    expect(ana.locator("button.confirm")).to_have_count(0)
    decisions = [e for e in site.store.audit_entries(limit=None) if e["action"] == "decision"]
    assert [json.loads(e["detail"])["sighting"] for e in decisions[:2]] == [first, first]


def test_a_hit_joining_two_pending_sightings_merges_them_live(site, page_for):
    from playwright.sync_api import expect

    page = page_for(site.url, "ben")
    t0 = time.time() - 20000
    # Track 1 (sighting A), another track ten minutes on (B), then track 1 again near B: one sighting.
    a = send(site, person_id="case-2021-0311", captured_at=t0, score=0.70, track_id=41)
    b = send(site, person_id="case-2021-0311", captured_at=t0 + 600, score=0.90, track_id=42)
    expect(page.locator(f"tr[data-sighting-id='{b}']")).to_be_visible()
    bridge = send(site, person_id="case-2021-0311", captured_at=t0 + 650, score=0.75, track_id=41)
    row = page.locator(f"tr[data-sighting-id='{a}']")
    expect(row).to_have_attribute("data-hits", "3")
    expect(row).to_have_attribute("data-hit-id", b)  # the best crop of all three
    expect(page.locator(f"tr[data-sighting-id='{b}']")).to_have_count(0)
    page.goto(f"{site.url}/hit?id={bridge}")
    expect(page.locator("#sighting")).to_contain_text("3 hits")
    merged = [e for e in site.store.audit_entries(limit=5) if e["action"] == "sighting_merged"]
    assert merged and merged[0]["subject"] == a and json.loads(merged[0]["detail"])["merged"] == [b]


def test_a_new_sighting_updates_count_and_title_sounds_and_notifies(site, page_for):
    from playwright.sync_api import expect

    page = page_for(site.url, "ana", permissions=["notifications"])
    page.click("#sound-toggle")  # a click: browsers play audio only after one
    expect(page.locator("#sound-toggle")).to_have_text("Sound on")
    page.click("#notify-toggle")
    expect(page.locator("#notify-toggle")).to_have_text("Desktop alerts on")
    before = int(page.locator("#pending-count").inner_text())
    send(site, person_id="case-2024-0173", unit_id="unit-1", captured_at=time.time() - 3600)  # priority 9
    expect(page.locator("#pending-count")).to_have_text(str(before + 1))
    expect(page).to_have_title(f"({before + 1}) Sightings · checkpoint console")
    # Playwright's wait_for_function evaluates a string, which the console's CSP forbids; evaluate does not.
    wait_for(lambda: page.evaluate("window.checkpointDesk.alerts.some(a => a.kind === 'sound')"), what="a sound")
    alerts = page.evaluate("window.checkpointDesk.alerts")
    sound = next(a for a in alerts if a["kind"] == "sound")
    # It played (the oscillator ran to its end in a running context), the urgent level for priority 9.
    assert sound == {"kind": "sound", "urgent": True, "gain": 0.9, "state": "running"}
    assert {"kind": "notification", "urgent": True} in alerts

    # Muted by this operator: the next sighting is counted but silent; the choice survives a reload.
    page.click("#sound-toggle")
    page.reload()
    expect(page.locator("#sound-toggle")).to_have_text("Sound off")
    n = int(page.locator("#pending-count").inner_text())
    send(site, person_id="case-2023-0412", captured_at=time.time() - 3000)  # priority 6
    expect(page.locator("#pending-count")).to_have_text(str(n + 1))
    wait_for(
        lambda: page.evaluate("window.checkpointDesk.alerts.some(a => a.kind === 'notification' && !a.urgent)"),
        what="a notification",
    )
    assert [a for a in page.evaluate("window.checkpointDesk.alerts") if a["kind"] == "sound"] == []


def test_a_sighting_pending_too_long_is_marked_and_counted(site, page_for):
    from playwright.sync_api import expect

    url = site.serve(overdue_after_s=2.0)
    page = page_for(url, "ben")
    sid = send(site, person_id="case-2022-0088", unit_id="unit-1", captured_at=time.time() - 7200)
    row = page.locator(f"tr[data-sighting-id='{sid}']")
    expect(row).to_be_visible()
    # Two seconds on it turns overdue without a reload: marked, and counted in the header.
    expect(row).to_have_class("hit sighting state-pending overdue")
    expect(row.locator(".badge.overdue")).to_contain_text("waiting")
    expect(page.locator("#overdue")).to_be_visible()
    assert int(page.locator("#overdue-count").inner_text()) >= 1
    assert "!)" in page.title()


def test_an_open_page_keeps_its_session_and_a_hit_after_the_idle_time_shows(site, page_for):
    from playwright.sync_api import expect

    url = site.serve(session_idle_s=2.0)
    page = page_for(url, "ana")
    page.evaluate("window.__notReloaded = true")
    started = time.time()
    # The page sits idle well past the idle timeout; only its event stream touches the session.
    wait_for(
        lambda: any(
            s["last_seen"] > started + 4.0
            for s in site.store._read("SELECT last_seen FROM sessions WHERE username = 'ana'")
        ),
        timeout=20,
        what="the open page's stream kept the session alive past twice the idle timeout",
    )
    hit_id = send(site, person_id="case-2023-0412", captured_at=time.time() - 5000)
    expect(page.locator(f"tr[data-hit-id='{hit_id}']")).to_be_visible()
    assert "/hits" in page.url and page.evaluate("window.__notReloaded") is True


def test_an_ended_session_lands_on_a_login_page_that_says_what_waits(site, page_for):
    from playwright.sync_api import expect

    url = site.serve(session_ttl_s=3.0)
    page = page_for(url, "ben")
    page.wait_for_url("**/login?next=*", timeout=20000)
    waiting = site.store.desk(300)["pending"]
    expect(page.locator("#waiting")).to_contain_text(f"{waiting} sighting")
    expect(page.locator("#waiting")).to_contain_text("Your session ended")
    # Someone who never had a session learns nothing from the login page.
    other = page.context.browser.new_context()
    try:
        fresh = other.new_page()
        fresh.goto(url + "/login")
        expect(fresh.locator("input[name=username]")).to_be_visible()
        assert fresh.locator("#waiting").count() == 0
    finally:
        other.close()


def test_who_is_on_duty_is_in_the_header(site, page_for):
    from playwright.sync_api import expect

    ana = page_for(site.url, "ana")
    page_for(site.url, "ben")
    ana.reload()
    expect(ana.locator("#on-duty")).to_contain_text("ana")
    expect(ana.locator("#on-duty")).to_contain_text("ben")


def test_the_hit_page_decides_above_the_fold_with_camera_name_and_local_time(site, page_for):
    from playwright.sync_api import expect

    page = page_for(site.url, "ana", timezone_id="Europe/Vienna")
    hit_id = send(site, person_id="case-2024-0173", unit_id="unit-1", captured_at=time.time() - 9000)
    page.goto(f"{site.url}/hit?id={hit_id}")
    # Wholly inside the 1280x720 screen, nothing to scroll to (the panel may be re-rendered live: expect waits).
    for control in ("button.confirm", "button.reject", "input[name=reason]", "#state"):
        expect(page.locator(control)).to_be_in_viewport(ratio=1.0)
    expect(page.locator("figcaption .camera-name")).to_have_text(f"{CAMERA_NAME} · {CAMERA_PLACE}")  # text, not markup
    expect(page.locator("figcaption time.when")).to_contain_text("UTC")
    expect(page.locator("figcaption time.when .local")).to_contain_text("Europe/Vienna")


def test_the_sites_local_time_is_beside_utc_where_the_unit_states_its_zone(site, page_for):
    from playwright.sync_api import expect

    tokyo = MqttReporter(
        MqttConfig(host=site.broker.host, port=site.broker.port, site="site-a", **FAST),
        OutboxConfig(path=site.tmp / "tokyo-outbox.sqlite"),
        "unit-tokyo",
        lambda: {"cameras_up": 1, "cameras_total": 1, "timezone": "Asia/Tokyo"},
    )
    try:
        wait_for(lambda: ("site-a", "unit-tokyo") in site.store.unit_zones(), what="unit-tokyo's zone")
        page = page_for(site.url, "ana", timezone_id="America/New_York")
        at = 1_767_261_600.0  # 2026-01-01 10:00:00 UTC, 19:00 in Tokyo
        hit = make_hit(unit_id="unit-tokyo", crop=face_jpeg(), person_id="case-2023-0412", captured_at=at)
        tokyo.submit(hit)
        wait_for(lambda: site.store.hit(hit.id) is not None, what="the Tokyo unit's hit stored")
        row = page.locator(f"tr[data-hit-id='{hit.id}'] td.time")
        expect(row.locator(".site")).to_contain_text("2026-01-01 19:00:00 JST at the site (Asia/Tokyo)")
        expect(row.locator(".local")).to_have_count(0)  # the site's time, not the operator's
        page.goto(f"{site.url}/hit?id={hit.id}")
        caption = page.locator("figcaption time.when")
        expect(caption).to_contain_text("2026-01-01 10:00:00 UTC")
        expect(caption.locator(".site")).to_contain_text("19:00:00 JST at the site (Asia/Tokyo)")
        # A unit that states no zone: the browser's, said to be the browser's.
        other = send(site, person_id="case-2023-0412", captured_at=at)
        page.goto(f"{site.url}/hit?id={other}")
        expect(page.locator("figcaption time.when .local")).to_contain_text("America/New_York (your browser's zone)")
        expect(page.locator("figcaption time.when .site")).to_have_count(0)
    finally:
        tokyo.close()


def test_a_pending_sighting_of_a_removed_person_is_a_closed_case(site, page_for):
    from playwright.sync_api import expect

    removed = DEMO_PERSONS[3][0]  # listed in release 41, gone from 42
    page = page_for(site.url, "ana")
    hit_id = send(site, person_id=removed, captured_at=time.time() - 12000)
    row = page.locator(f"tr[data-hit-id='{hit_id}']")
    expect(row.locator(".badge.closed")).to_have_text("case closed")
    page.goto(f"{site.url}/hit?id={hit_id}")
    expect(page.locator("#closed")).to_have_text("case closed")
    expect(page.locator("#closed-note")).to_contain_text("version 42")
    expect(page.locator("button.confirm")).to_have_count(0)
    # A confirmation sent anyway (a form kept from before) is refused.
    csrf = site.store._read("SELECT csrf FROM sessions WHERE username = 'ana' ORDER BY created_at DESC LIMIT 1")
    res = page.request.post(
        f"{site.url}/hit/decide", form={"csrf": csrf[0]["csrf"], "id": hit_id, "decision": "confirm"}
    )
    assert res.status == 409 and "case closed" in res.text()
    assert site.store.reviews(hit_id) == [] and site.store.hit(hit_id)["review_state"] == "pending"


def test_audit_has_crops_opened_on_the_hit_page_once_and_no_version_0(site, page_for):
    from playwright.sync_api import expect

    page = page_for(site.url, "sam")
    before = site.store.audit_head().count
    hit_id = send(site, person_id="case-2023-0412", watchlist_version=0, captured_at=time.time() - 15000)
    expect(page.locator(f"tr[data-hit-id='{hit_id}'] img")).to_be_visible()
    thumb = f"document.querySelector(\"tr[data-hit-id='{hit_id}'] img\").naturalWidth > 0"
    wait_for(lambda: page.evaluate(thumb), what="the thumbnail loaded")
    new = [e for e in site.store.audit_entries(limit=None) if e["seq"] > before]
    assert [e["action"] for e in new] == [], "a list view and its thumbnails write nothing"
    for _ in range(2):
        page.goto(f"{site.url}/hit?id={hit_id}")
        wait_for(lambda: page.evaluate("document.querySelector('figure.big img').naturalWidth > 0"), what="the crop")
    new = [e for e in site.store.audit_entries(limit=None) if e["seq"] > before]
    assert [(e["action"], e["subject"]) for e in new] == [("view_crop", hit_id)]


def test_the_context_frame_is_beside_the_crop_on_the_hit_page_only_and_audited_once(site, page_for):
    from playwright.sync_api import expect

    from edge.hits import CropConfig, encode_context
    from tests.test_context_frame import scene

    page = page_for(site.url, "sam")
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    before = site.store.audit_head().count
    frame = encode_context(scene(), (500.0, 200.0, 650.0, 400.0), CropConfig(context_frame=True))
    hit_id = send(site, person_id="case-2022-0088", captured_at=time.time() - 25000, context_jpeg=frame)
    expect(page.locator(f"tr[data-hit-id='{hit_id}'] img")).to_be_visible()
    assert not [u for u in requested if "/hit/context" in u], "the list never shows the scene"
    for _ in range(2):
        page.goto(f"{site.url}/hit?id={hit_id}")
        img = page.locator("figure.context img")
        expect(img).to_be_visible()
        wait_for(
            lambda: page.evaluate("document.querySelector('figure.context img').naturalWidth") == 640, what="frame"
        )
        # Beside the crop, and the decision still wholly in the 1280x720 screen.
        crop_box, frame_box = page.locator("figure.big img").bounding_box(), img.bounding_box()
        assert frame_box["x"] > crop_box["x"] + crop_box["width"]
        for control in ("button.confirm", "button.reject", "input[name=reason]"):
            expect(page.locator(control)).to_be_in_viewport(ratio=1.0)
    new = [e for e in site.store.audit_entries(limit=None) if e["seq"] > before and e["action"].startswith("view_")]
    assert sorted((e["action"], e["subject"]) for e in new) == [("view_context", hit_id), ("view_crop", hit_id)]
    # A hit whose frame the outbox had to drop says so instead.
    dropped = make_hit(
        crop=face_jpeg(), camera_id="platform-1", person_id="case-2022-0088", captured_at=time.time() - 30000
    )
    record = records.hit_payload(
        records.hit_record(dropped, "site-a"), dropped.crop_jpeg, None, context_dropped="outbox_full"
    )
    site.store.add_hit(*records.decode_hit(record))
    page.goto(f"{site.url}/hit?id={dropped.id}")
    expect(page.locator("#context-frame")).to_have_text("The unit's context frame was not kept (outbox_full).")


def test_exports_carry_iso_times_and_come_as_csv(site, page_for):
    page = page_for(site.url, "sam")
    page.goto(site.url + "/audit")
    with page.expect_download() as dl:
        page.click("text=Export hits with decisions (CSV)")
    download = dl.value
    assert download.suggested_filename.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(open(download.path(), encoding="utf-8").read())))
    assert len(rows) == site.store.count_hits()
    confirmed = next(r for r in rows if r["review_state"] == "confirmed")
    assert confirmed["captured_at"].endswith("Z") and confirmed["captured_at"][:2] == "20"
    assert "ana confirm 20" in confirmed["decisions"] and "ben confirm" in confirmed["decisions"]
    with page.expect_download() as dl:
        page.click("text=Export hits with decisions (JSON lines)")
    line = json.loads(open(dl.value.path(), encoding="utf-8").readline())
    assert line["received_at"].endswith("Z") and "T" in line["received_at"]
    actions = [json.loads(e["detail"]) for e in site.store.audit_entries(limit=3) if e["action"] == "export"]
    assert {"what": "hits", "format": "csv", "count": len(rows), "since": None} in actions


def test_the_hit_page_says_the_score_in_words_from_the_units_calibration(site, page_for):
    from playwright.sync_api import expect

    page = page_for(site.url, "ana")
    # Signed by the unit, through the broker and the receiver, as a unit with a calibration sends it.
    rated = send(site, person_id="case-2021-0311", score=0.991, stranger_rate=1 / 12_345)
    stored = site.store.hit(rated)
    assert stored["stranger_rate"] == pytest.approx(1 / 12_345) and stored["signature"] == "valid"
    page.goto(f"{site.url}/hit?id={rated}")
    expect(page.locator("#stranger-rate")).to_have_text(
        "About 1 in 12,000 faces of people not on the list score this high against someone on it "
        "(model dlib-resnet-v1 calibration)"
    )
    expect(page.locator("#stranger-rate")).to_be_in_viewport(ratio=1.0)
    # An older unit (or a model without a calibration) sends none: the raw score alone, and why.
    older = send(site, person_id="case-2021-0311", score=0.991, captured_at=time.time() + 1)
    assert site.store.hit(older)["stranger_rate"] is None
    page.goto(f"{site.url}/hit?id={older}")
    expect(page.locator("#stranger-rate")).to_contain_text("The unit sent no calibrated figure for this score")
    expect(page.locator(".facts")).to_contain_text("0.991 against threshold 0.600")
