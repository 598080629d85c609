"""`checkpoint-receiver`: run the operators' receiver and look into its hit store."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from common.version import VERSION_MESSAGE, software_version

DB_OPTION = click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="checkpoint-hits.sqlite",
    show_default=True,
    envvar="CHECKPOINT_RECEIVER_DB",
    help="SQLite hit store (env CHECKPOINT_RECEIVER_DB).",
)


def _utc(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_hit(row: dict[str, Any]) -> str:
    """The one line printed for a new hit."""
    crop = "yes" if row.get("has_crop") else f"no ({row['crop_dropped']})" if row.get("crop_dropped") else "no"
    return (
        f"{_utc(row['captured_at'])}  HIT  {row['site']}/{row['unit_id']}  camera={row['camera_id']}  "
        f"person={row['person_id']}  score={row['score']:.3f} thr={row['threshold']:.3f} "
        f"margin={row['margin']:.3f}  crop={crop}  id={row['id']}"
    )


def _open_store(db_path: Path, must_exist: bool = True) -> Any:
    from central.store import HitStore, StoreError

    if must_exist and not db_path.exists():
        raise click.ClickException(f"no hit store at {db_path} (give --db, or run `checkpoint-receiver run` first)")
    try:
        return HitStore(db_path)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(software_version(), message=VERSION_MESSAGE)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Receive hits and unit status from checkpoint units over MQTT, and look into the stored hits.

    \b
    Example:
      checkpoint-receiver run --host broker.example.org --port 8883 --ca-file ca.pem \\
          --username ops --password-file ops.pw --db hits.sqlite
      checkpoint-receiver units --db hits.sqlite
      checkpoint-receiver export --db hits.sqlite --jsonl hits.jsonl
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@DB_OPTION
@click.option("--host", default="localhost", show_default=True, help="Broker host.")
@click.option("--port", type=int, default=1883, show_default=True, help="Broker port (8883 usually for TLS).")
@click.option(
    "--protocol",
    type=click.Choice(["5", "3.1.1"]),
    default="5",
    show_default=True,
    help="MQTT version; 3.1.1 has no shared subscriptions.",
)
@click.option("--client-id", default=None, help="Stable id, different per receiver [checkpoint-receiver-<hostname>].")
@click.option("--group", default="checkpoint-receivers", show_default=True, help="Shared-subscription group.")
@click.option("--no-share", is_flag=True, help="Subscribe to all hits instead of sharing them with the group.")
@click.option("--username", default=None, help="Broker user name.")
@click.option(
    "--password",
    default=None,
    envvar="CHECKPOINT_MQTT_PASSWORD",
    help="Broker password (prefer --password-file or env CHECKPOINT_MQTT_PASSWORD).",
)
@click.option("--password-file", type=click.Path(path_type=Path), default=None, help="File holding the password.")
@click.option("--ca-file", type=click.Path(path_type=Path), default=None, help="CA certificate (PEM): turns TLS on.")
@click.option("--cert-file", type=click.Path(path_type=Path), default=None, help="Client certificate (PEM).")
@click.option("--key-file", type=click.Path(path_type=Path), default=None, help="Client key (PEM).")
@click.option("--tls", "use_tls", is_flag=True, help="TLS with the system CA store (implied by --ca-file).")
@click.option(
    "--reconnect-max-delay",
    type=float,
    default=60.0,
    show_default=True,
    help="Longest wait between reconnect attempts, seconds.",
)
@click.option(
    "--retention-days",
    type=float,
    default=90.0,
    show_default=True,
    help="Hits older than this are deleted from the store.",
)
@click.option("--quiet", is_flag=True, help="Do not print a line per hit.")
def run(
    db_path: Path,
    host: str,
    port: int,
    protocol: str,
    client_id: str | None,
    group: str,
    no_share: bool,
    username: str | None,
    password: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    use_tls: bool,
    reconnect_max_delay: float,
    retention_days: float,
    quiet: bool,
) -> None:
    """Subscribe to the hits, status and heartbeats of all units; store each hit once; print one line per new hit.

    Runs until SIGINT/SIGTERM. Unit status changes go to the log (stderr, shown with -v).

    \b
    Example:
      checkpoint-receiver -v run --host 127.0.0.1 --port 1883 --db hits.sqlite
      2025-01-01T10:00:00Z  HIT  station-1/unit-3  camera=gate  person=P42  score=0.712 ...
    """
    from central.receiver import Receiver, ReceiverConfig

    values: dict[str, Any] = {
        "host": host,
        "port": port,
        "protocol": protocol,
        "group": group,
        "shared": not no_share,
        "username": username,
        "password": password,
        "password_file": password_file,
        "reconnect_max_delay_s": reconnect_max_delay,
        "reconnect_min_delay_s": min(1.0, reconnect_max_delay),
        "retention_days": retention_days,
    }
    if client_id:
        values["client_id"] = client_id
    if ca_file or cert_file or key_file or use_tls:
        values["tls"] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    try:
        config = ReceiverConfig(**values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in e.errors())
        raise click.UsageError(problems) from None

    store = _open_store(db_path, must_exist=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        receiver = Receiver(config, store, on_hit=None if quiet else lambda row: click.echo(format_hit(row)))
    except ValueError as e:
        store.close()
        raise click.UsageError(str(e)) from None
    receiver.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        receiver.close()
        store.close()
        counts = receiver.stats()
        click.echo(
            f"receiver stopped: {counts['new']} new hits, {counts['duplicates']} duplicates dropped, "
            f"{counts['rejected']} rejected",
            err=True,
        )


@main.command()
@DB_OPTION
@click.option(
    "--jsonl",
    "jsonl",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    required=True,
    help="Output file, '-' for stdout.",
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    default=None,
    help="Only hits received at or after this UTC time.",
)
@click.option("--with-crops", is_flag=True, help="Include face crops as base64 JPEG (crop_jpeg_b64).")
def export(db_path: Path, jsonl: Path, since: dt.datetime | None, with_crops: bool) -> None:
    """Write the stored hits, oldest first, as JSON lines.

    \b
    Example:
      checkpoint-receiver export --db hits.sqlite --jsonl hits.jsonl --since 2025-01-01
      checkpoint-receiver export --db hits.sqlite --jsonl - | head -1
    """
    store = _open_store(db_path)
    since_ts = since.replace(tzinfo=dt.timezone.utc).timestamp() if since else None
    try:
        if str(jsonl) == "-":
            n = store.export_jsonl(sys.stdout, since=since_ts, with_crops=with_crops)
        else:
            with open(jsonl, "w", encoding="utf-8") as fh:
                n = store.export_jsonl(fh, since=since_ts, with_crops=with_crops)
    finally:
        store.close()
    click.echo(f"exported {n} hits to {jsonl}", err=True)


@main.command()
@DB_OPTION
def units(db_path: Path) -> None:
    """List the units heard from: health (online/offline/stale/unknown), last seen, hits, outbox figures.

    \b
    Example:
      checkpoint-receiver units --db hits.sqlite
    """
    store = _open_store(db_path)
    try:
        rows = store.units()
    finally:
        store.close()
    click.echo(f"{'UNIT':<32} {'HEALTH':<8} {'LAST SEEN':<21} {'HITS':>6} {'PENDING':>8} {'DROPPED':>8}  ERROR")
    for row in rows:
        outbox = (row["heartbeat"] or {}).get("outbox", {})
        dropped = sum(
            int(outbox.get(k, 0)) for k in ("crops_dropped_oversized", "crops_dropped_full", "hits_dropped_full")
        )
        error = ((row["heartbeat"] or {}).get("link", {}) or {}).get("last_error") or ""
        click.echo(
            f"{row['site'] + '/' + row['unit_id']:<32} {row['health']:<8} {_utc(row['last_seen']):<21} "
            f"{row['hits'] or 0:>6} {outbox.get('pending', '-'):>8} {dropped if outbox else '-':>8}  {error}"
        )


@main.command()
@DB_OPTION
@click.option("--limit", type=int, default=20, show_default=True, help="How many, newest first.")
@click.option(
    "--state",
    type=click.Choice(["pending", "confirmed", "rejected"]),
    default=None,
    help="Only hits in this review state.",
)
def hits(db_path: Path, limit: int, state: str | None) -> None:
    """List stored hits, newest first.

    \b
    Example:
      checkpoint-receiver hits --db hits.sqlite --limit 5 --state pending
    """
    store = _open_store(db_path)
    try:
        rows = store.hits(limit=limit, review_state=state)
    finally:
        store.close()
    for row in rows:
        click.echo(f"{format_hit(row)}  review={row['review_state']}")


@main.command()
@DB_OPTION
@click.argument("hit_id")
@click.argument("state", type=click.Choice(["pending", "confirmed", "rejected"]))
@click.option("--by", "reviewer", required=True, help="Who reviewed it.")
@click.option("--note", default=None, help="Why.")
def review(db_path: Path, hit_id: str, state: str, reviewer: str, note: str | None) -> None:
    """Set a hit's review state.

    \b
    Example:
      checkpoint-receiver review --db hits.sqlite 3f2a...c9 confirmed --by "duty officer 2"
    """
    from central.store import StoreError

    store = _open_store(db_path)
    try:
        store.set_review(hit_id, state, reviewer, note)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    finally:
        store.close()
    click.echo(f"hit {hit_id}: {state}")


@main.command()
@DB_OPTION
@click.argument("hit_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JPEG file to write.")
def crop(db_path: Path, hit_id: str, out: Path) -> None:
    """Write a hit's face crop to a JPEG file.

    \b
    Example:
      checkpoint-receiver crop --db hits.sqlite 3f2a...c9 --out face.jpg
    """
    store = _open_store(db_path)
    try:
        jpeg = store.crop(hit_id)
        known = jpeg is not None or store.hit(hit_id) is not None
    finally:
        store.close()
    if jpeg is None:
        raise click.ClickException(f"hit {hit_id} {'came without a crop' if known else 'is not in the store'}")
    out.write_bytes(jpeg)
    click.echo(f"wrote {len(jpeg)} bytes to {out}")


@main.command()
@DB_OPTION
@click.option("--older-than-days", type=float, required=True, help="Delete hits received longer ago than this.")
def purge(db_path: Path, older_than_days: float) -> None:
    """Delete old hits, their crops and old rejected messages (`run` does this hourly with --retention-days).

    \b
    Example:
      checkpoint-receiver purge --db hits.sqlite --older-than-days 30
    """
    if older_than_days <= 0:
        raise click.UsageError("--older-than-days must be > 0")
    store = _open_store(db_path)
    try:
        n = store.purge(older_than_days * 86400)
    finally:
        store.close()
    click.echo(f"deleted {n} hits")


if __name__ == "__main__":
    main()
