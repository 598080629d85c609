"""The unit's spellings from before `edge watchlist` (`apply`, `status`, `list --config`): each only
says where it went and stops with exit status 2."""

from __future__ import annotations

import sys
from typing import NoReturn

import click


def moved(command: str, example: str) -> NoReturn:
    """A unit's spelling from before `edge watchlist`: say where it went and stop (exit status 2)."""
    click.echo(
        f"moved: use `edge watchlist {command} {example}` (the unit's watchlist commands are under `edge`; "
        "`watchlist` keeps HQ's)",
        err=True,
    )
    sys.exit(2)


_ANY_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@click.command("apply", hidden=True, context_settings=_ANY_ARGS)
def apply_moved() -> None:
    """Moved: edge watchlist apply FILE --config /etc/checkpoint/unit.toml (exit status 2)."""
    moved("apply", "FILE --config /etc/checkpoint/unit.toml")


@click.command("status", hidden=True, context_settings=_ANY_ARGS)
def status_moved() -> None:
    """Moved: edge watchlist status --config /etc/checkpoint/unit.toml (exit status 2)."""
    moved("status", "--config /etc/checkpoint/unit.toml")
