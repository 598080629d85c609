"""`checkpoint-receiver`: run the operators' receiver and console, and look into the store.

One module per job: receive.py (`run`, `serve`), review.py (`review`, `crop`), report.py (`report`), users.py (`user`),
audit.py (`audit`), data.py (`hits`, `units`, `export`, `purge`); common.py holds what they share.
The exit status is decided here, once for every command (docs/console.md, "Exit status").
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from central.cli.audit import audit
from central.cli.data import export, hits, purge, units
from central.cli.receive import run, serve
from central.cli.report import report
from central.cli.review import crop, review
from central.cli.users import user
from common.version import VERSION_MESSAGE, software_version


class _Centre(click.Group):
    """Exit 0 when done, 1 when refused or a check failed, 2 for a bad command line or config file.

    Click exits 2 for usage errors and 1 for a ClickException. A store that refuses (StoreError,
    AccountError: no such hit, a duplicate user) and a file that cannot be read or written (OSError)
    are refusals: they exit 1 with their message, not with a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from central.accounts import AccountError
        from central.store import StoreError

        try:
            return super().invoke(ctx)
        except (StoreError, AccountError, OSError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Centre)
@click.version_option(software_version(), message=VERSION_MESSAGE)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Receive hits and unit status from checkpoint units over MQTT, review them in a web console,
    and look into the store.

    Exit status, for every command: 0 done; 1 refused or a check failed (wrong password, broken
    audit chain, no such store or hit, a file that cannot be read or written); 2 a bad command line
    or config file.

    \b
    Example:
      checkpoint-receiver user add --db hits.sqlite --role operator alice
      checkpoint-receiver serve --config /etc/checkpoint/centre.toml
      checkpoint-receiver units --db hits.sqlite
      checkpoint-receiver audit verify --db hits.sqlite
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _command in (run, serve, review, crop, report, hits, units, export, purge, user, audit):
    main.add_command(_command)
