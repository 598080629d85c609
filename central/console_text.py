"""How the console writes values for people: times (UTC, with the site's or the browser's local time beside),
spans, stranger rates in words, text with its invisible characters shown; the Jinja2 environment
that gives them to the templates as filters.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from central.fleet import duration
from wire.timezones import is_zone

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Control characters, DEL and C1, and the bidirectional overrides that can make text read backwards.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(value: Any) -> str:
    """Text with control and direction-override characters shown as escapes (\\x1b, \\u202e)."""
    text = "" if value is None else str(value)
    return _INVISIBLE.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text
    )


def utc(ts: float | None) -> str:
    if not ts:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError, TypeError):
        # A stored time no calendar holds (1e300) is shown as such, not a failed page.
        return f"(bad time {visible(ts)[:24]})"


def ago(ts: float | None, now: float | None = None) -> str:
    """How long ago `ts` was, in words ("never" without one)."""
    if not ts:
        return "never"
    return f"{duration((time.time() if now is None else now) - ts)} ago"


def until(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    s = ts - (time.time() if now is None else now)
    if s <= 0:
        return f"expired {ago(ts, now)}"
    return f"in {s / 3600:.1f} h" if s < 2 * 86400 else f"in {s / 86400:.1f} days"


def stranger_words(rate: float) -> str:
    """A hit's calibrated stranger rate (docs/protocol.md) in words, N to 2 significant figures:
    "About 1 in 12,000 faces of people not on the list score this high against someone on it"."""
    tail = "of people not on the list score this high against someone on it"
    if rate * 1.5 >= 1:
        return f"Nearly all faces {tail}"
    # Below this the figure is the calibration's extrapolation far past any measured stranger.
    if rate < 1e-12:
        return f"Fewer than 1 in {10**12:,} faces {tail}"
    return f"About 1 in {float(f'{1 / rate:.2g}'):,.0f} faces {tail}"


def waited(ts: float | None) -> str:
    """How long since `ts`, as a duration."""
    return duration(time.time() - ts) if ts else "-"


def when(ts: float | None, zone: str | None = None) -> Markup:
    """A time as UTC text in a <time> element, with the site's local time beside it when `zone` (the
    unit's IANA zone from its heartbeat, `HitStore.unit_zones`) is one; without it console.js adds
    the browser's local time, labelled as the browser's."""
    text = utc(ts)
    if ts is None or text.startswith("(") or text == "-":
        return Markup.escape(text)
    at = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    iso = at.isoformat(timespec="seconds")
    if zone is None or not is_zone(zone):  # checked again: a zone stored before the receiver checked it
        return Markup('<time class="when" datetime="{}">{} UTC</time>').format(iso, text)
    from zoneinfo import ZoneInfo

    local = at.astimezone(ZoneInfo(zone))
    return Markup(
        '<time class="when" datetime="{}">{} UTC<span class="site" data-zone="{}"> · {} {} at the site'
        '<span class="zone-name"> ({})</span></span></time>'
    ).format(iso, text, zone, local.strftime("%Y-%m-%d %H:%M:%S"), local.tzname() or "", zone)


def qs(value: Any) -> str:
    return quote("" if value is None else str(value), safe="")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        visible=visible,
        utc=utc,
        ago=ago,
        until=until,
        q=qs,
        duration=duration,
        waited=waited,
        when=when,
        stranger_words=stranger_words,
    )
    return env
