"""Signed records: each unit signs its hits and status messages with its own Ed25519 key, so the
centre knows which unit really sent a hit; a broker account alone cannot forge one.

A unit's key pair is made at installation (`deploy/make-credentials unit`); the private key stays
on the unit (``[mqtt] signing_key``), the public key is registered at the centre as one line of a
*unit keys* file::

    checkpoint-unit-key v1 <site> <unit> <base64 of the raw 32-byte public key>

What is signed (`canonical_bytes`): the domain tag ``checkpoint-record-v1`` and a NUL byte, then
the record as JSON with sorted keys, no spaces and ASCII escapes, with every field except ``sig``
(so ``key_id``, ``site`` and ``unit_id`` are covered). A hit's crop is covered by its digest: its
``crop_jpeg_b64`` is replaced by ``crop_sha256``, the hex SHA-256 of the JPEG bytes (null when
there is no crop), so the signature does not depend on how the base64 is written and the outbox
may still drop a crop before the hit is sent (the unit signs when it publishes). A hit's context
frame (``context_jpeg_b64``) is covered as the text it is, like any other field: a receiver older
than context frames canonicalises every key it gets, and must still verify such a hit.

`verify_record` is what a receiver calls; it returns a `Verdict`. It binds the signature to the
``site`` and ``unit_id`` inside the record: the receiver must also check that they match the topic
the message came on (it does so for every message anyway).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wire.errors import ProtocolError
from wire.records import HIT_SCHEMA, load_json_object

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"checkpoint-record-v1\x00"
KEY_LINE_TAG = "checkpoint-unit-key"
KEY_LINE_VERSION = "v1"


class SigningError(ValueError):
    """A signing key or a unit keys file cannot be used; the message names the file and what to do."""


class Verdict(str, Enum):
    """What `verify_record` found; compares equal to its string value ("valid", ...)."""

    VALID = "valid"
    UNSIGNED = "unsigned"  # no signature at all (a unit not yet migrated, or a forger without a key)
    BAD_SIGNATURE = "bad_signature"  # signed with a key the unit has, but the record was changed or forged
    UNKNOWN_UNIT = "unknown_unit"  # signed, but the centre has no key for this site/unit
    UNKNOWN_KEY = "unknown_key"  # signed with a key id the centre does not hold for this unit

    def __str__(self) -> str:
        return self.value


def key_id_of(public_raw: bytes) -> str:
    """A unit key's id: the first 8 bytes of the SHA-256 of the raw public key, as 16 hex digits."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


_FROM_RECORD: Any = object()


def canonical_bytes(record: dict[str, Any], crop: bytes | None = _FROM_RECORD) -> bytes:
    """The bytes a signature covers: every field but ``sig``, a hit's crop by its SHA-256.

    `crop`: the crop's bytes when the caller has them (saves decoding the base64 again); by
    default they are decoded from the record's ``crop_jpeg_b64``."""
    body = {k: v for k, v in record.items() if k != "sig"}
    if body.get("schema") == HIT_SCHEMA:
        b64 = body.pop("crop_jpeg_b64", None)
        if crop is _FROM_RECORD:
            crop = base64.b64decode(b64, validate=True) if isinstance(b64, str) else None
        body["crop_sha256"] = hashlib.sha256(crop).hexdigest() if crop else None
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class UnitSigner:
    """A unit's private key and its id; `sign` adds ``key_id`` and ``sig`` to a record."""

    key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_key(cls, key: Ed25519PrivateKey) -> UnitSigner:
        return cls(key, key_id_of(_public_raw(key.public_key())))

    @property
    def public_raw(self) -> bytes:
        return _public_raw(self.key.public_key())

    def sign(self, record: dict[str, Any], crop: bytes | None = _FROM_RECORD) -> dict[str, Any]:
        """`record` with ``key_id`` and ``sig`` set (a hit with its ``crop_jpeg_b64`` already in;
        `crop`: its bytes, if at hand)."""
        signed = dict(record)
        signed.pop("sig", None)
        signed["key_id"] = self.key_id
        signed["sig"] = base64.b64encode(self.key.sign(canonical_bytes(signed, crop))).decode("ascii")
        return signed


def sign_record(record: dict[str, Any], signer: UnitSigner) -> dict[str, Any]:
    """`record` signed by `signer` (see `canonical_bytes` for what is covered)."""
    return signer.sign(record)


def generate_unit_key() -> UnitSigner:
    """A new random Ed25519 key for a unit."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return UnitSigner.from_key(Ed25519PrivateKey.generate())


def write_unit_key(signer: UnitSigner, path: Path) -> Path:
    """Write the private key as PKCS#8 PEM readable by its owner only; never overwrites a key."""
    from common import keyfiles

    try:
        return keyfiles.write_private_key(signer.key, path)
    except keyfiles.KeyFileError:
        raise SigningError(f"{path} exists: refusing to overwrite a unit's signing key (move it away first)") from None


def load_unit_key(path: Path) -> UnitSigner:
    """Read a unit's private signing key (PKCS#8 PEM, as `write_unit_key` writes it)."""
    from common import keyfiles

    try:
        return UnitSigner.from_key(keyfiles.read_private_key(path))
    except keyfiles.KeyFileError as exc:
        raise SigningError(f"signing_key: {exc}; give the .key file deploy/make-credentials wrote") from None


def public_key_line(site: str, unit_id: str, public_raw: bytes) -> str:
    """The line that registers a unit's public key at the centre (one line of a unit keys file)."""
    return f"{KEY_LINE_TAG} {KEY_LINE_VERSION} {site} {unit_id} {base64.b64encode(public_raw).decode('ascii')}"


@dataclass(frozen=True)
class UnitKey:
    """One registered unit public key."""

    site: str
    unit_id: str
    key_id: str
    public_raw: bytes


class KnownKeys:
    """The unit public keys the centre knows, by (site, unit) and key id.

    Example::

        keys = KnownKeys.load(Path("/etc/checkpoint/unit-keys"))   # a file, or a folder of *.pub files
        verdict = verify_record(payload, keys)
    """

    def __init__(self, keys: list[UnitKey] | None = None) -> None:
        self._by_unit: dict[tuple[str, str], dict[str, Ed25519PublicKey]] = {}
        for k in keys or []:
            self.add(k)

    def add(self, key: UnitKey) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._by_unit.setdefault((key.site, key.unit_id), {})[key.key_id] = Ed25519PublicKey.from_public_bytes(
            key.public_raw
        )

    def knows_unit(self, site: str, unit_id: str) -> bool:
        """True when at least one key is registered for this unit (unsigned hits from it are then suspect)."""
        return bool(self._by_unit.get((site, unit_id)))

    def key(self, site: str, unit_id: str, key_id: str) -> Ed25519PublicKey | None:
        return self._by_unit.get((site, unit_id), {}).get(key_id)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_unit.values())

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> KnownKeys:
        """Read unit key lines (blank lines and '#' comments skipped); SigningError names the line."""
        keys = cls()
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 5 or parts[0] != KEY_LINE_TAG or parts[1] != KEY_LINE_VERSION:
                raise SigningError(
                    f"{source}:{n}: expected '{KEY_LINE_TAG} {KEY_LINE_VERSION} <site> <unit> <base64 key>' "
                    "(the .pub line deploy/make-credentials wrote)"
                )
            try:
                raw = base64.b64decode(parts[4], validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                raise SigningError(f"{source}:{n}: the key is not 32 bytes of base64 (an Ed25519 public key)")
            keys.add(UnitKey(parts[2], parts[3], key_id_of(raw), raw))
        return keys

    @classmethod
    def load(cls, path: Path) -> KnownKeys:
        """Read a unit keys file, or every ``*.pub`` file in a folder."""
        path = Path(path)
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        keys = cls()
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise SigningError(f"cannot read unit keys from {f}: {exc}") from None
            for site_unit, by_id in cls.parse(text, str(f))._by_unit.items():
                keys._by_unit.setdefault(site_unit, {}).update(by_id)
        return keys


def verify_record(
    payload: bytes | dict[str, Any], known_keys: KnownKeys, *, crop: bytes | None = _FROM_RECORD
) -> Verdict:
    """Check a hit's or status message's signature against the unit keys the centre holds.

    `payload` is the message as received (or its parsed JSON object); `crop`, optionally, the crop
    bytes decode_hit returned for it (saves decoding the base64 again). Call it after the record
    has been decoded (wire.records.decode_*), and check that the record's site and unit match its
    topic. Raises ProtocolError only when `payload` is not a JSON object at all."""
    from cryptography.exceptions import InvalidSignature

    body = payload if isinstance(payload, dict) else load_json_object(payload, "signed record")
    sig, kid = body.get("sig"), body.get("key_id")
    if sig is None and kid is None:
        return Verdict.UNSIGNED
    site, unit_id = body.get("site"), body.get("unit_id")
    if not isinstance(site, str) or not isinstance(unit_id, str) or not known_keys.knows_unit(site, unit_id):
        return Verdict.UNKNOWN_UNIT
    public = known_keys.key(site, unit_id, kid) if isinstance(kid, str) else None
    if public is None:
        return Verdict.UNKNOWN_KEY
    try:
        signature = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
        public.verify(signature, canonical_bytes(body, crop))
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return Verdict.BAD_SIGNATURE
    return Verdict.VALID


__all__ = [
    "KnownKeys",
    "ProtocolError",
    "SigningError",
    "UnitKey",
    "UnitSigner",
    "Verdict",
    "canonical_bytes",
    "generate_unit_key",
    "key_id_of",
    "load_unit_key",
    "public_key_line",
    "sign_record",
    "verify_record",
    "write_unit_key",
]
