"""`build`: the next signed release from the register, with the list's threshold and the canary."""

from __future__ import annotations

from pathlib import Path

import click

from watchlist.cli.common import KeyDir, duration, fail, passphrase, selftest
from watchlist.format.errors import BundleRejected, WatchlistError


@click.command()
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, exists=True), required=True, help="key folder")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="bundle file to write")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--dry-run", is_flag=True, help="print what the bundle would change; sign, write and record nothing")
@click.option("--delta", is_flag=True, help="only the changes since --base (default: the latest published release)")
@click.option("--base", type=int, help="released version the delta applies to")
@click.option("--valid-for", default="7d", show_default=True, help="time until units treat the list as expired")
@click.option(
    "--fpir",
    type=float,
    help="false alerts per face of someone not on the list, at the list's size [default: 0.01]; "
    "the threshold follows from the model's calibration",
)
@click.option(
    "--threshold",
    type=float,
    help="explicit cosine threshold instead of --fpir (refused below the strangers' median score)",
)
@click.option(
    "--calibration",
    "calibration_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="the model's calibration file (`engines calibrate`; default: the packaged one for the model)",
)
@click.option("--model-id", help="embedding model (default: the only one in the register)")
@click.option("--with-names", is_flag=True, help="ship display names to units (default: case numbers only)")
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
@click.option(
    "--no-canary",
    is_flag=True,
    help="do not enrol the canary person when the register lacks it: only for lists that never reach a unit "
    "with its canary on (which refuses them)",
)
def build(
    register_path: Path,
    keys_dir: Path,
    out: Path,
    force: bool,
    dry_run: bool,
    delta: bool,
    base: int | None,
    valid_for: str,
    fpir: float | None,
    threshold: float | None,
    calibration_path: Path | None,
    model_id: str | None,
    with_names: bool,
    passphrase_env: str | None,
    no_canary: bool,
) -> None:
    """Build and sign the next bundle (full, or --delta) from the register, and record it as a release.

    The list's threshold follows from --fpir (default 1% of the faces of people not on the list
    raise a false alert) and the list's size, by the model's calibration; it is printed with the
    rates it gives. A delta applies to the latest *published* release unless --base says otherwise.
    --out is never overwritten without --force; --dry-run prints what would change on the units.
    Every list holds the canary person (docs/edge.md, The canary): a register without it for the
    model gets it first, enrolled with this machine's engine as `enrol-canary` does; where that
    engine is missing or of another model the build refuses, unless --no-canary.

    Example: watchlist build --register hq.db --keys /secure/hq-keys --out v12.cpwl --delta --fpir 0.01
    """
    from watchlist.hq.build import (
        canary_problem,
        choose_threshold,
        describe_changes,
        ensure_canary,
        plan_bundle,
        release,
    )
    from watchlist.hq.register import Register

    selftest()
    try:
        if out.exists() and not force and not dry_run:
            raise WatchlistError(f"{out} exists: give another --out, or --force to overwrite it")
        reg = Register(register_path)
        models = reg.model_ids()
        if model_id is None:
            if len(models) != 1:
                raise WatchlistError(
                    f"the register holds templates of {len(models)} models ({', '.join(models)}): give --model-id"
                )
            model_id = models[0]
        if not no_canary and not dry_run:
            # Before the threshold: the canary is one of the list's persons, as after enrol-canary.
            added = ensure_canary(reg, model_id, check=selftest)
            if added:
                click.echo(f"canary person enrolled for model {model_id}: {added} new templates")
        choice = choose_threshold(reg, model_id, fpir=fpir, threshold=threshold, calibration_path=calibration_path)
        if threshold is not None and choice.point is None and not dry_run:
            reg.set_meta(f"threshold:{model_id}", threshold)  # an uncalibrated model's number, kept for next builds
        kd = KeyDir(keys_dir, passphrase(passphrase_env))
        bundle, digests, skipped = plan_bundle(
            reg,
            model_id=model_id,
            default_threshold=choice.threshold,
            kind="delta" if delta else "full",
            base_version=base,
            valid_for_s=duration(valid_for),
            with_names=with_names,
        )
        _print_threshold(choice, model_id)
        missing = canary_problem(reg, model_id)
        if missing:
            then = "--no-canary" if no_canary else "the build without --dry-run enrols it first"
            click.echo(f"note: {missing} ({then})", err=True)
        if dry_run:
            _print_changes(bundle, describe_changes(reg, bundle, digests), out)
            return
        rel = release(reg, bundle, digests, kd.current_signing(), kd.keyset(), out, skipped, choice)
    except (WatchlistError, BundleRejected, ValueError) as exc:
        fail(exc)
    b = rel.bundle
    what = f"delta {b.base_version}->{b.version}" if b.kind == "delta" else f"full version {b.version}"
    click.echo(
        f"{what}: {len(b.persons)} persons ({b.n_templates} templates) in, {len(b.removed)} removed, "
        f"{len(rel.data)} bytes -> {out}"
    )
    if skipped:
        click.echo(f"warning: {len(skipped)} persons have no template of model {model_id} and are not in the list")


def _print_threshold(choice, model_id: str) -> None:
    if choice.fpir_target is not None:
        how = f"chosen for at most {choice.fpir_target:g} false alerts per face of someone not on the list"
    elif choice.point is not None:
        how = "given by --threshold"
    else:
        how = f"given by --threshold (model {model_id} has no calibration: no rates known)"
    click.echo(f"threshold {choice.threshold:.4f} ({how})")
    p = choice.point
    if p is not None:
        cohort = f", {choice.cohort} strangers" if choice.cohort else ""
        click.echo(f"  {choice.summary}")
        click.echo(
            f"  calibrated: FPIR per face {p.fpir:.3g} at {p.list_size} listed, FAR per pair {p.far_pair:.3g}{cohort}"
            + (" (extrapolated beyond the measured strangers: on the safe side)" if p.extrapolated else "")
        )
        click.echo(f"  {p.describe()}")
    if choice.warning:
        click.echo(f"WARNING: {choice.warning}", err=True)


def _print_changes(bundle, changes: dict, out: Path) -> None:
    what = (
        f"delta {bundle.base_version}->{bundle.version}" if bundle.kind == "delta" else f"full version {bundle.version}"
    )
    base = changes["base_version"]
    click.echo(f"dry run: would write {what} to {out} ({len(bundle.persons)} persons, {bundle.n_templates} templates)")
    click.echo(f"  against {'published version ' + str(base) if base else 'no published version'}:")
    for key in ("added", "changed", "removed"):
        ids = changes[key]
        click.echo(f"  {key} {len(ids)}" + (f": {', '.join(ids)}" if ids else ""))
    click.echo(f"  unchanged {changes['unchanged']}")
    click.echo("nothing signed, written or recorded")
