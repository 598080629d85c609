"""`audit`: check, note and export the audit chain."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from central.cli.common import DB_OPTION, cli_actor, open_store


@click.group()
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

    store = open_store(db_url)
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
    store = open_store(db_url)
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
    store = open_store(db_url)
    try:
        if str(jsonl) == "-":
            n = store.export_audit_jsonl(sys.stdout, actor=cli_actor())
        else:
            with open(jsonl, "w", encoding="utf-8") as fh:
                n = store.export_audit_jsonl(fh, actor=cli_actor())
    finally:
        store.close()
    click.echo(f"exported {n} audit entries to {jsonl}", err=True)
