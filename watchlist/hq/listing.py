"""Who is on a list, in one shape whatever holds it: HQ's register, a bundle's header, a unit's
store; and a bundle described for people (`watchlist inspect`, `watchlist list`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable


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
) -> dict:
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


def rows_from_header(header: dict) -> list[dict]:
    """The persons a bundle's header carries."""
    return [
        person_row(
            p["id"],
            name=p.get("name"),
            priority=p.get("priority", 0),
            threshold=p.get("threshold"),
            templates=[(t.get("photo_date"), t.get("age")) for t in p.get("templates", [])],
        )
        for p in header.get("persons", [])
    ]


def rows_from_register(persons: list[dict]) -> list[dict]:
    """The persons of HQ's register (Register.persons())."""
    return [
        person_row(
            p["person_id"],
            name=p["name"],
            priority=p["priority"],
            threshold=p["threshold"],
            templates=[(t["photo_date"], t["age"]) for t in p["templates"]],
        )
        | {"updated_at": iso_utc(p["updated_at"])}
        for p in persons
    ]


def describe_bundle(header: dict) -> dict:
    """A bundle's header for people and scripts: dates in ISO 8601 UTC, persons as rows (no
    embedding offset: 128 floats tell a reader nothing)."""
    return {
        "kind": header.get("kind"),
        "version": header.get("version"),
        "base_version": header.get("base_version"),
        "created_at": iso_utc(header.get("created_at")),
        "expires_at": iso_utc(header.get("expires_at")),
        "model_id": header.get("model_id"),
        "embedding_dim": header.get("embedding_dim"),
        "default_threshold": header.get("default_threshold"),
        "templates": header.get("templates"),
        "persons": rows_from_header(header),
        "removed": list(header.get("removed", [])),
    }


def format_rows(rows: list[dict]) -> list[str]:
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
