"""A sighting's printable case report (issue 21, item 8) in Debian's Chromium via Playwright, against a
real receiver fed by a real Mosquitto and a real signing unit whose heartbeat names its camera and
states its zone: the person, each hit's time with the site's zone, the crops, scenes and enrolment
photos inside the page, the decisions with their reasons and the audit lines; a closed case; text
from a unit escaped; one audit entry per opening; a PDF without the console's header; and
`checkpoint-receiver report` writing the same report to a file that stands alone."""

from __future__ import annotations

import datetime as dt
import re
import time
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from central.cli import main as cli
from central.console_text import visible
from central.register_view import RegisterView
from central.store import HitStore
from testing.broker import wait_for
from testing.console_demo import DEMO_PERSONS
from testing.hits import face_jpeg, make_hit
from tests.console_support import console_site, login
from tests.console_support import send as send_hit
from wire import records

CAMERA_NAME = "Platform 1 <north> stairs"
CAMERA_PLACE = "east end"
ZONE = "Asia/Tokyo"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Broker, store with three accounts, receiver, the console over HTTP with HQ's register and
    photos (the demo's), and one signing unit in Tokyo whose heartbeat names its camera."""
    status = {
        "cameras_up": 1,
        "cameras_total": 1,
        "timezone": ZONE,
        "cameras": [{"id": "platform-1", "name": CAMERA_NAME, "location": CAMERA_PLACE}],
    }
    with console_site(tmp_path_factory.mktemp("report"), "report", lambda: status) as site:
        wait_for(lambda: ("site-a", "unit-1") in site.store.unit_zones(), what="the unit's heartbeat with its zone")
        yield site


def send(site, **fields) -> str:
    return send_hit(site, **{"camera_id": "platform-1", **fields})


def at_the_site(ts: float) -> str:
    local = dt.datetime.fromtimestamp(ts, ZoneInfo(ZONE))
    return f"{local:%Y-%m-%d %H:%M:%S} {local.tzname()} at the site ({ZONE})"


def test_the_report_holds_the_person_hits_decisions_and_audit_lines_and_its_opening_is_audited_once(site, new_page):
    from playwright.sync_api import expect

    from edge.hits import CropConfig, encode_context
    from tests.test_context_frame import scene

    person, name, priority = DEMO_PERSONS[0]
    t0 = float(int(time.time()) - 40000)
    frame = encode_context(scene(), (500.0, 200.0, 650.0, 400.0), CropConfig(context_frame=True))
    # Sent out of order: the report lists them by capture time.
    late = send(site, person_id=person, captured_at=t0 + 60, score=0.74, track_id=2, context_jpeg=frame)
    early = send(site, person_id=person, captured_at=t0, score=0.71, track_id=1)
    sid = site.store.hit(late)["sighting_id"]
    assert site.store.hit(early)["sighting_id"] == sid
    site.store.decide(early, "ana", "confirm")
    site.store.decide(late, "ben", "reject", "not her: <b>no scar</b> on the left cheek")

    page = new_page()
    login(page, site.url, "sam")
    page.goto(f"{site.url}/hit?id={late}")
    expect(page.locator("#case-report")).to_have_text("Case report (printable)")
    assert page.locator("#case-report").get_attribute("href") == f"/sighting/report?id={sid}"

    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    before = site.store.audit_head().count
    response = page.goto(f"{site.url}/sighting/report?id={sid}")
    assert response is not None and response.status == 200
    assert "img-src 'self' data:" in response.headers["content-security-policy"]
    heading = page.locator("#report-person")
    expect(heading).to_contain_text(f"{person} — {name}")
    expect(heading.locator(".prio")).to_have_text(f"priority {priority}")
    expect(page.locator("#report-state")).to_have_text("rejected")
    expect(page.locator("#report-cameras")).to_have_text(f"{CAMERA_NAME} · {CAMERA_PLACE}")
    expect(page.locator("#report-zone")).to_contain_text(ZONE)
    expect(page.locator("#report-generated")).to_contain_text("by sam (the console)")

    # Each hit, oldest capture first, its time in UTC and at the site, its score in words, its crop inside the page.
    rows = page.locator("tr.hit")
    expect(rows).to_have_count(2)
    assert [rows.nth(i).get_attribute("data-hit-id") for i in range(2)] == [early, late]
    for i, ts in enumerate((t0, t0 + 60)):
        captured = rows.nth(i).locator(".captured time.when")
        expect(captured).to_contain_text(f"{dt.datetime.fromtimestamp(ts, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        expect(captured.locator(".site")).to_contain_text(at_the_site(ts))
        expect(rows.nth(i).locator("td.crop img")).to_have_attribute("src", re.compile("^data:image/jpeg;base64,"))
    expect(rows.nth(1).locator("td.context img")).to_have_attribute("src", re.compile("^data:image/jpeg;base64,"))
    expect(rows.nth(0).locator("td.context")).to_have_text("none sent")
    photos = page.locator("#report-compare figure.report-photo img")
    expect(photos).to_have_count(len(list((site.demo.photos / person).iterdir())))
    loaded = "[...document.images].every(i => i.complete && i.naturalWidth > 0)"
    wait_for(lambda: page.evaluate(loaded), what="every image of the report drawn")

    decisions = page.locator("#report-decisions tr.review")
    expect(decisions).to_have_count(2)
    for row, who, what in ((decisions.nth(0), "ana", "confirmed"), (decisions.nth(1), "ben", "rejected")):
        expect(row.locator("td").nth(0)).to_have_text(who)
        expect(row.locator("td").nth(1)).to_have_text(what)
        expect(row.locator("td time.when .site")).to_contain_text(ZONE)
    expect(decisions.nth(1).locator("td.reason")).to_have_text("“not her: <b>no scar</b> on the left cheek”")
    expect(page.locator("#report-decisions")).to_contain_text("Rejected by ben")

    # The audit lines about it: the two decisions and this very opening, nothing about other sightings.
    lines = page.locator("#report-audit tr.line")
    expect(lines.filter(has_text="decision")).to_have_count(2)
    expect(lines.filter(has_text="view_report")).to_have_count(1)
    new = [e for e in site.store.audit_entries(limit=None) if e["seq"] > before]
    assert [(e["action"], e["subject"], e["actor"]) for e in new] == [("view_report", sid, "sam")]
    # The images are in the page: no crop, scene or photo was fetched (nor audited) one by one.
    assert not [u for u in requested if "/hit/" in u or "/person/photo" in u]

    # Any hit of the sighting names it; a hit id nobody has is not found; no report without a session.
    page.goto(f"{site.url}/sighting/report?id={early}")
    expect(page.locator("#report-person")).to_contain_text(person)
    assert page.request.get(f"{site.url}/sighting/report?id=no-such-thing").status == 404
    other = new_page()
    other.goto(f"{site.url}/sighting/report?id={sid}")
    expect(other.locator("input[name=username]")).to_be_visible()


def test_a_closed_case_says_so_with_the_date_hq_released_the_list(site, new_page):
    from playwright.sync_api import expect

    from watchlist.format import register_read

    removed = DEMO_PERSONS[3][0]  # listed in release 41, gone from 42
    published = float(int(time.time()) - 3 * 86400)
    site.store.set_publication("site-a", 42, published, published + 5, "checkpoint/v1/site-a/watchlist/full/manifest")
    hit_id = send(site, person_id=removed, captured_at=time.time() - 50000)
    page = new_page()
    login(page, site.url, "ana")
    page.goto(f"{site.url}/sighting/report?id={hit_id}")
    # HQ's own date of release 42, from its register (not when the centre saw it published).
    conn = register_read.open_read_only(site.demo.register)
    released = register_read.released_at(conn, 42)
    conn.close()
    assert released is not None and released != published
    day = f"{dt.datetime.fromtimestamp(released, dt.timezone.utc):%Y-%m-%d %H:%M:%S}"
    expect(page.locator("#report-closed")).to_have_text(f"case closed by HQ on {day} UTC")
    expect(page.locator("#report-case")).to_contain_text("removed this person from the watchlist in version 42")
    expect(page.locator("#report-state")).to_have_text("pending")
    expect(page.locator("#report-decisions")).to_contain_text(
        "the case is closed at HQ: this sighting cannot be confirmed"
    )
    expect(page.locator("#report-person .prio")).to_have_count(0)


def test_text_from_a_unit_is_escaped_and_no_script_runs(site, new_page):
    from playwright.sync_api import expect

    person = "<script>window.__xss=1</script>\"'"
    camera = '<img src=x onerror="window.__xss=2">\'\u202e'
    hostile = send(site, person_id=person, camera_id=camera, captured_at=time.time() - 60000)
    # Control characters are refused on the wire: such a hit is put straight into the store.
    controls = "case-\x1b[2J\u202e-x"
    raw = make_hit(crop=face_jpeg(), camera_id=camera, captured_at=time.time() - 61000)
    fields, crop = records.decode_hit(records.hit_payload(records.hit_record(raw, "site-a"), raw.crop_jpeg, None))
    site.store.add_hit({**fields, "person_id": controls}, crop)
    page = new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page, site.url, "ana")
    for hit_id, shown in ((hostile, person), (raw.id, controls)):
        page.goto(f"{site.url}/sighting/report?id={hit_id}")
        expect(page.locator("#report-person .pid")).to_have_text(visible(shown))
        expect(page.locator("tr.hit td.about")).to_contain_text(visible(camera))
        assert page.evaluate("window.__xss") is None
        assert page.locator("#report script, #report img[src=x]").count() == 0
    assert dialogs == []


def test_the_report_prints_to_pdf_without_the_console_header(site, new_page):
    from playwright.sync_api import expect

    first = send(site, person_id=DEMO_PERSONS[1][0], captured_at=time.time() - 70000, score=0.7)
    page = new_page()
    login(page, site.url, "ben")
    page.goto(f"{site.url}/sighting/report?id={first}")
    expect(page.locator("header.top nav")).to_be_visible()
    page.emulate_media(media="print")
    expect(page.locator("header.top nav")).to_be_hidden()
    expect(page.locator("header.top")).to_be_hidden()
    expect(page.locator(".report-controls")).to_be_hidden()
    expect(page.locator("#report-person")).to_be_visible()
    pdf = page.pdf(prefer_css_page_size=True, print_background=True)
    assert pdf.startswith(b"%PDF-")
    pages = len(re.findall(rb"/Type\s*/Page\b", pdf))
    # The hits and the audit lines each start a page of their own (A4, the style's @page).
    assert pages >= 3, f"{pages} pages"
    size = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", pdf)
    assert size and abs(float(size.group(1)) - 595.3) < 2 and abs(float(size.group(2)) - 841.9) < 2, "A4 portrait"


def test_the_command_line_writes_the_same_report_to_a_file_that_stands_alone(site, new_page):
    from playwright.sync_api import expect

    person, name, _ = DEMO_PERSONS[2]
    hit_id = send(site, person_id=person, captured_at=time.time() - 80000)
    sid = site.store.hit(hit_id)["sighting_id"]
    out = site.tmp / "case.html"
    before = site.store.audit_head().count
    args = ["report", "--db", str(site.tmp / "hits.sqlite"), "--register", str(site.demo.register)]
    result = CliRunner().invoke(cli, [*args, "--photos", str(site.demo.photos), hit_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"sighting {sid}" in result.output
    new = [e for e in site.store.audit_entries(limit=None) if e["seq"] > before]
    assert [(e["action"], e["subject"]) for e in new] == [("view_report", sid)]
    assert new[0]["actor"].startswith("cli:")

    page = new_page()
    page.goto(out.as_uri())
    expect(page.locator("#report-person")).to_contain_text(f"{person} — {name}")
    expect(page.locator("#report-generated")).to_contain_text("(the command line)")
    expect(page.locator("tr.hit .captured .site")).to_contain_text(ZONE)
    # Its images and style are inside it (the file's policy allows those and nothing else).
    wait_for(lambda: page.evaluate("[...document.images].every(i => i.naturalWidth > 0)"), what="images drawn")
    assert page.locator("img").count() >= 2
    assert page.evaluate("getComputedStyle(document.querySelector('#report h2')).borderBottomStyle") == "solid"
    assert page.locator("script").count() == 0
    assert "Content-Security-Policy" in out.read_text()

    # The console's page holds the same sections.
    login(page, site.url, "ana")
    page.goto(f"{site.url}/sighting/report?id={sid}")
    sections = "[...document.querySelectorAll('#report section')].map(s => s.id)"
    console_sections = page.evaluate(sections)
    page.goto(out.as_uri())
    assert page.evaluate(sections) == console_sections

    missing = CliRunner().invoke(cli, ["report", "--db", str(site.tmp / "hits.sqlite"), "nobody", "--out", str(out)])
    assert missing.exit_code == 1 and "no sighting with id 'nobody'" in missing.output
    assert CliRunner().invoke(cli, ["report", "--db", str(site.tmp / "hits.sqlite"), sid]).exit_code == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_report_reads_the_same_from_either_store(backend, request, tmp_path):
    from central import accounts, case_report
    from central.console_text import environment

    url = f"sqlite:///{tmp_path}/hits.sqlite" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = HitStore(url)
    try:
        store.add_user("ana", "operator", accounts.hash_password("ana-password-1"), actor="test")
        t0 = time.time() - 600
        ids = []
        for k, person in enumerate(("case-1", "case-1", "case-2")):
            hit = make_hit(crop=face_jpeg(), person_id=person, captured_at=t0 + 30 * k)
            store.add_hit(
                *records.decode_hit(records.hit_payload(records.hit_record(hit, "site-a"), hit.crop_jpeg, None))
            )
            ids.append(hit.id)
        store.decide(ids[2], "ana", "reject", "another person")  # the other sighting: not in this report
        store.decide(ids[1], "ana", "reject", "a poster of her, not her")
        report = case_report.build(store, RegisterView(None), ids[1], actor="cli:test", via="cli")
        assert report.sighting["id"] == ids[0] and [h["id"] for h in report.hits] == ids[:2]
        assert [(e["action"], e["subject"]) for e in report.audit] == [("decision", ids[1]), ("view_report", ids[0])]
        assert report.state.startswith("Rejected by ana") and report.closed is None and report.person is None
        assert all(h["crop"].src.startswith("data:image/jpeg;base64,") for h in report.hits)
        html = case_report.render_file(environment(), report)
        assert "a poster of her, not her" in html and "another person" not in html
        with pytest.raises(case_report.NoSuchSighting, match="no sighting with id 'nothing'"):
            case_report.build(store, RegisterView(None), "nothing", actor="cli:test", via="cli")
    finally:
        store.close()
