"""Ed25519 keys and the key set: the root key HQ keeps offline signs which signing keys are valid.

Units pin the root public key. Bundles are signed by a signing key; the key set, a statement the
root key signs, lists the signing keys in force and those revoked, and carries a serial number
that only grows. Rotating a signing key is a new key set; the root key itself never signs a
watchlist.

Key set layout (all integers little-endian)::

    magic        8 bytes  b"CPWLKEY1"
    payload_len  u32
    payload      canonical JSON (watchlist.format.canonical):
                 {"format": 1, "type": "keyset", "serial": int >= 1, "issued_at": int (epoch s),
                  "root_key_id": hex32, "signing_keys": [{"key_id": hex32, "public_key": hex64}],
                  "revoked": [hex32, ...]}
    signature    64 bytes  Ed25519(root, KEYSET_DOMAIN || SHA-256(magic || payload_len || payload))
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import keyfiles
from watchlist.format import canonical
from watchlist.format.errors import BundleRejected, KeyFileError

KEYSET_MAGIC = b"CPWLKEY1"
KEYSET_DOMAIN = b"checkpoint-watchlist-keyset-v1\x00"
MAX_KEYSET_BYTES = 64 * 1024
SIGNATURE_BYTES = 64
_LEN = struct.Struct("<I")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A key's id: the first 16 bytes of SHA-256 of its raw 32 bytes, in hex."""
    return hashlib.sha256(public_raw(public_key)).digest()[:16].hex()


def public_raw(public_key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_key() -> Ed25519PrivateKey:
    """A new random Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path, passphrase: bytes | None = None) -> None:
    """Write a private key as PKCS#8 PEM, readable by the owner only (encrypted when a passphrase is given)."""
    try:
        keyfiles.write_private_key(key, path, passphrase)
    except keyfiles.KeyFileError as exc:
        raise KeyFileError(str(exc)) from None


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PKCS#8 PEM) written by `save_private_key`."""
    try:
        return keyfiles.read_private_key(path, passphrase)
    except keyfiles.KeyFileError as exc:
        raise KeyFileError(
            f"{exc}; give the .key file `watchlist keygen` wrote (and its passphrase if it has one)"
        ) from None


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    """Write a public key as PEM (SubjectPublicKeyInfo): the file units pin."""
    Path(path).write_bytes(
        key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key: PEM, or the raw key as 64 hex digits."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from None
    text = data.strip()
    try:
        if len(text) == 64 and all(c in b"0123456789abcdefABCDEF" for c in text):
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(
            f"{path} is not a public key ({exc}); give the root.pub file `watchlist keygen` wrote"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def signed_message(domain: bytes, region: bytes | memoryview) -> bytes:
    """What is actually signed: a domain tag (so a signature of one kind never passes as
    another) and the SHA-256 of the signed region."""
    return domain + hashlib.sha256(region).digest()


@dataclass(frozen=True)
class KeySet:
    """A verified key set: which signing keys are in force and which are revoked."""

    serial: int
    issued_at: int
    root_key_id: str
    signing_keys: dict[str, bytes]  # key id -> raw public key
    revoked: frozenset[str]
    envelope: bytes  # the signed bytes, to store or embed as they are

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """The signing key `kid` if this key set lists it."""
        raw = self.signing_keys.get(kid)
        return None if raw is None else Ed25519PublicKey.from_public_bytes(raw)


def make_keyset(
    root: Ed25519PrivateKey,
    serial: int,
    signing_keys: Iterable[Ed25519PublicKey],
    revoked: Iterable[str] = (),
    issued_at: int = 0,
) -> bytes:
    """Sign a key set with the root key; returns its envelope bytes."""
    if serial < 1:
        raise ValueError("key set serial must be >= 1")
    keys = sorted({key_id(k): public_raw(k).hex() for k in signing_keys}.items())
    revoked_ids = sorted(set(revoked))
    if any(kid in revoked_ids for kid, _ in keys):
        raise ValueError("a key cannot be both in force and revoked")
    payload = canonical.dumps(
        {
            "format": 1,
            "type": "keyset",
            "serial": int(serial),
            "issued_at": int(issued_at),
            "root_key_id": key_id(root.public_key()),
            "signing_keys": [{"key_id": kid, "public_key": pub} for kid, pub in keys],
            "revoked": revoked_ids,
        }
    )
    head = KEYSET_MAGIC + _LEN.pack(len(payload)) + payload
    return head + root.sign(signed_message(KEYSET_DOMAIN, head))


def parse_keyset(data: bytes, root: Ed25519PublicKey) -> KeySet:
    """Verify a key set envelope against the pinned root key, then parse it.

    Raises BundleRejected (oversized, not_a_bundle, truncated, bad_keyset_signature, malformed).
    """
    if len(data) > MAX_KEYSET_BYTES:
        raise BundleRejected("oversized", f"key set of {len(data)} bytes exceeds {MAX_KEYSET_BYTES}")
    if data[:8] != KEYSET_MAGIC:
        raise BundleRejected("not_a_bundle", "key set does not start with CPWLKEY1")
    if len(data) < 12 + SIGNATURE_BYTES:
        raise BundleRejected("truncated", f"key set of {len(data)} bytes is shorter than its fixed fields")
    (plen,) = _LEN.unpack_from(data, 8)
    if 12 + plen + SIGNATURE_BYTES != len(data):
        raise BundleRejected(
            "truncated", f"key set says {plen} payload bytes, {len(data) - 12 - SIGNATURE_BYTES} present"
        )
    head, sig = data[: 12 + plen], data[12 + plen :]
    try:
        root.verify(sig, signed_message(KEYSET_DOMAIN, head))
    except InvalidSignature:
        raise BundleRejected(
            "bad_keyset_signature",
            f"key set is not signed by the pinned root key {key_id(root)} (tampered, or from another HQ)",
        ) from None
    try:
        doc = canonical.loads(head[12:])
        if doc.get("type") != "keyset" or doc.get("format") != 1:
            raise ValueError("not a format-1 key set")
        if doc["root_key_id"] != key_id(root):
            raise ValueError(f"names root {doc['root_key_id']}")
        keys: dict[str, bytes] = {}
        for entry in doc["signing_keys"]:
            raw = bytes.fromhex(entry["public_key"])
            if len(raw) != 32 or hashlib.sha256(raw).digest()[:16].hex() != entry["key_id"]:
                raise ValueError(f"key {entry.get('key_id')} does not match its public key")
            keys[entry["key_id"]] = raw
        serial, issued = doc["serial"], doc["issued_at"]
        revoked = doc["revoked"]
        if not isinstance(serial, int) or serial < 1 or not isinstance(issued, int):
            raise ValueError("serial and issued_at must be integers")
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise ValueError("revoked must be a list of key ids")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleRejected("malformed", f"key set is signed but malformed: {exc}") from None
    return KeySet(serial, issued, doc["root_key_id"], keys, frozenset(revoked), bytes(data))


def read_keyset_file(path: Path) -> bytes:
    """The bytes of a key set file, read no further than the largest key set."""
    path = Path(path)
    try:
        # Read at most one byte past the limit: stat() says 0 for a FIFO or /dev/zero.
        with open(path, "rb") as f:
            data = f.read(MAX_KEYSET_BYTES + 1)
        if len(data) > MAX_KEYSET_BYTES:
            raise KeyFileError(f"{path} is larger than {MAX_KEYSET_BYTES} bytes, too large for a key set")
        return data
    except OSError as exc:
        raise KeyFileError(f"cannot read key set {path}: {exc.strerror}") from None
