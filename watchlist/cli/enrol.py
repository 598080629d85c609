"""`enrol`, `enrol-canary`, `remove`: who is in HQ's register."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from common.files import atomic_write
from watchlist.cli.common import fail, selftest
from watchlist.format.errors import WatchlistError


@click.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--register", "register_path", type=click.Path(path_type=Path), required=True, help="HQ register (SQLite)"
)
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="write the full report as JSON here")
@click.option("--dry-run", is_flag=True, help="check the photos and say what would be enrolled; write nothing")
def enrol(source: Path, register_path: Path, report_path: Path | None, dry_run: bool) -> None:
    """Enrol photos from a CSV manifest or a folder (<folder>/<person_id>/<photo>) into the register.

    Prints one line per photo: its face height, quality score and, for a refused photo, why (the
    measured value and the limit). Exit status: 0 all enrolled, 1 some refused, 2 none enrolled or
    bad input.

    Example: watchlist enrol cases.csv --register hq.db --report enrol-report.json
    """
    from watchlist.hq.enrol import EnrolmentReport, entries_from
    from watchlist.hq.enrol import enrol as run_enrol
    from watchlist.hq.register import Register

    try:
        entries, refused = entries_from(source)
        from engines.face_engine import FaceEngine

        engine = FaceEngine.load()
        selftest(engine)
        report = EnrolmentReport(model_id=engine.model_id, rejected=list(refused), dry_run=dry_run)
        register = None if dry_run else Register(register_path)
        run_enrol(register, engine, entries, report=report)
    except WatchlistError as exc:
        fail(exc)
    for status, rows in (("enrolled", report.enrolled), ("already", report.duplicates), ("REFUSED", report.rejected)):
        for r in rows:
            measured = ""
            if r.get("face_px") is not None:
                measured = f" face {r['face_px']:.0f} px, quality {r['quality']:.2f}"
            why = f": {r['reason']}" if status == "REFUSED" else ""
            click.echo(f"{status:8} {r.get('where')} {r.get('person_id') or ''}{measured}{why}")
    for w in report.warnings:
        click.echo(f"warning: {w}")
    click.echo(report.summary() + (" (dry run: the register is unchanged)" if dry_run else ""))
    if report_path:
        atomic_write(report_path, json.dumps(report.to_json(), indent=2).encode())
    sys.exit(report.exit_status())


@click.command("enrol-canary")
@click.option(
    "--register", "register_path", type=click.Path(path_type=Path), required=True, help="HQ register (SQLite)"
)
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=None, help="model cache holding the canary picture"
)
def enrol_canary_command(register_path: Path, cache_dir: Path | None) -> None:
    """Enrol the canary person into the register with this machine's engine, so every list built
    from it holds the canary that units check themselves with (docs/edge.md, The canary). The
    picture is the pinned one `engines build` caches. Run it once per model; again is harmless.

    Example: watchlist enrol-canary --register hq.db
    """
    from engines.cache import default_cache_dir
    from engines.canary_media import ensure_canary_picture, load_canary_picture
    from engines.errors import EngineError
    from engines.face_engine import FaceEngine
    from watchlist.hq.enrol import enrol_canary
    from watchlist.hq.register import Register

    try:
        photo = load_canary_picture(ensure_canary_picture(cache_dir or default_cache_dir()))
        engine = FaceEngine.load()
        selftest(engine)
        new = enrol_canary(Register(register_path), engine, photo)
    except (WatchlistError, EngineError) as exc:
        fail(exc)
    click.echo(f"canary person enrolled for model {engine.model_id}: {new} new templates")


@click.command()
@click.argument("person_ids", nargs=-1, required=True)
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), required=True)
def remove(person_ids: tuple[str, ...], register_path: Path) -> None:
    """Take persons off the list (found, or case closed); the next bundle removes them from units.

    Every id the register does not hold is named and the exit status is 1 (a typo must not leave
    a found child on the list unnoticed); the known ids are removed all the same.

    Example: watchlist remove case-2024-0173 --register hq.db && watchlist build --delta ...
    """
    from watchlist.hq.register import Register

    try:
        reg = Register(register_path)
        unknown = reg.unknown_persons(person_ids)
        n = reg.remove_persons(person_ids)
    except WatchlistError as exc:
        fail(exc)
    click.echo(f"{n} of {len(set(person_ids))} persons removed from the register")
    if unknown:
        click.echo(f"error: not in the register (check the ids): {', '.join(unknown)}", err=True)
        sys.exit(1)
