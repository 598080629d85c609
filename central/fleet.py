"""The fleet: each unit's row as the fleet page and `checkpoint-receiver units` show it, and its
health, one level (ok, amber, red) with the reasons for it.

`evaluate` is one function over what the store holds about a unit (its status, its latest
heartbeat, the outbox backlog's history, its watchlist) and what the centre knows beside it (the
latest watchlist HQ published for the unit's site): every fact that can make a row amber or red is
judged here, so the fleet page, `checkpoint-receiver units` and anything else show the same
reasons, and a new fact (refused hits, a canary) is one more check in this function. `unit_row`
turns a stored unit into the row they show (its state in a word, its cameras, its list, its
health); `read_fleet` reads every unit and what the centre cannot judge, with HQ's publications read
once for both.

Everything in a heartbeat came from the unit and is hostile until checked: values of the wrong type
are ignored, and text is cut and its control and direction characters escaped (`safe_text`) before it
becomes a reason; pages escape it again as HTML.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from central.publications import MANIFEST_SUBSCRIPTION
from wire.records import safe_text

if TYPE_CHECKING:
    from central.store import HitStore

LEVELS = ("ok", "amber", "red")
"""From good to bad; a unit's level is its worst reason's."""
REASON_CHARS = 300
"""A unit's text (a camera's error, a warning) is cut to this in a reason."""
STALE_AFTER_INTERVALS = 3.0
"""A unit that sent no heartbeat for this many of its intervals is `stale` (silent)."""
EXPIRY_WARNING_S = 3 * 86400.0
"""A unit's watchlist expiring sooner than this is flagged."""


@dataclass(frozen=True)
class Reason:
    """Why a unit is not fully well: `level` (amber or red) and a sentence for operators."""

    level: str
    text: str


@dataclass(frozen=True)
class Health:
    """A unit's level and the reasons for it, worst first (none when ok)."""

    level: str
    reasons: list[Reason] = field(default_factory=list)


@dataclass(frozen=True)
class HealthSettings:
    """Where amber and red begin.

    `behind_grace_s`: how long a unit may run an older list than HQ's latest publication for its
    site before it counts as behind (units fetch a list within a minute on a sound link).
    `backlog_grace_s`: how long hits may wait in a unit's outbox, growing, before it shows;
    `backlog_stuck_s`: how long they may wait at all. `skew_amber_s`/`skew_red_s`: how far a unit's
    clock may be from the centre's (hits' capture times and list expiry are judged by the unit's
    clock). `expiry_warning_s`: a list expiring sooner is amber."""

    expiry_warning_s: float = EXPIRY_WARNING_S
    behind_grace_s: float = 900.0
    backlog_grace_s: float = 120.0
    backlog_stuck_s: float = 600.0
    skew_amber_s: float = 30.0
    skew_red_s: float = 300.0


CANARY_WARNING = "canary failed: "
"""How a unit's warning about its failed canary begins (edge/canary.py Canary.warning): said in red by _canary."""
REFUSAL_WARNING = "the centre refused "
"""How a unit's warning about hits the centre refused begins (edge/outbox.py Outbox.refusal)."""


def evaluate(
    unit: dict[str, Any],
    now: float,
    published: dict[str, Any] | None = None,
    settings: HealthSettings | None = None,
) -> Health:
    """The health of one unit row of the store (`HitStore.units` gives `health`, `state_reason`,
    `heartbeat`, `last_heartbeat_at`, `heartbeat_interval_s`, `watchlist_version`,
    `watchlist_expires_at`, `backlog_since`, `backlog_from`), with `published` the latest list HQ
    published for its site (`version`, `seen_at`: when the centre first saw it), if known."""
    settings = settings or HealthSettings()
    reasons: list[Reason] = []
    state = unit.get("health")
    if state == "offline":
        reasons.append(Reason("red", f"offline: {_text(unit.get('state_reason') or 'no reason given')}"))
    elif state == "stale":
        interval = unit.get("heartbeat_interval_s") or 0
        reasons.append(
            Reason(
                "red",
                f"silent: no heartbeat for {duration(now - (unit.get('last_heartbeat_at') or now))} "
                f"(one expected every {interval:g} s)",
            )
        )
    elif state != "online":
        reasons.append(Reason("amber", "no status from the unit yet"))
    # An offline or silent unit's heartbeat tells how it was, not how it is: its state says enough.
    if state in ("online", "unknown"):
        beat = _dict(unit.get("heartbeat"))
        figures = _dict(beat.get("unit"))
        reasons += _cameras(figures)
        reasons += _pipeline_and_warnings(figures)
        reasons += _watchlist(unit, figures, now, published, settings)
        reasons += _outbox(unit, beat, now, settings)
        reasons += _clock(unit, beat, settings)
        reasons += _canary(unit, beat, figures, now)
    reasons.sort(key=lambda r: -LEVELS.index(r.level))
    level = reasons[0].level if reasons else "ok"
    return Health(level, reasons)


def centre_problems(units: list[dict[str, Any]], published: dict[str, dict[str, Any]]) -> list[str]:
    """What the centre cannot judge, in sentences for above the fleet: a site whose units run a newer
    list than any publication the centre saw for it. Then whether they are behind HQ is unknown, most
    likely because the receiver's broker account may not read HQ's manifests: Mosquitto grants such a
    subscription and silently delivers nothing, so this is the only sign of it."""
    running: dict[str, int] = {}
    for unit in units:
        version = _int(unit.get("watchlist_version"))
        if version:
            running[unit["site"]] = max(running.get(unit["site"], 0), version)
    out = []
    for site, version in sorted(running.items()):
        seen = _int((published.get(site) or {}).get("version")) or 0
        if version > seen:
            heard = f"the newest the centre saw is v{seen}" if seen else "the centre saw no publication for it"
            out.append(
                f"site {_text(site, 128)}: units run watchlist v{version} but {heard}, so no unit there can be "
                f"shown behind HQ's list (the receivers' broker account needs read on {MANIFEST_SUBSCRIPTION})"
            )
    return out


@dataclass(frozen=True)
class Fleet:
    """Every unit's row (`unit_row`), by site and unit, and what the centre cannot judge (`centre_problems`)."""

    units: list[dict[str, Any]]
    problems: list[str]


def read_fleet(store: HitStore, expiry_warning_s: float = EXPIRY_WARNING_S) -> Fleet:
    """The fleet as the store holds it now, with HQ's publications read once for both the units'
    health and the centre's problems."""
    published = store.publications()
    units = store.units(expiry_warning_s=expiry_warning_s, published=published)
    return Fleet(units, centre_problems(units, published))


def unit_row(
    row: dict[str, Any],
    now: float,
    published: dict[str, Any] | None,
    settings: HealthSettings,
    expiry_warning_s: float = EXPIRY_WARNING_S,
) -> dict[str, Any]:
    """A unit as the store keeps it (its `units` row, the heartbeat as JSON text) made the fleet's row,
    in place: the heartbeat decoded; `health`: 'offline' (said so, or its Last Will), 'stale' (no
    heartbeat for STALE_AFTER_INTERVALS intervals), 'online', or 'unknown'; cameras up and total and
    the outbox backlog (`heartbeat_facts`); `watchlist_state`: 'expired', 'expiring' (within
    `expiry_warning_s`), 'ok' or 'unknown'; and `level` with its `reasons` (`evaluate`, against
    `published`, HQ's latest list for the unit's site)."""
    row["heartbeat"] = json.loads(row["heartbeat"]) if row.get("heartbeat") else None
    interval = row.get("heartbeat_interval_s") or 0
    last_hb = row.get("last_heartbeat_at")
    if row.get("state") == "offline":
        health = "offline"
    elif last_hb and interval and now - last_hb > STALE_AFTER_INTERVALS * interval:
        health = "stale"
    elif row.get("state") == "online":
        health = "online"
    else:
        health = "unknown"
    row["health"] = health
    facts = heartbeat_facts(row["heartbeat"] or {})
    row["cameras_up"], row["cameras_total"] = facts["cameras_up"], facts["cameras_total"]
    row["outbox_pending"] = facts["outbox_pending"]
    expires = row.get("watchlist_expires_at")
    if not expires:
        row["watchlist_state"] = "unknown"
    elif expires <= now:
        row["watchlist_state"] = "expired"
    elif expires - now <= expiry_warning_s:
        row["watchlist_state"] = "expiring"
    else:
        row["watchlist_state"] = "ok"
    judged = evaluate(row, now, published, settings)
    row["level"], row["reasons"] = judged.level, judged.reasons
    return row


def heartbeat_facts(body: dict[str, Any]) -> dict[str, Any]:
    """What the fleet page needs from a heartbeat, wherever the unit put it: `software_version` at
    the top level (or in `unit`), cameras up/total, the watchlist version and expiry (in
    `unit.watchlist` as the daemon reports it, or flat in `unit`), the outbox backlog."""
    unit = _dict(body.get("unit"))
    watchlist = _dict(unit.get("watchlist"))

    def pick(*values: Any, kind: type | tuple[type, ...]) -> Any:
        for v in values:
            if isinstance(v, kind) and not isinstance(v, bool):
                return v
        return None

    software = pick(body.get("software_version"), unit.get("software_version"), kind=str)
    outbox = _dict(body.get("outbox"))
    return {
        "software_version": software[:64] if software else None,
        "watchlist_version": pick(watchlist.get("version"), unit.get("watchlist_version"), kind=int),
        "watchlist_expires_at": pick(watchlist.get("expires_at"), unit.get("watchlist_expires_at"), kind=(int, float)),
        "cameras_up": pick(unit.get("cameras_up"), kind=int),
        "cameras_total": pick(unit.get("cameras_total"), kind=int),
        "outbox_pending": pick(outbox.get("pending"), kind=int),
    }


def _cameras(figures: dict[str, Any]) -> list[Reason]:
    cameras = [c for c in _list(figures.get("cameras")) if isinstance(c, dict)]
    total, up = _int(figures.get("cameras_total")), _int(figures.get("cameras_up"))
    down = [c for c in cameras if c.get("up") is False]
    if cameras:
        total, up = len(cameras), len(cameras) - len(down)
    if total is None or up is None or up >= total:
        return []
    # Every camera down is a blind unit; some down, a unit that misses part of what it should see.
    level = "red" if up <= 0 else "amber"
    if not down:
        return [Reason(level, f"{total - up} of {total} cameras down")]
    out = []
    for c in down:
        error = c.get("last_error")
        why = f": {_text(error)}" if isinstance(error, str) and error else ""
        out.append(Reason(level, f"camera {_text(c.get('id', '?'), 64)} down{why}"))
    return out


def _pipeline_and_warnings(figures: dict[str, Any]) -> list[Reason]:
    out = []
    pipeline = _dict(figures.get("pipeline"))
    problems = [p for p in _list(pipeline.get("problems")) if isinstance(p, str)]
    for p in problems:
        out.append(Reason("red", f"pipeline: {_text(p)}"))
    if pipeline.get("healthy") is False and not problems:
        out.append(Reason("red", "pipeline: not healthy (the unit names no problem)"))
    watchlist = _dict(figures.get("watchlist"))
    halted = watchlist.get("halted") if isinstance(watchlist.get("halted"), str) else None
    # The unit repeats its pipeline problems and a halted list in its warnings: said once, above and
    # in _watchlist.
    said = set(problems) | {halted}
    for w in _list(figures.get("warnings")):
        # The unit's own sentence about refused hits: said in red from its outbox figures (_outbox).
        if (
            isinstance(w, str)
            and w
            and w not in said
            and not w.startswith(REFUSAL_WARNING)
            and not w.startswith(CANARY_WARNING)
        ):
            out.append(Reason("amber", f"unit warns: {_text(w)}"))
    return out


CANARY_LATE_INTERVALS = 2
"""A unit whose last canary reached the centre longer ago than this many of its canary intervals is red."""


def _canary(unit: dict[str, Any], beat: dict[str, Any], figures: dict[str, Any], now: float) -> list[Reason]:
    """Red when the unit says its canary failed (with the unit's reason), or when no canary reached the
    centre for `CANARY_LATE_INTERVALS` intervals (the interval comes in the heartbeat; a unit that sends
    no ``canary`` figures runs none and is not judged on it). The unit's own warning about the failure
    is not repeated in amber (_pipeline_and_warnings)."""
    canary = figures.get("canary")
    if not isinstance(canary, dict):
        return []
    interval = _number(canary.get("interval_s"))
    if interval is None or interval <= 0:
        return []
    out = []
    if canary.get("state") == "failed":
        reason = canary.get("reason") if isinstance(canary.get("reason"), str) else "the unit gives no reason"
        out.append(Reason("red", f"canary failed: {_text(reason)}"))
    last = _number(unit.get("last_canary_at"))
    late = CANARY_LATE_INTERVALS * interval
    if last is not None and now - last > late:
        out.append(
            Reason(
                "red",
                f"canary late: the last one passed {duration(now - last)} ago (one expected every {interval:g} s)",
            )
        )
    elif last is None and (_number(beat.get("uptime_s")) or 0) > late:
        out.append(Reason("red", f"canary late: none has reached the centre (one expected every {interval:g} s)"))
    return out


def _watchlist(
    unit: dict[str, Any],
    figures: dict[str, Any],
    now: float,
    published: dict[str, Any] | None,
    settings: HealthSettings,
) -> list[Reason]:
    out = []
    watchlist = _dict(figures.get("watchlist"))
    version = _int(unit.get("watchlist_version"))
    if watchlist.get("matching") is False:
        halted = watchlist.get("halted")
        why = f": {_text(halted)}" if isinstance(halted, str) and halted else ""
        out.append(Reason("red", f"watchlist: matching stopped{why}"))
    elif version == 0:
        out.append(Reason("red", "no watchlist: no face can match"))
    expires = _number(unit.get("watchlist_expires_at"))
    if version and expires is not None:
        if expires <= now:
            out.append(Reason("red", f"watchlist v{version} expired {duration(now - expires)} ago"))
        elif expires - now <= settings.expiry_warning_s:
            out.append(Reason("amber", f"watchlist v{version} expires in {duration(expires - now)}"))
    sync = _dict(watchlist.get("sync"))
    error = sync.get("last_error")
    if isinstance(error, str) and error:
        out.append(Reason("amber", f"watchlist updates fail: {_text(error)}"))
    refused = [t for t in _list(sync.get("refused")) if isinstance(t, str)]
    if refused:
        out.append(Reason("amber", f"watchlist updates: the broker refused {_text(', '.join(refused))} (its ACL)"))
    if published and version is not None:
        latest, seen = _int(published.get("version")), _number(published.get("seen_at"))
        if latest is not None and seen is not None and version < latest and now - seen > settings.behind_grace_s:
            out.append(
                Reason("amber", f"watchlist v{version} behind HQ's v{latest} (published {duration(now - seen)} ago)")
            )
    return out


def _outbox(unit: dict[str, Any], beat: dict[str, Any], now: float, settings: HealthSettings) -> list[Reason]:
    out = []
    outbox = _dict(beat.get("outbox"))
    pending = _int(outbox.get("pending"))
    since, start = _number(unit.get("backlog_since")), _int(unit.get("backlog_from"))
    if pending and since is not None and start is not None:
        waited = now - since
        if pending > start and waited > settings.backlog_grace_s:
            out.append(
                Reason(
                    "amber",
                    f"outbox backlog growing: {pending} hits waiting, {start} when it began {duration(waited)} ago",
                )
            )
        elif waited > settings.backlog_stuck_s:
            out.append(Reason("amber", f"outbox backlog not draining: {pending} hits waiting for {duration(waited)}"))
    kept = _int(outbox.get("quarantined_kept"))
    if kept:
        # Hits the centre refused (unsigned, a bad signature, ...): no operator saw them, so red.
        out.append(Reason("red", f"hits refused by the centre: {kept} kept at the unit (see Quarantine)"))
    link = _dict(beat.get("link"))
    error = link.get("last_error")
    if isinstance(error, str) and error:
        out.append(Reason("amber", f"reporting: {_text(error)}"))
    return out


def _clock(unit: dict[str, Any], beat: dict[str, Any], settings: HealthSettings) -> list[Reason]:
    # `last_heartbeat_at` is when the centre received the heartbeat (for a retained one replayed on
    # subscribing, at most that): the difference is how far the unit's clock is off, give or take the
    # network's delay.
    claimed, received = _number(beat.get("at")), _number(unit.get("last_heartbeat_at"))
    if claimed is None or received is None:
        return []
    skew = claimed - received
    if abs(skew) <= settings.skew_amber_s:
        return []
    level = "red" if abs(skew) > settings.skew_red_s else "amber"
    way = "ahead of" if skew > 0 else "behind"
    return [Reason(level, f"clock {duration(abs(skew))} {way} the centre's (hit times and list expiry are off)")]


def _text(value: Any, limit: int = REASON_CHARS) -> str:
    return safe_text(value, limit)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def duration(seconds: float | None) -> str:
    """A span in words: 45 s, 13 min, 2.5 h, 4 days (the fleet's reasons, and the console's pages)."""
    s = max(0.0, float(seconds or 0))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"
