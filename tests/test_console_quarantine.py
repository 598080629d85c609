"""The console shows what the receivers quarantined (issue 19, item 2), in Debian's Chromium via
Playwright: a real unit whose key the centre holds reports without signing (the measured case), the
receiver quarantines its hit and answers the unit; the fleet page counts the quarantined messages and
the supervisors' quarantine page lists them with their reasons, as text; operators get neither."""

from __future__ import annotations

import pytest

from central.console import ConsoleSettings, create_app
from central.store import HitStore
from central.webserver import BackgroundServer
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, MosquittoBroker, find_mosquitto, wait_for
from testing.hits import make_hit
from tests.console_support import add_users, login, start_receiver
from tests.services import missing_service
from wire.signing import generate_unit_key, public_key_line


@pytest.fixture
def centre(tmp_path):
    if find_mosquitto() is None:
        missing_service("needs the mosquitto broker binary (apt-get install -y mosquitto mosquitto-clients)")
    broker = MosquittoBroker(tmp_path / "broker").start()
    store = HitStore(tmp_path / "hits.sqlite")
    add_users(store, "ana", "sam")
    # unit-1's key is registered at the centre; the unit runs without it.
    (tmp_path / "unit-keys").write_text(public_key_line("site-a", "unit-1", generate_unit_key().public_raw) + "\n")
    rx = start_receiver(broker, store, "rx-quarantine", unit_keys=tmp_path / "unit-keys")
    server = BackgroundServer(create_app(store, settings=ConsoleSettings(poll_s=0.25))).start()
    reporter = MqttReporter(
        MqttConfig(host=broker.host, port=broker.port, site="site-a", **FAST),
        OutboxConfig(path=tmp_path / "outbox.sqlite"),
        "unit-1",
    )
    try:
        yield store, reporter, server.url
    finally:
        reporter.close()
        server.stop()
        rx.close()
        store.close()
        broker.kill()


def test_quarantined_messages_are_counted_on_the_fleet_page_and_listed_for_supervisors(centre, new_page):
    from playwright.sync_api import expect

    store, reporter, url = centre
    hit = make_hit()
    reporter.submit(hit)
    wait_for(lambda: reporter.outbox.quarantined == 1, what="the unit holding its refused hit")
    hostile = '<img src=x onerror="window.__xss=1">'
    store.add_reject("checkpoint/v1/site-a/unit-1/hits", b"{}", f"a sentence with {hostile}", reason="protocol")
    total = store.count_rejects()  # the hit, the unit's unsigned status messages and the hostile one
    assert total >= 3

    sam = new_page()
    login(sam, url, "sam")
    sam.goto(url + "/fleet")
    expect(sam.locator("#quarantine-count")).to_contain_text(f"{total} quarantined messages")
    sam.click("#quarantine-count a")
    sam.wait_for_url("**/quarantine")
    expect(sam.locator("#quarantine-total")).to_contain_text(f"{total} messages quarantined")
    rows = sam.locator("tr.reject")
    expect(rows).to_have_count(total)
    expect(rows.first).to_contain_text(hostile)  # newest first, and markup shown as text
    refused = sam.locator("tr.reject", has_text="checkpoint/v1/site-a/unit-1/hits").filter(has_text="unsigned")
    expect(refused).to_have_count(1)
    expect(refused.locator(".badge")).to_have_text("unsigned")
    expect(refused).to_contain_text("a unit with a registered key must sign with it")
    assert sam.evaluate("window.__xss") is None and sam.locator("main img").count() == 0

    ana = new_page()
    login(ana, url, "ana")
    ana.goto(url + "/fleet")
    expect(ana.locator("#quarantine-count")).to_contain_text(f"{total} quarantined messages")
    expect(ana.locator("#quarantine-count a")).to_have_count(0)
    expect(ana.locator("nav a[href='/quarantine']")).to_have_count(0)
    assert ana.goto(url + "/quarantine").status == 403
