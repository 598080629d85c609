"""`user`: the console's accounts."""

from __future__ import annotations

from pathlib import Path

import click

from central.cli.common import DB_OPTION, cli_actor, open_store, safe


def _new_password(password_file: Path | None) -> str:
    if password_file is not None:
        return password_file.read_text().strip()
    return click.prompt("new password", hide_input=True, confirmation_prompt=True)


@click.group()
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
def user_add(db_url: str, username: str, role: str, password_file: Path | None) -> None:
    """Add an account (asks for the password twice unless --password-file).

    Operators review hits and see the fleet; supervisors also see and export the audit chain.

    \b
    Example:
      checkpoint-receiver user add --db hits.sqlite --role operator alice
    """
    from central.accounts import hash_password

    password_hash = hash_password(_new_password(password_file))
    store = open_store(db_url, must_exist=False)
    try:
        store.add_user(username, role, password_hash, actor=cli_actor())
    finally:
        store.close()
    click.echo(f"added {role} {username}")


@user.command("passwd")
@DB_OPTION
@click.argument("username")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
def user_passwd(db_url: str, username: str, password_file: Path | None) -> None:
    """Set a new password for an account and end its sessions.

    \b
    Example:
      checkpoint-receiver user passwd --db hits.sqlite alice
    """
    from central.accounts import hash_password

    password_hash = hash_password(_new_password(password_file))
    store = open_store(db_url)
    try:
        store.set_password(username, password_hash, actor=cli_actor())
    finally:
        store.close()
    click.echo(f"password of {username} changed; their sessions ended")


@user.command("disable")
@DB_OPTION
@click.argument("username")
def user_disable(db_url: str, username: str) -> None:
    """Disable an account: no more logins or decisions; its sessions end; its past decisions stay.

    \b
    Example:
      checkpoint-receiver user disable --db hits.sqlite alice
    """
    store = open_store(db_url)
    try:
        store.disable_user(username, actor=cli_actor())
    finally:
        store.close()
    click.echo(f"{username} disabled")


@user.command("unlock")
@DB_OPTION
@click.argument("username")
def user_unlock(db_url: str, username: str) -> None:
    """End an account's login lockouts: the consoles forget its failed logins, from every address.

    A lockout holds one name from one address (5 failures in 5 minutes) and lifts by itself after
    5 minutes; this lifts it now, for instance when the operator mistyped and cannot wait. Entered
    in the audit chain; the account's sessions stay.

    \b
    Example:
      checkpoint-receiver user unlock --db hits.sqlite alice
    """
    store = open_store(db_url)
    try:
        store.unlock_user(username, actor=cli_actor())
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
    store = open_store(db_url)
    try:
        rows = store.users()
    finally:
        store.close()
    for row in rows:
        click.echo(f"{safe(row['username']):<24} {row['role']:<11} {'active' if row['active'] else 'disabled'}")
