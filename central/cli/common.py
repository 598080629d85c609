"""What every command shares: the --db option, how stored values are printed, who runs a command."""

from __future__ import annotations

import datetime as dt
import getpass
import os
from typing import Any

import click

from central.config import DEFAULT_DB

DB_OPTION = click.option(
    "--db",
    "db_url",
    default=DEFAULT_DB,
    show_default=True,
    envvar="CHECKPOINT_RECEIVER_DB",
    help="Store: a SQLite file path, sqlite:///path, or postgresql://user@host:port/db (env CHECKPOINT_RECEIVER_DB).",
)
TIME = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


def utc_text(ts: Any) -> str:
    """A stored time as UTC text; a value no calendar holds (1e300, a string) is shown, not fatal."""
    if not ts:
        return "-"
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return f"<bad time {safe(ts, 24)}>"


def _num(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return safe(value, 24)


def safe(value: Any, limit: int = 200) -> str:
    """Unit-supplied text for a terminal: control and direction characters shown as escapes, not
    obeyed (a newline in a camera id must not start a line of its own)."""
    from wire.records import safe_text

    if value is None:
        return "-"
    return safe_text(value, limit)


def format_hit(row: dict[str, Any]) -> str:
    """The one line printed for a new hit; `sig=` is the signature verdict (valid, unsigned, unknown_unit)."""
    dropped = row.get("crop_dropped")
    crop = "yes" if row.get("has_crop") else f"no ({safe(dropped, 32)})" if dropped else "no"
    return (
        f"{utc_text(row.get('captured_at'))}  HIT  {safe(row.get('site'))}/{safe(row.get('unit_id'))}  "
        f"camera={safe(row.get('camera_id'))}  person={safe(row.get('person_id'))}  score={_num(row.get('score'))} "
        f"thr={_num(row.get('threshold'))} margin={_num(row.get('margin'))}  crop={crop}  "
        f"sig={safe(row.get('signature'), 32)}  id={safe(row.get('id'))}"
    )


def cli_actor() -> str:
    """Who runs an administrative command, for the audit chain."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


def open_store(db_url: str, must_exist: bool = True) -> Any:
    """The store at `db_url`; a SQLite file that is not there is refused (exit 1) unless the command
    makes one (`run`, `serve`, `user add`), so a mistyped --db does not read an empty new store."""
    from central.store import open_store as open_url
    from central.store_sqlite import sqlite_path

    path = None if db_url.startswith(("postgresql://", "postgres://")) else sqlite_path(db_url)
    if must_exist and path is not None and not path.exists():
        raise click.ClickException(f"no hit store at {path} (give --db, or run `checkpoint-receiver run` first)")
    return open_url(db_url)
