"""``watchlist``: HQ's tools (keys, enrolment, bundles, publishing). The unit's are `edge watchlist`
(edge/watchlist_cli.py); their old spellings here say so.

One module per job: keys.py (`keygen`, `rotate`, `revoke`), enrol.py (`enrol`, `enrol-canary`,
`remove`), build.py (`build`), publish.py (`publish`), show.py (`releases`, `inspect`, `list`),
moved.py (the unit's old spellings); common.py holds what they share.
"""

from __future__ import annotations

import logging

import click

from common.version import VERSION_MESSAGE, software_version
from watchlist.cli.build import build
from watchlist.cli.enrol import enrol, enrol_canary_command, remove
from watchlist.cli.keys import keygen, revoke, rotate
from watchlist.cli.moved import apply_moved, status_moved
from watchlist.cli.publish import publish
from watchlist.cli.show import inspect_cmd, list_cmd, releases


@click.group()
@click.version_option(software_version(), message=VERSION_MESSAGE)
@click.option("-v", "--verbose", is_flag=True, help="log progress")
def main(verbose: bool) -> None:
    """Signed watchlist tools at HQ: keys, enrolment, bundles and publishing. On a unit: `edge watchlist`
    (apply, status, list).

    \b
    Example:
      watchlist build --register hq.db --keys /secure/hq-keys --out v12.cpwl --delta
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


for _command in (
    keygen,
    rotate,
    revoke,
    enrol,
    enrol_canary_command,
    remove,
    build,
    releases,
    publish,
    inspect_cmd,
    list_cmd,
    apply_moved,
    status_moved,
):
    main.add_command(_command)
