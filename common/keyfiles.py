"""Ed25519 private keys on disk: PKCS#8 PEM, readable by the owner only, never overwritten.

HQ's signing keys (watchlist.format.keys) and a unit's hit-signing key (wire.signing) are kept the
same way; each caller turns `KeyFileError` into its own error with its own hint.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class KeyFileError(ValueError):
    """A private key file could not be written or read; the message names the file and the cause."""


def write_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str], passphrase: bytes | None = None) -> Path:
    """Write `key` as PKCS#8 PEM (encrypted when a passphrase is given), mode 0600; an existing file
    is never overwritten."""
    enc = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists: refusing to overwrite a key (move it away first)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def read_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key written by `write_private_key`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a readable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
