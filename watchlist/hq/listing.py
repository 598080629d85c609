"""Who is on HQ's register or in a bundle, as watchlist.format.listing's rows; and a bundle described
for people (`watchlist inspect`, `watchlist list`)."""

from __future__ import annotations

from watchlist.format.listing import format_rows, iso_utc, person_row

# format_rows, iso_utc and person_row live below both roles (the unit lists its store with them);
# HQ's callers keep importing them from here.
__all__ = ["describe_bundle", "format_rows", "iso_utc", "person_row", "rows_from_header", "rows_from_register"]


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
