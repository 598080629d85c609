"""Who is on a list, in one shape whatever holds it (HQ's register, a bundle's header, a unit's
store), and that shape as a table for people. Here, below both roles, so that HQ's `watchlist list`
and the unit's `edge watchlist list` print the same columns."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any


def iso_utc(epoch: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC, e.g. 2026-11-30T03:41:49Z (None stays None)."""
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(float(epoch), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def person_row(
    person_id: str,
    *,
    name: str | None,
    priority: int,
    threshold: float | None,
    templates: Iterable[tuple[str | None, int | None]],
) -> dict[str, Any]:
    """One person: id, name (where the source holds one), priority, threshold override, and the
    photo date or age of each template."""
    tpl = list(templates)
    return {
        "person_id": person_id,
        "name": name,
        "priority": int(priority),
        "threshold": threshold,
        "templates": len(tpl),
        "photo_dates": [d for d, _ in tpl if d],
        "ages": [a for _, a in tpl if a is not None],
    }


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """A table of person rows, one line each."""
    if not rows:
        return ["(no persons)"]
    show_names = any(r.get("name") for r in rows)
    width = max(9, *(len(r["person_id"]) for r in rows))
    head = f"{'person_id':{width}}  prio  templates  ages/photo dates"
    lines = [head + ("  name" if show_names else "")]
    for r in rows:
        when = ", ".join([f"age {a}" for a in r["ages"]] + r["photo_dates"]) or "-"
        line = f"{r['person_id']:{width}}  {r['priority']:>4}  {r['templates']:>9}  {when}"
        if r.get("threshold") is not None:
            line += f" (threshold {r['threshold']:g})"
        lines.append(line + (f"  {r.get('name') or ''}" if show_names else ""))
    return lines
