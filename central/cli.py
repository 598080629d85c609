"""`checkpoint-receiver`: run the operators' receiver and console, and look into the store."""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from common.version import VERSION_MESSAGE, software_version

DB_OPTION = click.option(
    "--db",
    "db_url",
    default="checkpoint-hits.sqlite",
    show_default=True,
    envvar="CHECKPOINT_RECEIVER_DB",
    help="Store: a SQLite file path, sqlite:///path, or postgresql://user@host:port/db (env CHECKPOINT_RECEIVER_DB).",
)
TIME = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


def _utc(ts: Any) -> str:
    """A stored time as UTC text; a value no calendar holds (1e300, a string) is shown, not fatal."""
    if not ts:
        return "-"
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return f"<bad time {_text(ts, 24)}>"


def _num(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return _text(value, 24)


def _text(value: Any, limit: int = 200) -> str:
    """Unit-supplied text for a terminal: control and direction characters shown as escapes, not
    obeyed (a newline in a camera id must not start a line of its own)."""
    from wire.records import safe_text

    if value is None:
        return "-"
    return safe_text(value, limit)


def format_hit(row: dict[str, Any]) -> str:
    """The one line printed for a new hit; `sig=` is the signature verdict (valid, unsigned, unknown_unit)."""
    dropped = row.get("crop_dropped")
    crop = "yes" if row.get("has_crop") else f"no ({_text(dropped, 32)})" if dropped else "no"
    return (
        f"{_utc(row.get('captured_at'))}  HIT  {_text(row.get('site'))}/{_text(row.get('unit_id'))}  "
        f"camera={_text(row.get('camera_id'))}  person={_text(row.get('person_id'))}  score={_num(row.get('score'))} "
        f"thr={_num(row.get('threshold'))} margin={_num(row.get('margin'))}  crop={crop}  "
        f"sig={_text(row.get('signature'), 32)}  id={_text(row.get('id'))}"
    )


def _cli_actor() -> str:
    """Who runs an administrative command, for the audit chain."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


def _is_sqlite_path(db_url: str) -> Path | None:
    if db_url.startswith(("postgresql://", "postgres://")):
        return None
    from central.store_sqlite import sqlite_path

    return sqlite_path(db_url)


def _open_store(db_url: str, must_exist: bool = True) -> Any:
    from central.store import HitStore, StoreError

    try:
        path = _is_sqlite_path(db_url)
        if must_exist and path is not None and not path.exists():
            raise click.ClickException(f"no hit store at {path} (give --db, or run `checkpoint-receiver run` first)")
        return HitStore(db_url)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


def _store_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from central.accounts import AccountError
        from central.store import StoreError

        try:
            return fn(*args, **kwargs)
        except (StoreError, AccountError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group()
@click.version_option(software_version(), message=VERSION_MESSAGE)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Receive hits and unit status from checkpoint units over MQTT, review them in a web console,
    and look into the store.

    \b
    Example:
      checkpoint-receiver user add --db hits.sqlite --role operator alice
      checkpoint-receiver serve --db hits.sqlite --host broker.example.org --port 8883 --ca-file ca.pem \\
          --username ops --password-file ops.pw --register /srv/hq/register.sqlite
      checkpoint-receiver units --db hits.sqlite
      checkpoint-receiver audit verify --db hits.sqlite
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say how the receiver reaches the broker (shared by `run` and `serve`)."""
    options = [
        click.option("--host", default="localhost", show_default=True, help="Broker host."),
        click.option("--port", type=int, default=1883, show_default=True, help="Broker port (8883 usually for TLS)."),
        click.option(
            "--protocol",
            type=click.Choice(["5", "3.1.1"]),
            default="5",
            show_default=True,
            help="MQTT version; 3.1.1 has no shared subscriptions.",
        ),
        click.option(
            "--client-id", default=None, help="Stable id, different per receiver [checkpoint-receiver-<host>]."
        ),
        click.option("--group", default="checkpoint-receivers", show_default=True, help="Shared-subscription group."),
        click.option("--no-share", is_flag=True, help="Subscribe to all hits instead of sharing them with the group."),
        click.option("--username", default=None, help="Broker user name."),
        click.option(
            "--password",
            default=None,
            envvar="CHECKPOINT_MQTT_PASSWORD",
            help="Broker password (prefer --password-file or env CHECKPOINT_MQTT_PASSWORD).",
        ),
        click.option("--password-file", type=click.Path(path_type=Path), default=None, help="File with the password."),
        click.option("--ca-file", type=click.Path(path_type=Path), default=None, help="CA certificate (PEM): TLS on."),
        click.option("--cert-file", type=click.Path(path_type=Path), default=None, help="Client certificate (PEM)."),
        click.option("--key-file", type=click.Path(path_type=Path), default=None, help="Client key (PEM)."),
        click.option("--tls", "use_tls", is_flag=True, help="TLS with the system CA store (implied by --ca-file)."),
        click.option(
            "--reconnect-max-delay",
            type=float,
            default=60.0,
            show_default=True,
            help="Longest wait between reconnect attempts, seconds.",
        ),
        click.option(
            "--unit-keys",
            type=click.Path(path_type=Path, exists=True),
            default=None,
            help="Unit public keys: a file of key lines or a folder of *.pub (deploy/make-credentials unit).",
        ),
        click.option(
            "--unsigned",
            type=click.Choice(["accept", "reject"]),
            default="accept",
            show_default=True,
            help="Hits/status not signed by a registered key, from units with no registered key: store them "
            "with their verdict, or quarantine them. Units with a registered key must always sign.",
        ),
        click.option(
            "--retention-days",
            type=float,
            default=90.0,
            show_default=True,
            help="Hits older than this are deleted from the store.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _receiver_config(o: dict[str, Any]) -> Any:
    from central.receiver import ReceiverConfig

    values: dict[str, Any] = {
        "host": o["host"],
        "port": o["port"],
        "protocol": o["protocol"],
        "group": o["group"],
        "shared": not o["no_share"],
        "username": o["username"],
        "password": o["password"],
        "password_file": o["password_file"],
        "reconnect_max_delay_s": o["reconnect_max_delay"],
        "reconnect_min_delay_s": min(1.0, o["reconnect_max_delay"]),
        "retention_days": o["retention_days"],
        "unit_keys": o["unit_keys"],
        "unsigned": o["unsigned"],
    }
    if o["client_id"]:
        values["client_id"] = o["client_id"]
    if o["ca_file"] or o["cert_file"] or o["key_file"] or o["use_tls"]:
        values["tls"] = {"ca_file": o["ca_file"], "cert_file": o["cert_file"], "key_file": o["key_file"]}
    try:
        return ReceiverConfig(**values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in e.errors())
        raise click.UsageError(problems) from None


def _start_receiver(config: Any, store: Any, on_hit: Callable[[dict], None] | None) -> Any:
    from central.receiver import Receiver

    try:
        receiver = Receiver(config, store, on_hit=on_hit)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    receiver.start()
    return receiver


def _stop_receiver(receiver: Any) -> None:
    receiver.close()
    counts = receiver.stats()
    click.echo(
        f"receiver stopped: {counts['new']} new hits, {counts['duplicates']} duplicates dropped, "
        f"{counts['rejected']} rejected",
        err=True,
    )


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@main.command()
@DB_OPTION
@broker_options
@click.option("--quiet", is_flag=True, help="Do not print a line per hit.")
def run(db_url: str, quiet: bool, **broker: Any) -> None:
    """Subscribe to the hits, status and heartbeats of all units; store each hit once; print one line per new hit.

    Runs until SIGINT/SIGTERM. Unit status changes go to the log (stderr, shown with -v).

    \b
    Example:
      checkpoint-receiver -v run --host 127.0.0.1 --port 1883 --db hits.sqlite
      2025-01-01T10:00:00Z  HIT  station-1/unit-3  camera=gate  person=P42  score=0.712 ...
    """
    config = _receiver_config(broker)
    store = _open_store(db_url, must_exist=False)
    try:
        receiver = _start_receiver(config, store, None if quiet else lambda row: click.echo(format_hit(row)))
        try:
            _wait_for_signal()
        finally:
            _stop_receiver(receiver)
    finally:
        store.close()


@main.command()
@DB_OPTION
@broker_options
@click.option("--no-receiver", is_flag=True, help="Console only: receivers run elsewhere and write the same store.")
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address the console listens on.")
@click.option("--http-port", type=int, default=8080, show_default=True, help="Port the console listens on.")
@click.option("--tls-cert", type=click.Path(exists=True, path_type=Path), default=None, help="HTTPS certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, path_type=Path), default=None, help="HTTPS key (PEM).")
@click.option(
    "--register",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="HQ's register (SQLite, read-only) for names, priorities and enrolment dates.",
)
@click.option(
    "--photos",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="HQ's enrolment folder (<folder>/<person_id>/<photo>) to show beside the crop.",
)
@click.option(
    "--expiry-warning-days", type=float, default=3.0, show_default=True, help="Flag watchlists expiring sooner."
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="ADDRESS",
    help="A reverse proxy (address or network; repeat for several) whose X-Forwarded-For/-Proto are "
    "believed. Default: none, the client is the connection's peer.",
)
def serve(
    db_url: str,
    no_receiver: bool,
    listen: str,
    http_port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    register: Path | None,
    photos: Path | None,
    expiry_warning_days: float,
    trusted_proxies: tuple[str, ...],
    **broker: Any,
) -> None:
    """Serve the operators' web console, with the receiver in the same process (unless --no-receiver).

    Log in with an account made by `checkpoint-receiver user add`. Use --tls-cert/--tls-key (or a
    TLS proxy in front) for anything beyond localhost: session cookies are then marked Secure. Behind
    a proxy, name it with --trusted-proxy so that logins are limited by the real client's address.

    \b
    Example:
      checkpoint-receiver serve --db hits.sqlite --host broker.example.org --port 8883 --ca-file ca.pem \\
          --username ops --password-file ops.pw --register /srv/hq/register.sqlite --photos /srv/hq/photos
      checkpoint-receiver serve --no-receiver --db postgresql://console@db.example.org/checkpoint \\
          --trusted-proxy 127.0.0.1
    """
    from central.console import ConsoleSettings, create_app
    from central.register_view import RegisterView, RegisterViewError
    from central.webserver import ServerError, check_trusted_proxies, make_server

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("give both --tls-cert and --tls-key (or neither)")
    try:
        check_trusted_proxies(trusted_proxies)
    except ServerError as e:
        raise click.UsageError(str(e)) from None
    config = None if no_receiver else _receiver_config(broker)
    store = _open_store(db_url, must_exist=False)
    receiver = None
    try:
        try:
            view = RegisterView(register, photos)
        except RegisterViewError as e:
            raise click.UsageError(str(e)) from None
        settings = ConsoleSettings(expiry_warning_s=expiry_warning_days * 86400)
        app = create_app(store, register=view, settings=settings)
        try:
            server = make_server(
                app, listen, http_port, tls_cert=tls_cert, tls_key=tls_key, trusted_proxies=trusted_proxies
            )
        except ServerError as e:
            raise click.UsageError(str(e)) from None
        if config is not None:
            receiver = _start_receiver(config, store, None)
        scheme = "https" if tls_cert else "http"
        click.echo(f"console on {scheme}://{listen}:{http_port}  (store {store.location})", err=True)
        # uvicorn handles SIGINT/SIGTERM itself and raises the signal again once it has stopped, to
        # the handler that was in place before: this one, so the receiver and store close cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run()
    finally:
        if receiver is not None:
            _stop_receiver(receiver)
        store.close()


@main.command()
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
@click.option("--with-crops", is_flag=True, help="Include face crops as base64 JPEG (crop_jpeg_b64; JSON lines only).")
def export(db_url: str, jsonl: Path | None, csv_out: Path | None, since: dt.datetime | None, with_crops: bool) -> None:
    """Write the stored hits with their sighting's decisions, oldest first, as JSON lines or CSV, times in
    ISO 8601 UTC (entered in the audit chain).

    \b
    Example:
      checkpoint-receiver export --db hits.sqlite --jsonl hits.jsonl --since 2025-01-01
      checkpoint-receiver export --db hits.sqlite --csv hits.csv
      checkpoint-receiver export --db hits.sqlite --jsonl - | head -1
    """
    if (jsonl is None) == (csv_out is None):
        raise click.UsageError("give one of --jsonl FILE or --csv FILE")
    if csv_out is not None and with_crops:
        raise click.UsageError("--with-crops goes with --jsonl (a CSV cell is no place for a JPEG)")
    store = _open_store(db_url)
    since_ts = since.replace(tzinfo=dt.timezone.utc).timestamp() if since else None
    out = jsonl if jsonl is not None else csv_out

    def write(fh: Any) -> int:
        if jsonl is not None:
            return store.export_jsonl(fh, since=since_ts, with_crops=with_crops, actor=_cli_actor())
        return store.export_csv(fh, since=since_ts, actor=_cli_actor())

    try:
        if str(out) == "-":
            n = write(sys.stdout)
        else:
            with open(out, "w", encoding="utf-8", newline="") as fh:
                n = write(fh)
    finally:
        store.close()
    click.echo(f"exported {n} hits to {out}", err=True)


@main.command()
@DB_OPTION
def units(db_url: str) -> None:
    """List the units heard from: health (online/offline/stale/unknown), level (ok/amber/red) and why,
    last seen, cameras, watchlist, software, outbox.

    What the centre cannot judge (no watchlist publication seen for a site whose units run a list:
    the receiver's account may not read HQ's manifests) is said first. The reasons are the fleet
    page's (central/health.py).

    \b
    Example:
      checkpoint-receiver units --db hits.sqlite
    """
    from central.health import centre_problems

    store = _open_store(db_url)
    try:
        rows = store.units()
        published = store.publications()
    finally:
        store.close()
    for problem in centre_problems(rows, published):
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
        expires = _utc(row["watchlist_expires_at"])
        if row["watchlist_state"] in ("expiring", "expired"):
            expires += "!"
        why = "; ".join(r.text for r in row["reasons"]) or "-"
        click.echo(
            f"{_text(row['site'] + '/' + row['unit_id']):<32} {row['health']:<8} {row['level']:<6} "
            f"{_utc(row['last_seen']):<21} "
            f"{cams:>5} {row['watchlist_version'] if row['watchlist_version'] is not None else '-':>5} "
            f"{expires:<21} {_text(row['software_version'] or '-'):<12} "
            f"{row['hits'] or 0:>6} {outbox.get('pending', '-'):>8} {dropped if outbox else '-':>8}  "
            # Escaped already: central/health.py makes every piece of unit text in a reason safe.
            f"{why}"
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
    store = _open_store(db_url)
    try:
        rows = store.hits(limit=limit, where=flt)
    finally:
        store.close()
    for row in rows:
        click.echo(f"{format_hit(row)}  review={row['review_state']}")


def _operator_password(username: str, password_file: Path | None) -> str:
    if password_file is not None:
        return password_file.read_text().strip()
    env = os.environ.get("CHECKPOINT_OPERATOR_PASSWORD")
    if env:
        return env
    return click.prompt(f"password of {username}", hide_input=True)


@main.command()
@DB_OPTION
@click.argument("hit_id")
@click.argument("decision", type=click.Choice(["confirm", "reject"]))
@click.option("--user", "username", required=True, help="Your operator account (see `user add`).")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File with your password (else env CHECKPOINT_OPERATOR_PASSWORD, else a prompt).",
)
@click.option("--reason", default=None, help="Why (required to reject).")
@_store_errors
def review(
    db_url: str, hit_id: str, decision: str, username: str, password_file: Path | None, reason: str | None
) -> None:
    """Confirm or reject a hit as a logged-in operator; the same rules as the console.

    A hit is confirmed only when two different operators have confirmed it; one rejection (with a
    reason) closes it. The first characters of a hit id are enough when they name one hit.

    \b
    Example:
      checkpoint-receiver review --db hits.sqlite 3f2a confirm --user alice
      checkpoint-receiver review --db hits.sqlite 3f2a reject --user bob --reason "different person: scar"
    """
    from central.accounts import check_login, username_problem

    problem = username_problem(username)
    if problem:
        raise click.UsageError(f"--user: this cannot be a user name: {problem}")
    store = _open_store(db_url)
    try:
        full_id = store.resolve_hit_id(hit_id)
        if not check_login(store.user(username), _operator_password(username, password_file)):
            store.audit(username, "login", None, {"via": "cli review", "ok": False})
            raise click.ClickException(f"wrong password for {username}, or no such active user")
        state = store.decide(full_id, username, decision, reason)
    finally:
        store.close()
    waiting = " (a second operator must confirm it)" if decision == "confirm" and state == "pending" else ""
    click.echo(f"hit {_text(full_id)}: {state}{waiting}")


@main.command()
@DB_OPTION
@click.argument("hit_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JPEG file to write.")
@_store_errors
def crop(db_url: str, hit_id: str, out: Path) -> None:
    """Write a hit's face crop to a JPEG file (entered in the audit chain as a view of the crop).

    \b
    Example:
      checkpoint-receiver crop --db hits.sqlite 3f2a --out face.jpg
    """
    store = _open_store(db_url)
    try:
        full_id = store.resolve_hit_id(hit_id)
        jpeg = store.crop(full_id)
        if jpeg is not None:
            store.audit(_cli_actor(), "view_crop", full_id, {"out": str(out)})
    finally:
        store.close()
    if jpeg is None:
        raise click.ClickException(f"hit {_text(full_id)} came without a crop")
    out.write_bytes(jpeg)
    click.echo(f"wrote {len(jpeg)} bytes to {out}")


@main.command()
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
    store = _open_store(db_url)
    try:
        n = store.purge(older_than_days * 86400, actor=_cli_actor())
    finally:
        store.close()
    click.echo(f"deleted {n} hits")


# --- accounts -------------------------------------------------------------------------------------


def _new_password(password_file: Path | None) -> str:
    if password_file is not None:
        return password_file.read_text().strip()
    return click.prompt("new password", hide_input=True, confirmation_prompt=True)


@main.group()
def user() -> None:
    """Operators' and supervisors' accounts for the console and `review`.

    \b
    Example:
      checkpoint-receiver user add --db hits.sqlite --role supervisor carol
      checkpoint-receiver user unlock --db hits.sqlite carol
      checkpoint-receiver user list --db hits.sqlite
    """


@user.command("add")
@DB_OPTION
@click.argument("username")
@click.option("--role", type=click.Choice(["operator", "supervisor"]), default="operator", show_default=True)
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@_store_errors
def user_add(db_url: str, username: str, role: str, password_file: Path | None) -> None:
    """Add an account (asks for the password twice unless --password-file).

    Operators review hits and see the fleet; supervisors also see and export the audit chain.

    \b
    Example:
      checkpoint-receiver user add --db hits.sqlite --role operator alice
    """
    from central.accounts import hash_password

    password_hash = hash_password(_new_password(password_file))
    store = _open_store(db_url, must_exist=False)
    try:
        store.add_user(username, role, password_hash, actor=_cli_actor())
    finally:
        store.close()
    click.echo(f"added {role} {username}")


@user.command("passwd")
@DB_OPTION
@click.argument("username")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@_store_errors
def user_passwd(db_url: str, username: str, password_file: Path | None) -> None:
    """Set a new password for an account and end its sessions.

    \b
    Example:
      checkpoint-receiver user passwd --db hits.sqlite alice
    """
    from central.accounts import hash_password

    password_hash = hash_password(_new_password(password_file))
    store = _open_store(db_url)
    try:
        store.set_password(username, password_hash, actor=_cli_actor())
    finally:
        store.close()
    click.echo(f"password of {username} changed; their sessions ended")


@user.command("disable")
@DB_OPTION
@click.argument("username")
@_store_errors
def user_disable(db_url: str, username: str) -> None:
    """Disable an account: no more logins or decisions; its sessions end; its past decisions stay.

    \b
    Example:
      checkpoint-receiver user disable --db hits.sqlite alice
    """
    store = _open_store(db_url)
    try:
        store.disable_user(username, actor=_cli_actor())
    finally:
        store.close()
    click.echo(f"{username} disabled")


@user.command("unlock")
@DB_OPTION
@click.argument("username")
@_store_errors
def user_unlock(db_url: str, username: str) -> None:
    """End an account's login lockouts: the consoles forget its failed logins, from every address.

    A lockout holds one name from one address (5 failures in 5 minutes) and lifts by itself after
    5 minutes; this lifts it now, for instance when the operator mistyped and cannot wait. Entered
    in the audit chain; the account's sessions stay.

    \b
    Example:
      checkpoint-receiver user unlock --db hits.sqlite alice
    """
    store = _open_store(db_url)
    try:
        store.unlock_user(username, actor=_cli_actor())
    finally:
        store.close()
    click.echo(f"{username}: login lockouts lifted")


@user.command("list")
@DB_OPTION
def user_list(db_url: str) -> None:
    """List the accounts.

    \b
    Example:
      checkpoint-receiver user list --db hits.sqlite
    """
    store = _open_store(db_url)
    try:
        rows = store.users()
    finally:
        store.close()
    for row in rows:
        click.echo(f"{_text(row['username']):<24} {row['role']:<11} {'active' if row['active'] else 'disabled'}")


# --- audit ----------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The audit chain: who logged in, viewed a crop, decided, exported; watchlist versions units ran.

    \b
    Example:
      checkpoint-receiver audit head --db hits.sqlite
      checkpoint-receiver audit verify --db hits.sqlite --expect-head 1234:5f0e...
      checkpoint-receiver audit export --db hits.sqlite --jsonl audit.jsonl
    """


def _head(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    from central.audit import AuditError, parse_head

    if value is None:
        return None
    try:
        return parse_head(value)
    except AuditError as e:
        raise click.BadParameter(str(e)) from None


@audit.command("verify")
@DB_OPTION
@click.option(
    "--expect-head",
    metavar="COUNT:HASH",
    callback=_head,
    default=None,
    help="A head noted earlier (`audit head`): the chain must still reach it, with that very entry.",
)
def audit_verify(db_url: str, expect_head: Any) -> None:
    """Check every entry's hash and link; exit 1 naming the first broken entry.

    Entries cut from the end leave a chain that checks out: give a head noted earlier with
    --expect-head and a chain shorter than it, or with another entry at its number, fails too.
    Prints the head now (COUNT:HASH).

    \b
    Example:
      checkpoint-receiver audit verify --db hits.sqlite --expect-head 1234:5f0e...
      audit chain intact: 1240 entries, head 1240:9c1d...
    """
    from central.audit import Head

    store = _open_store(db_url)
    try:
        verdict = store.verify_audit(expect_head)
    finally:
        store.close()
    if not verdict.ok:
        click.echo(f"audit chain BROKEN: {verdict.problem} ({verdict.entries} entries check out)", err=True)
        sys.exit(1)
    click.echo(f"audit chain intact: {verdict.entries} entries, head {Head(verdict.entries, verdict.head)}")


@audit.command("head")
@DB_OPTION
def audit_head(db_url: str) -> None:
    """Print the chain's head, COUNT:HASH (its newest entry's number and hash), to note elsewhere.

    Kept where the database's administrators cannot write (a ticket, a paper log) and given later
    to `audit verify --expect-head`, it shows entries cut from the end or a rewritten tail. It is
    read, not checked: `audit verify` checks.

    \b
    Example:
      checkpoint-receiver audit head --db hits.sqlite >> /mnt/worm/checkpoint-audit-heads.txt
      1234:5f0e...
    """
    store = _open_store(db_url)
    try:
        head = store.audit_head()
    finally:
        store.close()
    click.echo(str(head))


@audit.command("export")
@DB_OPTION
@click.option(
    "--jsonl",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    required=True,
    help="Output file, '-' for stdout.",
)
def audit_export(db_url: str, jsonl: Path) -> None:
    """Write the audit chain, oldest first, as JSON lines with the hashes (the export is itself entered).

    \b
    Example:
      checkpoint-receiver audit export --db hits.sqlite --jsonl audit.jsonl
    """
    store = _open_store(db_url)
    try:
        if str(jsonl) == "-":
            n = store.export_audit_jsonl(sys.stdout, actor=_cli_actor())
        else:
            with open(jsonl, "w", encoding="utf-8") as fh:
                n = store.export_audit_jsonl(fh, actor=_cli_actor())
    finally:
        store.close()
    click.echo(f"exported {n} audit entries to {jsonl}", err=True)


if __name__ == "__main__":
    main()
