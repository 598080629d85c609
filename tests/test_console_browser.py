"""The console in a real browser (Debian's Chromium via Playwright) against a real receiver fed by
a real Mosquitto and real unit reporters: live hits, two-person verification, rejection, hostile
ids, a unit going offline, and the audit chain before and after an edit in the database."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from central.cli import main as cli
from central.console_text import visible
from common.version import software_version
from testing.hits import face_jpeg, make_hit
from tests.console_support import console_site, login, send
from wire import records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Broker, store with three accounts, receiver, console over HTTP, and one unit reporting."""
    expires = time.time() + 20 * 86400
    status = {"cameras_up": 1, "cameras_total": 2, "watchlist": {"version": 3, "expires_at": expires}}
    with console_site(tmp_path_factory.mktemp("console"), "console", lambda: status) as site:
        yield site


def test_a_hit_appears_live_and_needs_two_operators_to_confirm(site, new_page):
    from playwright.sync_api import expect

    ana, ben = new_page(), new_page()
    login(ana, site.url, "ana")
    login(ben, site.url, "ben")
    ana.evaluate("window.__notReloaded = true")
    hit_id = send(site, person_id="case-2024-0173", camera_id="platform-1")
    row = ana.locator(f"tr[data-hit-id='{hit_id}']")
    # Within 2 s of being stored, without a reload.
    expect(row).to_be_visible(timeout=2000)
    assert ana.evaluate("window.__notReloaded") is True
    expect(row.locator(".name")).to_have_text("Mila Novak")  # from HQ's register
    expect(row.locator(".badge")).to_have_text("pending")
    assert ana.locator("tr.hit").first.get_attribute("data-hit-id") == hit_id, "newest first"

    row.locator(".person a").click()
    ana.wait_for_url("**/hit?id=*")
    expect(ana.locator(".enrolled img")).to_have_count(2)  # enrolment photos beside the crop
    ana.click("button.confirm")
    expect(ana.locator("#state")).to_have_text("pending")
    expect(ana.locator("ol.reviews li")).to_have_count(1)
    expect(ana.locator("button.confirm")).to_be_disabled()

    ben.goto(f"{site.url}/hit?id={hit_id}")
    expect(ben.locator("#state")).to_have_text("pending")
    ben.click("button.confirm")
    expect(ben.locator("#state")).to_have_text("confirmed")
    # The first operator's open page follows without a reload.
    expect(ana.locator("#state")).to_have_text("confirmed")
    reviews = site.store.reviews(hit_id)
    assert [(r["username"], r["decision"]) for r in reviews] == [("ana", "confirm"), ("ben", "confirm")]


def test_one_rejection_with_a_reason_closes_a_hit(site, new_page):
    from playwright.sync_api import expect

    page = new_page()
    login(page, site.url, "ben")
    hit_id = send(site, person_id="case-2023-0412")
    page.goto(f"{site.url}/hit?id={hit_id}")
    page.fill("input[name=reason]", "not him: different ears")
    page.click("button.reject")
    expect(page.locator("#state")).to_have_text("rejected")
    expect(page.locator("ol.reviews")).to_contain_text("not him: different ears")
    expect(page.locator("button.confirm")).to_have_count(0)
    assert site.store.hit(hit_id)["review_state"] == "rejected"


def test_hostile_ids_render_as_text(site, new_page):
    from playwright.sync_api import expect

    person = "<script>window.__xss=1</script>\"'"
    camera = '<img src=x onerror="window.__xss=2">\'\u202e'
    page = new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page, site.url, "ana")
    # Markup and quotes travel over MQTT from a real unit; control characters are refused on the
    # wire, so a hit holding them is put straight into the store (as an older receiver might have).
    hit_id = send(site, person_id=person, camera_id=camera)
    controls = person + "\x07\x1b[2J"
    raw = make_hit(crop=face_jpeg())
    fields, crop = records.decode_hit(records.hit_payload(records.hit_record(raw, "site-a"), raw.crop_jpeg, None))
    site.store.add_hit({**fields, "person_id": controls, "camera_id": controls}, crop)
    for hid, shown_person, shown_camera in ((hit_id, person, camera), (raw.id, controls, controls)):
        row = page.locator(f"tr[data-hit-id='{hid}']")
        expect(row).to_be_visible(timeout=5000)
        expect(row.locator(".person a")).to_have_text(visible(shown_person))
        expect(row.locator(".camera")).to_have_text(visible(shown_camera))
        page.goto(f"{site.url}/hit?id={hid}")
        expect(page.locator("h1 .pid")).to_have_text(visible(shown_person))
        assert page.evaluate("window.__xss") is None
        assert page.locator("main script, main img[src=x]").count() == 0
        page.goto(f"{site.url}/hits")
    assert dialogs == []


def test_fleet_shows_a_unit_going_offline_when_its_reporter_is_killed(site, new_page):
    from playwright.sync_api import expect

    page = new_page()
    login(page, site.url, "ana")
    page.goto(site.url + "/fleet")
    unit1 = page.locator("tr[data-unit='site-a/unit-1']")
    expect(unit1.locator(".badge").first).to_have_text("online")
    expect(unit1).to_contain_text(software_version())  # the unit's own version, from its heartbeat
    expect(unit1).to_contain_text("1/2")
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "reporter_child.py"), "--port", str(site.broker.port), "--unit", "unit-9"]
        + ["--outbox", str(site.tmp / "child-outbox.sqlite")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    try:
        assert child.stdout.readline().startswith("submitted")
        unit9 = page.locator("tr[data-unit='site-a/unit-9']")
        expect(unit9.locator(".badge").first).to_have_text("online", timeout=15000)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        expect(unit9.locator(".badge").first).to_have_text("offline", timeout=15000)
        expect(unit9).to_have_class("unit level-red health-offline watchlist-unknown")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_audit_chain_verifies_and_fails_after_an_edit(site, new_page):
    from playwright.sync_api import expect

    page = new_page()
    login(page, site.url, "sam")
    page.goto(site.url + "/audit")
    expect(page.locator("#verdict")).to_contain_text("Chain intact")
    # The head, shown in full to be noted elsewhere, is the entry it names (more may have come since).
    count, digest = page.locator("#head").inner_text().split(":")
    entries = {e["seq"]: e["hash"] for e in site.store.audit_entries(limit=None)}
    assert entries[int(count)] == digest
    actions = {e["action"] for e in site.store.audit_entries(limit=None)}
    assert {"user_add", "login", "view_crop", "decision", "watchlist_seen"} <= actions
    db = str(site.tmp / "hits.sqlite")
    res = CliRunner().invoke(cli, ["audit", "verify", "--db", db])
    assert res.exit_code == 0 and "intact" in res.output

    decision = next(e for e in site.store.audit_entries(limit=None) if e["action"] == "decision")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?", (json.dumps({"decision": "reject"}), decision["seq"]))
    conn.close()
    page.reload()
    expect(page.locator("#verdict")).to_contain_text(f"entry {decision['seq']}")
    expect(page.locator("#verdict")).to_contain_text("Chain broken")
    res = CliRunner().invoke(cli, ["audit", "verify", "--db", db])
    assert res.exit_code == 1 and f"entry {decision['seq']}" in res.output
