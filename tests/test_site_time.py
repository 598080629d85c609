"""The site's time zone: the unit knows it (``[unit] timezone``, else the system's), states it in its
heartbeat, and the centre keeps it only when it is an IANA zone (a hostile string is dropped, counted,
never shown) and writes the site's local time beside UTC; against a real Mosquitto and receiver, on
SQLite and PostgreSQL stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from central.console_text import when
from central.store import HitStore
from edge.config import load_config
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from edge.unit_status import site_zone, system_zone
from testing.broker import FAST, wait_for
from tests.console_support import start_receiver
from tests.test_config import GOOD, error_of, write
from wire.timezones import is_zone, zone_problem

HOSTILE = [
    "<script>alert(1)</script>",
    "../../../etc/passwd",
    "/usr/share/zoneinfo/Europe/Vienna",
    "Europe/Vienna\n2025 HIT",
    "Europe/Vienna\u202e",
    "Europe/" + "A" * 100,
    "Mars/Olympus_Mons",
    "localtime",
    "",
    42,
    None,
    ["Europe/Vienna"],
]


def test_only_iana_zones_are_zones():
    for name in ("Europe/Vienna", "UTC", "America/Argentina/ComodRivadavia", "Etc/GMT+5", "Asia/Tokyo"):
        assert is_zone(name), name
    for name in HOSTILE:
        assert zone_problem(name), repr(name)


def test_the_unit_config_names_its_zone_or_takes_the_systems(tmp_path: Path):
    with_zone = GOOD.replace('site = "station-12"', 'site = "station-12"\ntimezone = "Europe/Vienna"')
    assert load_config(write(tmp_path, with_zone)).unit.timezone == "Europe/Vienna"
    assert load_config(write(tmp_path, GOOD)).unit.timezone is None
    msg = error_of(tmp_path, GOOD.replace('site = "station-12"', 'site = "station-12"\ntimezone = "Europe/Wien"'))
    assert "unit.toml: unit.timezone:" in msg and "time zone database" in msg
    msg = error_of(tmp_path, GOOD.replace('site = "station-12"', 'site = "station-12"\ntimezone = "<b>x</b>"'))
    assert "unit.timezone" in msg and "IANA" in msg
    assert site_zone("Asia/Tokyo") == "Asia/Tokyo"


def test_the_systems_zone_from_tz_localtime_or_etc_timezone(tmp_path: Path):
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/Europe/Vienna")
    etc_tz = tmp_path / "timezone"
    etc_tz.write_text("Asia/Tokyo\n")
    missing = tmp_path / "none"
    assert system_zone({"TZ": ":America/New_York"}, link, etc_tz) == "America/New_York"
    # A POSIX rule in TZ rules the clock but names no zone: none is claimed.
    assert system_zone({"TZ": "CET-1CEST,M3.5.0,M10.5.0/3"}, link, etc_tz) is None
    assert system_zone({}, link, etc_tz) == "Europe/Vienna"
    assert system_zone({}, missing, etc_tz) == "Asia/Tokyo"
    copied = tmp_path / "copied"
    copied.write_bytes(b"TZif")  # a copy of a zone file says no name
    assert system_zone({}, copied, missing) is None
    etc_tz.write_text("<script>\n")
    assert system_zone({}, missing, etc_tz) is None
    assert system_zone() is None or is_zone(system_zone())


def test_the_site_time_is_written_beside_utc():
    at = 1_735_725_600.0  # 2025-01-01 10:00:00 UTC
    html = str(when(at, "Europe/Vienna"))
    assert "2025-01-01 10:00:00 UTC" in html and "2025-01-01 11:00:00 CET at the site" in html
    assert '<span class="zone-name"> (Europe/Vienna)</span>' in html
    assert 'class="site"' in html
    # Anything else is no zone: UTC alone, and the page adds the browser's time, labelled as such.
    for bad in ("<b>x</b>", "Europe/Wien", "../x"):
        assert (
            str(when(at, bad))
            == '<time class="when" datetime="2025-01-01T10:00:00+00:00">2025-01-01 10:00:00 UTC</time>'
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = str(tmp_path / "hits.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = HitStore(url)
    yield s
    s.close()


def test_the_centre_keeps_a_units_zone_and_drops_a_hostile_one_counted(mosquitto, store, tmp_path):
    rx = start_receiver(mosquitto, store, "rx-zones")
    reporters = []
    try:
        for unit, zone in (
            ("unit-tokyo", "Asia/Tokyo"),
            ("unit-bad", "<img src=x onerror=alert(1)>"),
            ("unit-none", None),
        ):
            figures = {"cameras_up": 1, "cameras_total": 1, **({"timezone": zone} if zone else {})}
            reporters.append(
                MqttReporter(
                    MqttConfig(host=mosquitto.host, port=mosquitto.port, site="site-a", **FAST),
                    OutboxConfig(path=tmp_path / f"{unit}.sqlite"),
                    unit,
                    lambda figures=figures: figures,
                )
            )
        wait_for(
            lambda: len(store.units()) == 3 and all(u["last_heartbeat_at"] for u in store.units()), what="3 heartbeats"
        )
        assert store.unit_zones() == {("site-a", "unit-tokyo"): "Asia/Tokyo"}
        assert rx.stats()["timezones_ignored"] >= 1
        # The hostile string is not even kept in the stored heartbeat; the rest of it is.
        bad = next(u for u in store._read("SELECT unit_id, heartbeat FROM units") if u["unit_id"] == "unit-bad")
        assert "timezone" not in json.loads(bad["heartbeat"])["unit"] and "onerror" not in bad["heartbeat"]
    finally:
        for r in reporters:
            r.close()
        rx.close()


def test_a_stored_heartbeat_with_a_bad_zone_shows_no_zone(store):
    # A heartbeat stored before receivers checked zones: the store's reader checks it again.
    store.set_heartbeat("site-a", "unit-old", {"unit": {"timezone": "</time><script>x</script>"}}, 1.0)
    store.set_heartbeat("site-a", "unit-ok", {"unit": {"timezone": "Europe/Vienna"}}, 1.0)
    assert store.unit_zones() == {("site-a", "unit-ok"): "Europe/Vienna"}
