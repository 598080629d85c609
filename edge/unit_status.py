"""The unit's figures as the heartbeat carries them (edge.daemon.Daemon.status), in pieces: one
camera's, the watchlist's, the warnings about the list, the site's time zone, and the one-line
summary for systemd's STATUS."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wire.timezones import is_zone

log = logging.getLogger(__name__)


def site_zone(configured: str | None) -> str | None:
    """The zone the unit states in its heartbeat (``unit.timezone``): `configured` (``[unit] timezone``,
    checked when the config was read), else the system's (`system_zone`); None when neither names one,
    and the centre then shows the operator's own local time beside UTC."""
    if configured is not None:
        return configured
    zone = system_zone()
    if zone is None:
        log.info(
            "the system names no IANA time zone (TZ, /etc/localtime, /etc/timezone): the centre shows this site's "
            "times in UTC and the operator's zone; set [unit] timezone to show the site's"
        )
    return zone


def system_zone(
    environ: Mapping[str, str] = os.environ,
    localtime: Path = Path("/etc/localtime"),
    timezone_file: Path = Path("/etc/timezone"),
) -> str | None:
    """The system's IANA time zone name: TZ (``Europe/Vienna`` or ``:Europe/Vienna``), else the zone
    /etc/localtime links to (``.../zoneinfo/Europe/Vienna``), else /etc/timezone (Debian's); None
    when none of them names one the time zone database holds (a POSIX rule in TZ, a copied file)."""
    tz = environ.get("TZ", "").strip().removeprefix(":")
    if tz:
        return tz if is_zone(tz) else None  # TZ rules the C library's time: no other source counts then
    try:
        target = str(localtime.readlink()) if localtime.is_symlink() else ""
    except OSError:
        target = ""
    if "zoneinfo/" in target:
        name = target.split("zoneinfo/", 1)[1]
        if is_zone(name):
            return name
    try:
        name = timezone_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if is_zone(name) else None


def camera_status(camera_id: str, name: str, location: str, state: Any, figures: dict[str, Any]) -> dict[str, Any]:
    """One camera: its reader's `state` (up or down since when, errors, reconnects, fps in) and the
    analysis `figures` of its pipeline (edge.stats.CameraStats.snapshot; empty before any)."""
    return {
        "id": camera_id,
        "name": name,
        "location": location,
        "up": state.up,
        "since": round(state.since, 3),
        "last_error": state.last_error,
        "previous_error": state.previous_error,
        "previous_error_at": None if state.previous_error_at is None else round(state.previous_error_at, 3),
        "reconnects": state.reconnects,
        "fps_in": state.fps,
        "fps_analysed": figures.get("analysed_fps", 0.0),
        "faces": figures.get("faces", 0),
        "hits": figures.get("hits", 0),
        "lag_s": figures.get("lag_s", 0.0),
        "frames_skipped": figures.get("frames_skipped", 0),
        "frames_full": figures.get("frames_full", 0),
        "frames_regions": figures.get("frames_regions", 0),
        "searched_share": figures.get("searched_share"),
        "faces_confirmed": figures.get("faces_confirmed", 0),
        "errors": figures.get("errors", 0),
    }


def watchlist_status(matcher: Any, watchlist: Any, subscriber: Any) -> dict[str, Any]:
    """The list matched against (version, model, persons), with the watchlist's own status and the
    subscriber's sync state where the unit has them (None where it has not)."""
    index = getattr(matcher, "index", None)
    out: dict[str, Any] = {
        "version": int(getattr(matcher, "version", 0)),
        "model_id": getattr(matcher, "model_id", None),
        "persons": int(getattr(index, "n_persons", 0)),
    }
    if watchlist is not None:
        out.update(watchlist.status())
    if subscriber is not None:
        out["sync"] = subscriber.status()
    return out


def watchlist_warnings(behind: dict[str, Any] | None, wl: dict[str, Any] | None) -> list[str]:
    """What is wrong with the list: an update it cannot take (`behind`, the subscriber's), none
    applied, one halted or expired (`wl`, the watchlist's status; None without a watchlist)."""
    found = []
    if behind and behind.get("stuck"):
        found.append(
            f"watchlist: holding version {behind['version']} while HQ announces version {behind['announced']}: "
            f"{behind['reason']}"
        )
    if wl is None:
        return found
    if wl["halted"]:
        found.append(wl["halted"])
    elif not wl["version"]:
        found.append(
            "running with no watchlist: no face can match until a list is applied "
            "(`edge watchlist apply FILE --config ...` or a publication on the unit's watchlist topic)"
        )
    elif wl["expired"]:
        expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wl["expires_at"] or 0))
        doing = "still matching it (on_expired = warn)" if wl["matching"] else "matching stopped (on_expired = stop)"
        found.append(f"watchlist version {wl['version']} expired at {expired}; {doing} until HQ sends a fresh one")
    return found


def status_line(status: dict[str, Any]) -> str:
    """One line for `systemctl status` from a unit's `status`: cameras up, analysed fps, hits, watchlist version."""
    fps = sum(c["fps_analysed"] for c in status["cameras"])
    down = [c["id"] for c in status["cameras"] if not c["up"]]
    parts = [
        f"{status['cameras_up']}/{status['cameras_total']} cameras up",
        f"{fps:.1f} fps analysed",
        f"{status['hits']} hits",
        f"watchlist v{status['watchlist']['version']}",
    ]
    if down:
        parts.append("down: " + ",".join(down))
    return "; ".join(parts)
