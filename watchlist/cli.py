"""``watchlist``: HQ's tools (keys, enrolment, bundles, publishing). The unit's are `edge watchlist`
(edge/watchlist_cli.py); their old spellings here say so."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import click

from common.files import atomic_write
from common.version import VERSION_MESSAGE, software_version
from watchlist.format.errors import BundleRejected, WatchlistError

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: give a duration such as 3600, 90m, 12h or 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _passphrase(env: str | None) -> bytes | None:
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise click.UsageError(f"environment variable {env} is empty or unset; it should hold the key passphrase")
    return value.encode()


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


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _selftest(engine=None) -> None:  # a FaceEngine, whose module stays a lazy import
    """The known-answer self-test a unit runs at start (docs/edge.md, "Self-test at start"): the
    engine's models when one is given, and the matcher. A wrong answer stops the command (exit
    status 2) with the check, the figures and the CPU features: HQ must not enrol or build on a
    machine that computes them wrongly."""
    from engines.cpu import cpu_features
    from engines.errors import EngineError
    from engines.known_answers import check_engine
    from matching.selftest import MatcherSelfTestError, check_matcher

    features = cpu_features()
    try:
        checks = list(check_engine(engine).checks) if engine is not None else []
        dim = int(engine.embedding_dim) if engine is not None else 129
        check_matcher(dim, cpu_features=features)
    except (EngineError, MatcherSelfTestError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    logging.getLogger(__name__).info(
        "known-answer self-test passed: %s; CPU features: %s", ", ".join([*checks, "matcher"]), ", ".join(features)
    )


# ---- keys ---------------------------------------------------------------------------------------


class _KeyDir:
    """HQ's key folder: root.key (keep offline), root.pub (pin on units), keyset.bin, signing-<id>.key."""

    def __init__(self, path: Path, passphrase: bytes | None) -> None:
        self.path = Path(path)
        self.passphrase = passphrase

    def root(self):
        from watchlist.format.keys import load_private_key

        return load_private_key(self.path / "root.key", self.passphrase)

    def keyset(self):
        from watchlist.format.keys import load_public_key, parse_keyset, read_keyset_file

        return parse_keyset(read_keyset_file(self.path / "keyset.bin"), load_public_key(self.path / "root.pub"))

    def current_signing(self):
        from watchlist.format.keys import load_private_key

        kid = (self.path / "signing.current").read_text().strip()
        return load_private_key(self.path / f"signing-{kid}.key", self.passphrase)

    def new_signing(self):
        from watchlist.format.keys import generate_key, key_id, save_private_key

        key = generate_key()
        kid = key_id(key.public_key())
        save_private_key(key, self.path / f"signing-{kid}.key", self.passphrase)
        return key, kid

    def write_keyset(self, envelope: bytes, current: str | None) -> None:
        atomic_write(self.path / "keyset.bin", envelope)
        if current:
            atomic_write(self.path / "signing.current", (current + "\n").encode())


@main.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True, help="key folder to create")
@click.option("--passphrase-env", help="encrypt the private keys with the passphrase in this environment variable")
def keygen(directory: Path, passphrase_env: str | None) -> None:
    """Create HQ's root key, a first signing key and key set 1.

    Example: watchlist keygen --dir /secure/hq-keys
    Then copy hq-keys/root.pub to every unit ([watchlist] root_key) and keep root.key offline.
    """
    from watchlist.format.keys import generate_key, make_keyset, save_private_key, save_public_key

    try:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "root.key").exists():
            raise WatchlistError(f"{directory}/root.key exists: this folder already holds HQ keys")
        kd = _KeyDir(directory, _passphrase(passphrase_env))
        root = generate_key()
        save_private_key(root, directory / "root.key", kd.passphrase)
        save_public_key(root.public_key(), directory / "root.pub")
        signing, kid = kd.new_signing()
        kd.write_keyset(make_keyset(root, 1, [signing.public_key()], issued_at=int(time.time())), kid)
    except WatchlistError as exc:
        _fail(exc)
    click.echo(f"root key and signing key {kid} in {directory} (key set serial 1)")
    click.echo(f"pin {directory / 'root.pub'} on every unit; keep {directory / 'root.key'} offline")


@main.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path, exists=True), required=True, help="key folder")
@click.option("--keep-old", is_flag=True, help="keep the old signing keys valid instead of revoking them")
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def rotate(directory: Path, keep_old: bool, passphrase_env: str | None) -> None:
    """Make a new signing key and a root-signed key set naming it (old keys revoked unless --keep-old).

    Example: watchlist rotate --dir /secure/hq-keys && watchlist publish /secure/hq-keys/keyset.bin --topic ...
    """
    from watchlist.format.keys import make_keyset

    try:
        kd = _KeyDir(directory, _passphrase(passphrase_env))
        root, ks = kd.root(), kd.keyset()
        signing, kid = kd.new_signing()
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        old = {k: Ed25519PublicKey.from_public_bytes(raw) for k, raw in ks.signing_keys.items()}
        keep = list(old.values()) if keep_old else []
        revoked = set(ks.revoked) | (set() if keep_old else set(old))
        kd.write_keyset(
            make_keyset(root, ks.serial + 1, keep + [signing.public_key()], revoked, issued_at=int(time.time())), kid
        )
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    click.echo(
        f"signing key {kid} in force (key set serial {ks.serial + 1}); "
        f"{'old keys kept' if keep_old else f'revoked: {sorted(old)}'}"
    )


@main.command()
@click.argument("key_id")
@click.option("--dir", "directory", type=click.Path(path_type=Path, exists=True), required=True, help="key folder")
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def revoke(key_id: str, directory: Path, passphrase_env: str | None) -> None:
    """Revoke a signing key (a new key set without it). Publish the key set so units learn it at once.

    Example: watchlist revoke 7ffbdafda9ea0a8ea3d5ca2bf05201fd --dir /secure/hq-keys
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from watchlist.format.keys import make_keyset

    try:
        kd = _KeyDir(directory, _passphrase(passphrase_env))
        root, ks = kd.root(), kd.keyset()
        if key_id not in ks.signing_keys and key_id not in ks.revoked:
            raise WatchlistError(f"key {key_id} is not in key set {ks.serial}: nothing to revoke")
        keep = [Ed25519PublicKey.from_public_bytes(raw) for k, raw in ks.signing_keys.items() if k != key_id]
        kd.write_keyset(
            make_keyset(root, ks.serial + 1, keep, set(ks.revoked) | {key_id}, issued_at=int(time.time())), None
        )
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    click.echo(
        f"key {key_id} revoked in key set {ks.serial + 1}" + ("" if keep else "; no signing key left: run rotate")
    )


# ---- HQ: enrolment, build, publish ----------------------------------------------------------------


@main.command()
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
        _selftest(engine)
        report = EnrolmentReport(model_id=engine.model_id, rejected=list(refused), dry_run=dry_run)
        register = None if dry_run else Register(register_path)
        run_enrol(register, engine, entries, report=report)
    except WatchlistError as exc:
        _fail(exc)
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


@main.command("enrol-canary")
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
        _selftest(engine)
        new = enrol_canary(Register(register_path), engine, photo)
    except (WatchlistError, EngineError) as exc:
        _fail(exc)
    click.echo(f"canary person enrolled for model {engine.model_id}: {new} new templates")


@main.command()
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
        _fail(exc)
    click.echo(f"{n} of {len(set(person_ids))} persons removed from the register")
    if unknown:
        click.echo(f"error: not in the register (check the ids): {', '.join(unknown)}", err=True)
        sys.exit(1)


@main.command()
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

    _selftest()
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
            added = ensure_canary(reg, model_id, check=_selftest)
            if added:
                click.echo(f"canary person enrolled for model {model_id}: {added} new templates")
        choice = choose_threshold(reg, model_id, fpir=fpir, threshold=threshold, calibration_path=calibration_path)
        if threshold is not None and choice.point is None and not dry_run:
            reg.set_meta(f"threshold:{model_id}", threshold)  # an uncalibrated model's number, kept for next builds
        kd = _KeyDir(keys_dir, _passphrase(passphrase_env))
        bundle, digests, skipped = plan_bundle(
            reg,
            model_id=model_id,
            default_threshold=choice.threshold,
            kind="delta" if delta else "full",
            base_version=base,
            valid_for_s=_duration(valid_for),
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
        _fail(exc)
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


@main.command()
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def releases(register_path: Path, as_json: bool) -> None:
    """List every release built from the register: version, kind, base, times (UTC), persons on the
    list after it (listed), templates the bundle carries (sent), size, the list's threshold and the
    false-alert rate per face it was chosen for ("-": an explicit --threshold), and when and where it
    was published ("no": never, so no delta is built on it by default).

    Example: watchlist releases --register hq.db
    """
    from watchlist.hq.register import Register

    try:
        reg = Register(register_path)
        rows = reg.releases()
        for r in rows:
            op = reg.get_meta(f"operating_point:{r['version']}") or {}
            r["threshold"], r["fpir_target"] = op.get("threshold"), op.get("fpir_target")
    except WatchlistError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no release yet: `watchlist build` makes the first")
        return
    click.echo(
        f"{'version':>7}  {'kind':5}  {'base':>4}  {'created (UTC)':20}  {'expires (UTC)':20}  "
        f"{'listed':>7}  {'sent':>9}  {'bytes':>9}  {'threshold':>9}  {'fpir':>6}  published"
    )
    for r in rows:
        pub = f"{_iso(r['published_at'])} {r['published_to']}" if r["published_at"] else "no"
        click.echo(
            f"{r['version']:>7}  {r['kind']:5}  {r['base_version'] if r['base_version'] is not None else '-':>4}  "
            f"{_iso(r['created_at']):20}  {_iso(r['expires_at']):20}  {r['persons']:>7}  {r['templates']:>9}  "
            f"{r['bytes']:>9}  {_num(r['threshold'], '.4f'):>9}  {_num(r['fpir_target'], 'g'):>6}  {pub}"
        )


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _iso(epoch: float | None) -> str:
    from watchlist.hq.listing import iso_utc

    return iso_utc(epoch) or "-"


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), help="HQ register")
@click.option("--topic", help="the site's watchlist topic prefix, e.g. checkpoint/v1/site-1/watchlist")
@click.option("--host", default="localhost", show_default=True)
@click.option("--port", default=1883, show_default=True, help="1883 plain, 8883 usually for TLS")
@click.option("--username", default=None, help="broker user name (HQ's account, e.g. hq)")
@click.option("--password-file", type=click.Path(path_type=Path), default=None, help="file holding the password")
@click.option("--ca-file", type=click.Path(path_type=Path), default=None, help="CA certificate (PEM): turns TLS on")
@click.option("--cert-file", type=click.Path(path_type=Path), default=None, help="client certificate (PEM)")
@click.option("--key-file", type=click.Path(path_type=Path), default=None, help="client key (PEM)")
@click.option("--tls", "use_tls", is_flag=True, help="TLS with the system CA store (implied by --ca-file)")
@click.option("--chunk-bytes", default=1024 * 1024, show_default=True, help="bytes per MQTT message")
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait for the broker at each step")
@click.option(
    "--export", "export_dir", type=click.Path(path_type=Path), help="write a copy into this folder (USB, scp)"
)
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path, exists=True),
    help="key folder: a delta over MQTT goes with the full snapshot of its version, signed with it",
)
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def publish(
    bundle: Path,
    register_path: Path | None,
    topic: str | None,
    host: str,
    port: int,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    use_tls: bool,
    chunk_bytes: int,
    timeout: float,
    export_dir: Path | None,
    keys_dir: Path | None,
    passphrase_env: str | None,
) -> None:
    """Publish a bundle to a site's watchlist topic (retained, QoS 1, chunked) and/or as a file
    (--export), and record it in the register as published: later deltas are built against it.
    A delta over MQTT needs --keys: the full snapshot of its version is signed from the register
    and published with it, so a unit that missed a delta catches up. A key set file goes to the
    keyset topic. A broker that refuses the account, the certificate or a topic fails at once.

    \b
    Examples:
      watchlist publish v12.cpwl --register hq.db --topic checkpoint/v1/site-1/watchlist --host broker.hq \\
          --port 8883 --username hq --password-file /secure/hq.pw --ca-file /secure/ca.pem --keys /secure/hq-keys
      watchlist publish v12.cpwl --register hq.db --export /media/usb
    """
    from pydantic import ValidationError

    from watchlist.format.bundle import peek, sha256_hex
    from watchlist.format.keys import KEYSET_MAGIC
    from watchlist.hq.build import sign_snapshot
    from watchlist.hq.publish import export_file, publish_bundle, publish_keyset
    from watchlist.hq.register import Register
    from wire.mqtt import MqttConnection

    values: dict[str, object] = {"host": host, "port": port, "username": username, "password_file": password_file}
    if ca_file or cert_file or key_file or use_tls:
        values["tls"] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    try:
        connection = MqttConnection(**values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in e.errors())
        raise click.UsageError(problems) from None
    data = bundle.read_bytes()
    try:
        if data[:8] == KEYSET_MAGIC:
            if topic is None:
                raise click.UsageError("give --topic: key sets travel over MQTT")
            publish_keyset(data, topic, connection=connection, timeout=timeout)
            click.echo(f"key set published on {topic}/keyset")
            return
        if topic is None and export_dir is None:
            raise click.UsageError("give --topic (MQTT), --export DIR (a file), or both")
        if register_path is None:
            raise click.UsageError("give --register: HQ's register records what is published, deltas build on it")
        reg = Register(register_path)
        digest = sha256_hex(data)
        reg.release_with_sha256(digest)  # before anything goes out: is it one of this register's releases?
        if topic is not None:
            snapshot = None
            if peek(data)["kind"] == "delta":
                if keys_dir is None:
                    raise click.UsageError(
                        "give --keys: a delta over MQTT goes with the full snapshot of its version, signed at "
                        "publishing, or a unit that missed a delta would stay on its old list"
                    )
                kd = _KeyDir(keys_dir, _passphrase(passphrase_env))
                snapshot = sign_snapshot(reg, data, kd.current_signing(), kd.keyset())
            m = publish_bundle(
                data, topic, snapshot=snapshot, connection=connection, chunk_bytes=chunk_bytes, timeout=timeout
            )
            version = reg.mark_published(digest, f"mqtt://{host}:{port}/{topic}")
            click.echo(
                f"{m.kind} bundle version {m.version} published on {topic}/{m.kind} ({m.chunks} chunks, {m.size} bytes)"
            )
            if snapshot is not None:
                click.echo(f"full snapshot of version {m.version} published on {topic}/full ({len(snapshot)} bytes)")
        if export_dir is not None:
            path = export_file(data, export_dir)
            version = reg.mark_published(digest, f"file:{path}")
            click.echo(f"exported to {path}")
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    click.echo(f"version {version} recorded as published in {register_path}")


@main.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--root-key", type=click.Path(path_type=Path, exists=True), help="verify signature and key chain")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def inspect_cmd(bundle: Path, root_key: Path | None, as_json: bool) -> None:
    """Show what a bundle holds: kind, version, base, dates (ISO 8601 UTC), model, threshold, the
    person ids with their template counts (names only if the bundle carries them), removed ids, and
    for a full list the rates its model's calibration expects at its threshold and size: strangers'
    faces alerted, and listed persons missed where the calibration measured misses.

    With --root-key the signature and the key chain up to that root key are verified, as a unit
    would, but without a unit's state: a delta can be checked before it is published. Exit status
    1 when the verification fails.

    Example: watchlist inspect v12.cpwl --root-key hq-keys/root.pub
    """
    from watchlist.format.bundle import peek, sha256_hex
    from watchlist.format.keys import load_public_key
    from watchlist.format.verify import verify_signed
    from watchlist.hq.build import bundle_expectation
    from watchlist.hq.listing import describe_bundle, format_rows

    data = bundle.read_bytes()
    try:
        header = peek(data)
        out = describe_bundle(header) | {"bytes": len(data), "sha256": sha256_hex(data)}
        out["expected"] = bundle_expectation(header)
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    failure = None
    if root_key:
        try:
            _, keyset, kid = verify_signed(data, load_public_key(root_key), max_bytes=len(data))
            out["signature"] = {"valid": True, "signing_key_id": kid, "keyset_serial": keyset.serial}
        except BundleRejected as exc:
            failure = f"{exc.reason}: {exc.message}"
            out["signature"] = {"valid": False, "reason": exc.reason, "detail": exc.message}
        except WatchlistError as exc:
            _fail(exc)
    else:
        out["signature"] = {"valid": None, "detail": "not checked: give --root-key"}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        base = f" (delta from version {out['base_version']})" if out["kind"] == "delta" else ""
        click.echo(f"{bundle}: {out['kind']} bundle, version {out['version']}{base}")
        click.echo(f"  created {out['created_at']}, expires {out['expires_at']}")
        click.echo(
            f"  model {out['model_id']} ({out['embedding_dim']} dims), default threshold {out['default_threshold']}"
        )
        click.echo(f"  {len(out['persons'])} persons, {out['templates']} templates, {out['bytes']} bytes")
        click.echo(f"  {out['expected']}")
        sig = out["signature"]
        if sig["valid"]:
            click.echo(f"  signature: valid (key {sig['signing_key_id']}, key set {sig['keyset_serial']})")
        else:
            click.echo(f"  signature: {'INVALID: ' + failure if failure else sig['detail']}")
        for line in format_rows(out["persons"]):
            click.echo("  " + line)
        if out["kind"] == "delta":
            click.echo(f"  removed: {', '.join(out['removed']) or 'none'}")
    if failure:
        sys.exit(1)


@main.command("list")
@click.argument("bundle", required=False, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), help="HQ register")
@click.option("--config", type=click.Path(path_type=Path), hidden=True, help="moved: edge watchlist list")
@click.option("--store", type=click.Path(path_type=Path), hidden=True, help="moved: edge watchlist list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def list_cmd(
    bundle: Path | None, register_path: Path | None, config: Path | None, store: Path | None, as_json: bool
) -> None:
    """Who is on a list: HQ's register (--register) or a bundle file (BUNDLE): person ids, priorities,
    templates with ages or photo dates, and the version. A unit's applied list: `edge watchlist list`.

    \b
    Examples:
      watchlist list --register hq.db
      watchlist list v12.cpwl
    """
    from watchlist.hq.listing import describe_bundle, format_rows, rows_from_register

    if config is not None or store is not None:
        _moved("list", "--config /etc/checkpoint/unit.toml")
    if (bundle is None) == (register_path is None):
        raise click.UsageError("give one of: BUNDLE, --register")
    try:
        if bundle is not None:
            from watchlist.format.bundle import peek

            d = describe_bundle(peek(bundle.read_bytes()))
            rows = d["persons"]
            what = f"bundle {bundle}: {d['kind']} version {d['version']}" + (
                f" (delta from {d['base_version']}, removes {len(d['removed'])})" if d["kind"] == "delta" else ""
            )
            meta = {"source": str(bundle), "version": d["version"], "kind": d["kind"], "removed": d["removed"]}
        else:
            from watchlist.hq.register import Register

            reg = Register(register_path)
            rows = rows_from_register(reg.persons())
            rels = reg.releases()
            published = reg.latest_published_version()
            what = (
                f"register {register_path}: latest release {rels[-1]['version'] if rels else 'none'}, "
                f"latest published {published or 'none'}"
            )
            meta = {
                "source": str(register_path),
                "latest_release": rels[-1]["version"] if rels else None,
                "latest_published": published,
            }
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(meta | {"persons": rows}, indent=2))
        return
    click.echo(f"{what}; {len(rows)} persons, {sum(r['templates'] for r in rows)} templates")
    for line in format_rows(rows):
        click.echo(line)


# ---- moved to the unit's command line ------------------------------------------------------------


def _moved(command: str, example: str) -> None:
    """A unit's spelling from before `edge watchlist`: say where it went and stop (exit status 2)."""
    click.echo(
        f"moved: use `edge watchlist {command} {example}` (the unit's watchlist commands are under `edge`; "
        "`watchlist` keeps HQ's)",
        err=True,
    )
    sys.exit(2)


_ANY_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@main.command("apply", hidden=True, context_settings=_ANY_ARGS)
def apply_moved() -> None:
    """Moved: edge watchlist apply FILE --config /etc/checkpoint/unit.toml (exit status 2)."""
    _moved("apply", "FILE --config /etc/checkpoint/unit.toml")


@main.command("status", hidden=True, context_settings=_ANY_ARGS)
def status_moved() -> None:
    """Moved: edge watchlist status --config /etc/checkpoint/unit.toml (exit status 2)."""
    _moved("status", "--config /etc/checkpoint/unit.toml")


if __name__ == "__main__":
    main()
