"""`hits`, `units`, `export` and `purge`: what the store holds, read out or cut back."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import click

from central.cli.common import DB_OPTION, TIME, cli_actor, format_hit, open_store, safe, utc_text


@click.command()
@DB_OPTION
@click.option(
    "--jsonl",
    "jsonl",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=None,
    help="JSON lines output file, '-' for stdout.",
)
@click.option(
    "--csv",
    "csv_out",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=None,
    help="CSV output file (one row per hit, decisions in one cell), '-' for stdout.",
)
@click.option("--since", type=TIME, default=None, help="Only hits received at or after this UTC time.")
@click.option(
    "--with-crops",
    is_flag=True,
    help="Include face crops and context frames as base64 JPEG (crop_jpeg_b64, context_jpeg_b64; JSON lines only).",
)
def export(db_url: str, jsonl: Path | None, csv_out: Path | None, since: dt.datetime | None, with_crops: bool) -> None:
    """Write the stored hits with their sighting's decisions, oldest first, as JSON lines or CSV, times in
    ISO 8601 UTC (entered in the audit chain).

    \b
    Example:
      checkpoint-receiver export --db hits.sqlite --jsonl hits.jsonl --since 2025-01-01
      checkpoint-receiver export --db hits.sqlite --csv hits.csv
      checkpoint-receiver export --db hits.sqlite --jsonl - | head -1
    """
    out = jsonl if jsonl is not None else csv_out
    if out is None or (jsonl is not None and csv_out is not None):
        raise click.UsageError("give one of --jsonl FILE or --csv FILE")
    if csv_out is not None and with_crops:
        raise click.UsageError("--with-crops goes with --jsonl (a CSV cell is no place for a JPEG)")
    store = open_store(db_url)
    since_ts = since.replace(tzinfo=dt.timezone.utc).timestamp() if since else None

    def write(fh: Any) -> int:
        if jsonl is not None:
            return store.export_jsonl(fh, since=since_ts, with_crops=with_crops, actor=cli_actor())
        return store.export_csv(fh, since=since_ts, actor=cli_actor())

    try:
        if str(out) == "-":
            n = write(sys.stdout)
        else:
            with open(out, "w", encoding="utf-8", newline="") as fh:
                n = write(fh)
    finally:
        store.close()
    click.echo(f"exported {n} hits to {out}", err=True)


@click.command()
@DB_OPTION
def units(db_url: str) -> None:
    """List the units heard from: health (online/offline/stale/unknown), level (ok/amber/red) and why,
    last seen, cameras, watchlist, software, outbox.

    What the centre cannot judge (no watchlist publication seen for a site whose units run a list:
    the receiver's account may not read HQ's manifests) is said first. The reasons are the fleet
    page's (central/fleet.py).

    \b
    Example:
      checkpoint-receiver units --db hits.sqlite
    """
    from central.fleet import read_fleet

    store = open_store(db_url)
    try:
        fleet = read_fleet(store)
    finally:
        store.close()
    rows = fleet.units
    for problem in fleet.problems:
        # Escaped already, as the reasons below.
        click.echo(f"centre: {problem}")
    click.echo(
        f"{'UNIT':<32} {'HEALTH':<8} {'LEVEL':<6} {'LAST SEEN':<21} {'CAMS':>5} {'LIST':>5} {'EXPIRES':<21} "
        f"{'SOFTWARE':<12} {'HITS':>6} {'PENDING':>8} {'DROPPED':>8}  WHY"
    )
    for row in rows:
        outbox = (row["heartbeat"] or {}).get("outbox", {})
        dropped = sum(
            int(outbox.get(k, 0)) for k in ("crops_dropped_oversized", "crops_dropped_full", "hits_dropped_full")
        )
        cams = f"{row['cameras_up']}/{row['cameras_total']}" if row["cameras_total"] is not None else "-"
        expires = utc_text(row["watchlist_expires_at"])
        if row["watchlist_state"] in ("expiring", "expired"):
            expires += "!"
        why = "; ".join(r.text for r in row["reasons"]) or "-"
        click.echo(
            f"{safe(row['site'] + '/' + row['unit_id']):<32} {row['health']:<8} {row['level']:<6} "
            f"{utc_text(row['last_seen']):<21} "
            f"{cams:>5} {row['watchlist_version'] if row['watchlist_version'] is not None else '-':>5} "
            f"{expires:<21} {safe(row['software_version'] or '-'):<12} "
            f"{row['hits'] or 0:>6} {outbox.get('pending', '-'):>8} {dropped if outbox else '-':>8}  "
            # Escaped already: central/fleet.py makes every piece of unit text in a reason safe.
            f"{why}"
        )


@click.command()
@DB_OPTION
@click.option("--limit", type=int, default=20, show_default=True, help="How many, newest first.")
@click.option(
    "--state",
    type=click.Choice(["pending", "confirmed", "rejected"]),
    default=None,
    help="Only hits in this review state.",
)
@click.option("--person", default=None, help="Only hits of this person id.")
@click.option("--unit", default=None, help="Only hits of this unit (unit id or site/unit).")
@click.option("--camera", default=None, help="Only hits of this camera id.")
@click.option("--since", type=TIME, default=None, help="Only hits received at or after this UTC time.")
def hits(
    db_url: str,
    limit: int,
    state: str | None,
    person: str | None,
    unit: str | None,
    camera: str | None,
    since: dt.datetime | None,
) -> None:
    """List stored hits, newest first; sig= is each hit's signature verdict (valid, unsigned, unknown_unit).

    \b
    Example:
      checkpoint-receiver hits --db hits.sqlite --limit 5 --state pending --unit station-north/gate-2
    """
    from central.store import HitFilter

    site = None
    if unit and "/" in unit:
        site, unit = unit.split("/", 1)
    flt = HitFilter(
        review_state=state,
        person_id=person,
        site=site,
        unit_id=unit,
        camera_id=camera,
        since=since.replace(tzinfo=dt.timezone.utc).timestamp() if since else None,
    )
    store = open_store(db_url)
    try:
        rows = store.hits(limit=limit, where=flt)
    finally:
        store.close()
    for row in rows:
        click.echo(f"{format_hit(row)}  review={row['review_state']}")


@click.command()
@DB_OPTION
@click.option("--older-than-days", type=float, required=True, help="Delete hits received longer ago than this.")
def purge(db_url: str, older_than_days: float) -> None:
    """Delete old hits, their crops and decisions, and old rejected messages (`run` does this hourly).

    The audit chain is kept, and a purge that deleted anything is entered in it (who, the cut-off,
    how many hits and rejected messages).

    \b
    Example:
      checkpoint-receiver purge --db hits.sqlite --older-than-days 30
    """
    if older_than_days <= 0:
        raise click.UsageError("--older-than-days must be > 0")
    store = open_store(db_url)
    try:
        n = store.purge(older_than_days * 86400, actor=cli_actor())
    finally:
        store.close()
    click.echo(f"deleted {n} hits")
