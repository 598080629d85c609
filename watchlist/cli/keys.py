"""`keygen`, `rotate`, `revoke`: HQ's root key, its signing keys and the key sets naming them."""

from __future__ import annotations

import time
from pathlib import Path

import click

from watchlist.cli.common import KeyDir, fail, passphrase
from watchlist.format.errors import BundleRejected, WatchlistError


@click.command()
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
        kd = KeyDir(directory, passphrase(passphrase_env))
        root = generate_key()
        save_private_key(root, directory / "root.key", kd.passphrase)
        save_public_key(root.public_key(), directory / "root.pub")
        signing, kid = kd.new_signing()
        kd.write_keyset(make_keyset(root, 1, [signing.public_key()], issued_at=int(time.time())), kid)
    except WatchlistError as exc:
        fail(exc)
    click.echo(f"root key and signing key {kid} in {directory} (key set serial 1)")
    click.echo(f"pin {directory / 'root.pub'} on every unit; keep {directory / 'root.key'} offline")


@click.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path, exists=True), required=True, help="key folder")
@click.option("--keep-old", is_flag=True, help="keep the old signing keys valid instead of revoking them")
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def rotate(directory: Path, keep_old: bool, passphrase_env: str | None) -> None:
    """Make a new signing key and a root-signed key set naming it (old keys revoked unless --keep-old).

    Example: watchlist rotate --dir /secure/hq-keys && watchlist publish /secure/hq-keys/keyset.bin --topic ...
    """
    from watchlist.format.keys import make_keyset

    try:
        kd = KeyDir(directory, passphrase(passphrase_env))
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
        fail(exc)
    click.echo(
        f"signing key {kid} in force (key set serial {ks.serial + 1}); "
        f"{'old keys kept' if keep_old else f'revoked: {sorted(old)}'}"
    )


@click.command()
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
        kd = KeyDir(directory, passphrase(passphrase_env))
        root, ks = kd.root(), kd.keyset()
        if key_id not in ks.signing_keys and key_id not in ks.revoked:
            raise WatchlistError(f"key {key_id} is not in key set {ks.serial}: nothing to revoke")
        keep = [Ed25519PublicKey.from_public_bytes(raw) for k, raw in ks.signing_keys.items() if k != key_id]
        kd.write_keyset(
            make_keyset(root, ks.serial + 1, keep, set(ks.revoked) | {key_id}, issued_at=int(time.time())), None
        )
    except (WatchlistError, BundleRejected) as exc:
        fail(exc)
    click.echo(
        f"key {key_id} revoked in key set {ks.serial + 1}" + ("" if keep else "; no signing key left: run rotate")
    )
