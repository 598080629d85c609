"""A site's time zone as it travels: an IANA name (``Europe/Vienna``) the unit states in its
heartbeat (``unit.timezone``), so that operators see the site's local time beside UTC.

Both ends check a name the same way (`zone_problem`): the unit when its config names one, the
centre before it keeps or shows one. A zone name is short and plain, and must be one the system's
time zone database holds: a hostile string (markup, a path, a million characters) is never a zone.
"""

from __future__ import annotations

import functools
import re

MAX_ZONE_CHARS = 64
"""Longer than any IANA name (the longest, America/Argentina/ComodRivadavia, has 32)."""
_ZONE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+){0,3}")
# Files in the zone folder that are no zone of their own: this machine's zone and a placeholder.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


@functools.lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    import zoneinfo

    # Read once: available_timezones() walks the zone database's folders.
    return frozenset(zoneinfo.available_timezones()) - _NOT_ZONES


def zone_problem(name: object) -> str | None:
    """Why `name` cannot be a site's time zone, or None when it is an IANA name the time zone
    database holds (``Europe/Vienna``, ``UTC``)."""
    if not isinstance(name, str) or not name:
        return "must be an IANA time zone name such as Europe/Vienna"
    if len(name) > MAX_ZONE_CHARS or not _ZONE_RE.fullmatch(name):
        return "is not an IANA time zone name (letters, digits, _ + - and /, such as Europe/Vienna)"
    if name not in _known_zones():
        return "is not in the time zone database (an IANA name such as Europe/Vienna)"
    return None


def is_zone(name: object) -> bool:
    """Whether `name` is a usable IANA time zone name (`zone_problem` finds nothing)."""
    return zone_problem(name) is None
