"""The unit's check of a bundle, before anything in it is used.

Order (each step only reads what the previous ones vouched for):

1. size within `max_bundle_bytes` (endless data) -- before a byte is parsed;
2. magic and section lengths (not a bundle, truncated);
3. the embedded key set is signed by the pinned root key; the newer of it and the key set the
   unit already holds decides which signing keys count (revocation, rotation);
4. the signing key is listed and not revoked, and the bundle's signature holds (arbitrary content);
5. only now the header JSON is parsed; then model identity (mix-and-match), version newer than the
   applied one (rollback), a delta's base equal to the applied version (mix-and-match), and the
   expiry time (freeze).

Any failure raises BundleRejected with a reason code; the caller keeps its current list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from watchlist.format.bundle import BUNDLE_DOMAIN, Bundle, frame, parse_verified, sha256_hex
from watchlist.format.errors import BundleRejected
from watchlist.format.keys import KeySet, parse_keyset, signed_message


@dataclass(frozen=True)
class UnitTrust:
    """What the unit knows when a bundle arrives."""

    root_key: Ed25519PublicKey
    expected_model_id: str  # the unit's embedding model
    max_bundle_bytes: int
    applied_version: int = 0  # 0: no list applied yet
    applied_model_id: str | None = None
    applied_offset: tuple[float, ...] | None = None  # what the applied list's stored rows are relative to
    keyset: KeySet | None = None  # the newest key set the unit has accepted


@dataclass(frozen=True)
class Verified:
    """A bundle that passed every check, with the key set that vouched for it."""

    bundle: Bundle
    keyset: KeySet
    signing_key_id: str
    sha256: str
    size: int


def check_size(size: int, max_bytes: int, what: str = "bundle") -> None:
    """Reject `size` beyond the limit (raise BundleRejected('oversized'))."""
    if size > max_bytes:
        raise BundleRejected(
            "oversized",
            f"{what} of {size} bytes exceeds this unit's max_bundle_bytes ({max_bytes}); "
            "raise [watchlist] max_bundle_bytes if HQ's lists are really this large",
        )


def read_bundle_file(path: Path, max_bytes: int) -> bytes:
    """Read a bundle file, refusing one larger than `max_bytes` before reading it."""
    path = Path(path)
    check_size(path.stat().st_size, max_bytes, f"bundle file {path}")
    data = path.read_bytes()
    check_size(len(data), max_bytes, f"bundle file {path}")
    return data


def newest_keyset(held: KeySet | None, offered: KeySet) -> KeySet:
    """The key set that decides: the one with the higher serial (the held one on a tie)."""
    if held is not None and held.serial >= offered.serial:
        return held
    return offered


def verify_signed(
    data: bytes | memoryview, root_key: Ed25519PublicKey, max_bytes: int, held: KeySet | None = None
) -> tuple[Bundle, KeySet, str]:
    """Steps 1-4 of the module doc: size, framing, key chain up to `root_key`, signature; then the
    header is parsed. Returns (bundle, keyset, signing key id). Nothing about a unit's state is
    checked, so HQ can inspect any bundle (a delta too) before publishing it."""
    check_size(len(data), max_bytes)
    framed = frame(data)
    embedded = parse_keyset(bytes(framed.keyset), root_key)
    keyset = newest_keyset(held, embedded)
    kid = framed.key_id
    if kid in keyset.revoked:
        raise BundleRejected(
            "revoked_key",
            f"signed by key {kid}, which key set {keyset.serial} revokes; ask HQ to re-sign with a current key",
        )
    public = keyset.public_key(kid)
    if public is None:
        raise BundleRejected("unknown_key", f"signed by key {kid}, which key set {keyset.serial} does not list")
    try:
        public.verify(framed.signature, signed_message(BUNDLE_DOMAIN, framed.signed_region))
    except InvalidSignature:
        raise BundleRejected(
            "bad_signature", f"signature by key {kid} does not match the bundle's bytes (altered in transit or storage)"
        ) from None
    return parse_verified(framed), keyset, kid


def verify_bundle(data: bytes | memoryview, trust: UnitTrust, now: float) -> Verified:
    """Check `data` completely against `trust` at time `now` (epoch seconds); see the module doc."""
    bundle, keyset, kid = verify_signed(data, trust.root_key, trust.max_bundle_bytes, trust.keyset)
    if bundle.model_id != trust.expected_model_id:
        raise BundleRejected(
            "wrong_model",
            f"bundle {bundle.version} holds embeddings of model {bundle.model_id!r}, this unit runs "
            f"{trust.expected_model_id!r}; HQ must enrol with the unit's model",
        )
    if bundle.kind == "delta" and trust.applied_model_id is not None and bundle.model_id != trust.applied_model_id:
        raise BundleRejected(
            "wrong_model",
            f"delta {bundle.version} is for model {bundle.model_id!r} but the applied list is of "
            f"{trust.applied_model_id!r}; send a full bundle",
        )
    if bundle.version <= trust.applied_version:
        raise BundleRejected(
            "rollback", f"bundle version {bundle.version} is not newer than the applied version {trust.applied_version}"
        )
    if bundle.kind == "delta" and bundle.base_version != trust.applied_version:
        raise BundleRejected(
            "wrong_base",
            f"delta {bundle.base_version}->{bundle.version} does not apply to version {trust.applied_version}; "
            "it needs the full bundle or the matching delta",
        )
    if bundle.kind == "delta" and not _same_offset(bundle.embedding_offset, trust.applied_offset):
        raise BundleRejected(
            "wrong_base",
            f"delta {bundle.version} encodes embeddings around another offset than the applied list; "
            "it needs the full bundle",
        )
    if bundle.expires_at <= now:
        raise BundleRejected("expired", f"bundle {bundle.version} expired at {bundle.expires_at} (now {int(now)})")
    return Verified(bundle, keyset, kid, sha256_hex(data), len(data))


def _same_offset(offered: np.ndarray | None, applied: tuple[float, ...] | None) -> bool:
    if offered is None or applied is None:
        return offered is None and applied is None
    return bool(np.array_equal(offered, np.array(applied, dtype=np.float32)))


def verify_keyset(data: bytes, trust: UnitTrust) -> KeySet:
    """Check a stand-alone key set (a revocation or rotation sent on its own).

    Raises BundleRejected; 'keyset_rollback' when it is not newer than the one held.
    """
    check_size(len(data), trust.max_bundle_bytes, "key set")
    ks = parse_keyset(bytes(data), trust.root_key)
    if trust.keyset is not None and ks.serial <= trust.keyset.serial:
        raise BundleRejected(
            "keyset_rollback", f"key set serial {ks.serial} is not newer than the held serial {trust.keyset.serial}"
        )
    return ks
