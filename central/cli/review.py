"""`review` and `crop`: an operator's decision on a hit, and a hit's face (or context frame), from the shell."""

from __future__ import annotations

import os
from pathlib import Path

import click

from central.cli.common import DB_OPTION, cli_actor, open_store, safe
from central.cli.receive import CONFIG_OPTION, REGISTER_OPTION, centre_config, register_view


def _operator_password(username: str, password_file: Path | None) -> str:
    if password_file is not None:
        return password_file.read_text().strip()
    env = os.environ.get("CHECKPOINT_OPERATOR_PASSWORD")
    if env:
        return env
    return click.prompt(f"password of {username}", hide_input=True)


@click.command()
@DB_OPTION
@CONFIG_OPTION
@click.argument("hit_id")
@click.argument("decision", type=click.Choice(["confirm", "reject"]))
@click.option("--user", "username", required=True, help="Your operator account (see `user add`).")
@click.option(
    "--password-file",
    "operator_password_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File with your password (else env CHECKPOINT_OPERATOR_PASSWORD, else a prompt).",
)
@click.option("--reason", default=None, help="Why (required to reject).")
@REGISTER_OPTION
@click.pass_context
def review(
    ctx: click.Context,
    config_file: Path | None,
    hit_id: str,
    decision: str,
    username: str,
    operator_password_file: Path | None,
    reason: str | None,
    **_given: object,
) -> None:
    """Confirm or reject a hit as a logged-in operator; the same rules as the console.

    A hit is confirmed only when two different operators have confirmed it; one rejection (with a
    reason) closes it; a case HQ closed (the person removed from the list) cannot be confirmed, which
    needs HQ's register (--register, or the config file's). The first characters of a hit id are
    enough when they name one hit.

    \b
    Example:
      checkpoint-receiver review --db hits.sqlite --register /srv/hq/register.sqlite 3f2a confirm --user alice
      checkpoint-receiver review --config /etc/checkpoint/centre.toml 3f2a reject --user bob --reason "different person: scar"
    """
    from central.accounts import check_login, username_problem
    from central.review import case_closed

    problem = username_problem(username)
    if problem:
        raise click.UsageError(f"--user: this cannot be a user name: {problem}")
    config = centre_config(ctx, config_file)
    register = register_view(config, photos=False)
    store = open_store(config.db)
    try:
        full_id = store.resolve_hit_id(hit_id)
        if not check_login(store.user(username), _operator_password(username, operator_password_file)):
            store.audit(username, "login", None, {"via": "cli review", "ok": False})
            raise click.ClickException(f"wrong password for {username}, or no such active user")
        closed = None
        if decision == "confirm":
            hit = store.hit(full_id)
            closed = case_closed(register, hit["person_id"], hit["site"], store.publications())
            if register.register is None:
                click.echo(
                    "note: no --register (nor [console] register in --config): whether HQ closed this case is "
                    "not checked; the console checks it",
                    err=True,
                )
        state = store.decide(full_id, username, decision, reason, closed=closed)
    finally:
        store.close()
    waiting = " (a second operator must confirm it)" if decision == "confirm" and state == "pending" else ""
    click.echo(f"hit {safe(full_id)}: {state}{waiting}")


@click.command()
@DB_OPTION
@click.argument("hit_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JPEG file to write.")
@click.option(
    "--context", is_flag=True, help="The hit's context frame (the whole scene, bystanders too) instead of the face."
)
def crop(db_url: str, hit_id: str, out: Path, context: bool) -> None:
    """Write a hit's face crop, or its context frame, to a JPEG file (entered in the audit chain as a
    view of the crop, `view_crop`, or of the frame, `view_context`).

    \b
    Example:
      checkpoint-receiver crop --db hits.sqlite 3f2a --out face.jpg
      checkpoint-receiver crop --db hits.sqlite 3f2a --context --out scene.jpg
    """
    what = "context frame" if context else "crop"
    store = open_store(db_url)
    try:
        full_id = store.resolve_hit_id(hit_id)
        jpeg = store.context_frame(full_id) if context else store.crop(full_id)
        if jpeg is not None:
            store.audit(cli_actor(), "view_context" if context else "view_crop", full_id, {"out": str(out)})
    finally:
        store.close()
    if jpeg is None:
        raise click.ClickException(f"hit {safe(full_id)} came without a {what}")
    out.write_bytes(jpeg)
    click.echo(f"wrote {len(jpeg)} bytes to {out}")
