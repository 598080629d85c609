"""`releases`, `inspect`, `list`: what the register has released, and what a bundle or the
register holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from watchlist.cli.common import fail
from watchlist.cli.moved import moved
from watchlist.format.errors import BundleRejected, WatchlistError


@click.command()
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
            op = reg.get_meta(f"operating_point:{r['version']}")
            op = op if isinstance(op, dict) else {}  # none: built before operating points were kept
            r["threshold"], r["fpir_target"] = op.get("threshold"), op.get("fpir_target")
    except WatchlistError as exc:
        fail(exc)
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


@click.command("inspect")
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
        fail(exc)
    failure = None
    if root_key:
        try:
            _, keyset, kid = verify_signed(data, load_public_key(root_key), max_bytes=len(data))
            out["signature"] = {"valid": True, "signing_key_id": kid, "keyset_serial": keyset.serial}
        except BundleRejected as exc:
            failure = f"{exc.reason}: {exc.message}"
            out["signature"] = {"valid": False, "reason": exc.reason, "detail": exc.message}
        except WatchlistError as exc:
            fail(exc)
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


@click.command("list")
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
        moved("list", "--config /etc/checkpoint/unit.toml")
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
        elif register_path is not None:  # always, when no BUNDLE (checked above)
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
        fail(exc)
    if as_json:
        click.echo(json.dumps(meta | {"persons": rows}, indent=2))
        return
    click.echo(f"{what}; {len(rows)} persons, {sum(r['templates'] for r in rows)} templates")
    for line in format_rows(rows):
        click.echo(line)
