"""`report`: a sighting's printable case report as an HTML file, for an investigator without the console."""

from __future__ import annotations

from pathlib import Path

import click

from central.cli.common import DB_OPTION, cli_actor, open_store, safe
from central.cli.receive import CONFIG_OPTION, PHOTOS_OPTION, REGISTER_OPTION, centre_config, register_view


@click.command()
@DB_OPTION
@CONFIG_OPTION
@click.argument("sighting_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="HTML file to write.")
@REGISTER_OPTION
@PHOTOS_OPTION
@click.pass_context
def report(ctx: click.Context, config_file: Path | None, sighting_id: str, out: Path, **_given: object) -> None:
    """Write a sighting's case report: the person, the hits with their crops and scenes, HQ's
    enrolment photos, the decisions and the audit lines about it, as one HTML file that stands alone
    (images inside it, no script); open it in a browser and print it, or save it as a PDF. The same
    report as the console's "Case report (printable)". Entered in the audit chain as `view_report`.

    SIGHTING_ID is a sighting's id or one of its hits' (the first characters of a hit id are enough
    when they name one hit).

    \b
    Example:
      checkpoint-receiver report --config /etc/checkpoint/centre.toml 3f2a --out case-3f2a.html
    """
    from central import case_report
    from central.console_text import environment

    config = centre_config(ctx, config_file)
    register = register_view(config)
    store = open_store(config.db)
    try:
        found = case_report.build(store, register, sighting_id, actor=cli_actor(), via="cli", detail={"out": str(out)})
    finally:
        store.close()
    html = case_report.render_file(environment(), found)
    out.write_text(html, encoding="utf-8")
    click.echo(f"wrote the case report of sighting {safe(found.sighting['id'])} ({len(found.hits)} hits) to {out}")
