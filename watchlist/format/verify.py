"""The unit's check of a bundle, before anything in it is used.

Order (each step only reads what the previous ones vouched for):

1. size within `max_bundle_bytes` (endless data) -- before a byte is parsed;
2. magic and section lengths (not a bundle, truncated);
3. the embedded key set is signed by the pinned root key; the newer of it and the key set the
   unit already holds decides which signing keys count (revocation, rotation);
4. the signing key is listed and not revoked, and the bundle's signature holds (arbitrary content);
5. only now the header JSON is parsed, bounded and checked as if unsigned (defence in depth: a
   mistaken or stolen signing key must not crash or blind the unit): sizes and numbers within the
   format's limits, unit-length finite templates (watchlist.format.bundle.parse_verified);
6. model identity (mix-and-match), the dimension the unit's engine produces, thresholds inside the
   model's calibrated range, version newer than the applied one (rollback), a delta's base equal
   to the applied version (mix-and-match), and the expiry time (freeze).

Any failure raises BundleRejected with a reason code; the caller keeps its current list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from watchlist.format.bundle import BUNDLE_DOMAIN, MAX_VERSION, Bundle, frame, parse_verified, sha256_hex
from watchlist.format.errors import BundleFileError, BundleRejected
from watchlist.format.keys import KeySet, parse_keyset, signed_message

# Thresholds any cosine model can use: at or below 0 half of all strangers would match, at 1 nobody.
# A model's calibrated range (engines.calibration, passed in by the unit as UnitTrust.threshold_range)
# narrows it; this is the fallback where none is known.
MODEL_INDEPENDENT_THRESHOLD_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class UnitTrust:
    """What the unit knows when a bundle arrives."""

    root_key: Ed25519PublicKey
    expected_model_id: str  # the unit's embedding model
    max_bundle_bytes: int
    expected_dim: int | None = None  # the unit's engine's embedding size (None: not known, e.g. `edge watchlist apply`)
    threshold_range: tuple[float, float] = MODEL_INDEPENDENT_THRESHOLD_RANGE  # open interval
    applied_dim: int | None = None
    applied_version: int = 0  # 0: no list applied yet
    applied_model_id: str | None = None
    applied_offset: tuple[float, ...] | None = None  # what the applied list's stored rows are relative to
    keyset: KeySet | None = None  # the newest key set the unit has accepted
    require_canary: bool = False  # the unit runs the canary: a list must hold the canary person
    applied_has_canary: bool = False  # the applied list holds the canary person (a delta may keep it)


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
    """Read a bundle file, reading at most `max_bytes` + 1 bytes whatever it is.

    A regular file's size is checked before reading; a pipe, FIFO, device or a symlink to one
    reports size 0, so the read itself is bounded (/dev/zero gives 'oversized', not an endless read).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            check_size(os.fstat(f.fileno()).st_size, max_bytes, f"bundle file {path}")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise BundleFileError(f"cannot read bundle file {path}: {exc.strerror or exc}") from None
    check_size(len(data), max_bytes, f"bundle file {path} (read {len(data)} bytes, stopped there)")
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
    embedded = _bounded(parse_keyset(bytes(framed.keyset), root_key))
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
    _check_dimension(bundle, trust)
    _check_thresholds(bundle, trust.threshold_range)
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
    if trust.require_canary:
        _check_canary(bundle, trust)
    if bundle.expires_at <= now:
        raise BundleRejected("expired", f"bundle {bundle.version} expired at {bundle.expires_at} (now {int(now)})")
    return Verified(bundle, keyset, kid, sha256_hex(data), len(data))


def _check_canary(bundle: Bundle, trust: UnitTrust) -> None:
    """A unit that runs the canary takes no list that leaves it without the canary person: with
    such a list its canary would fail for ever and it would match on a list nobody checks."""
    from wire.records import CANARY_PERSON_ID

    if bundle.kind == "full":
        kept = bundle.has_canary
    else:
        kept = bundle.has_canary or (trust.applied_has_canary and CANARY_PERSON_ID not in bundle.removed)
    if not kept:
        what = f"full bundle {bundle.version}" if bundle.kind == "full" else f"delta {bundle.version}"
        raise BundleRejected(
            "no_canary",
            f"{what} leaves no canary person ({CANARY_PERSON_ID!r}) on the list, and this unit runs the canary: "
            "HQ must enrol it (`watchlist enrol-canary`) and build again; or turn the unit's canary off "
            "([canary] enabled = false) while HQ's tools are older than the canary",
        )


def _bounded(ks: KeySet) -> KeySet:
    # The serial is stored and compared as an SQLite integer.
    if not 1 <= ks.serial <= MAX_VERSION or not 0 <= ks.issued_at <= MAX_VERSION:
        raise BundleRejected("out_of_range", f"key set serial {ks.serial} or issued_at is beyond the format's limits")
    return ks


def _check_dimension(bundle: Bundle, trust: UnitTrust) -> None:
    dim = bundle.embedding_dim
    if trust.expected_dim is not None and dim != trust.expected_dim:
        raise BundleRejected(
            "wrong_dimension",
            f"bundle {bundle.version} holds {dim}-d embeddings, this unit's engine makes {trust.expected_dim}-d "
            f"ones for model {trust.expected_model_id!r}; HQ must enrol with the unit's model",
        )
    # Where the engine's size is not known, the applied list's stands in for it. Where it is, a full
    # bundle of that size replaces a list of another (one that blinds the unit); a delta must still
    # fit the list it changes.
    stands_in = trust.expected_dim is None or bundle.kind == "delta"
    if stands_in and trust.applied_dim is not None and trust.applied_model_id == bundle.model_id:
        if dim != trust.applied_dim:
            raise BundleRejected(
                "wrong_dimension",
                f"bundle {bundle.version} holds {dim}-d embeddings of model {bundle.model_id!r}, the applied "
                f"list of that model is {trust.applied_dim}-d; one model has one embedding size: send a full bundle",
            )


def _check_thresholds(bundle: Bundle, allowed: tuple[float, float]) -> None:
    lo, hi = allowed
    named = [("default_threshold", bundle.default_threshold)] + [
        (f"person {p.person_id} threshold", p.threshold) for p in bundle.persons if p.threshold is not None
    ]
    for what, value in named:
        if not lo < value < hi:
            raise BundleRejected(
                "bad_threshold",
                f"bundle {bundle.version}: {what} {value:g} is outside ({lo:g}, {hi:g}), the range calibrated "
                f"for model {bundle.model_id!r}; a threshold there would match strangers or nobody",
            )


def _same_offset(offered: np.ndarray | None, applied: tuple[float, ...] | None) -> bool:
    if offered is None or applied is None:
        return offered is None and applied is None
    return bool(np.array_equal(offered, np.array(applied, dtype=np.float32)))


def verify_keyset(data: bytes, trust: UnitTrust) -> KeySet:
    """Check a stand-alone key set (a revocation or rotation sent on its own).

    Raises BundleRejected; 'keyset_rollback' when it is not newer than the one held.
    """
    check_size(len(data), trust.max_bundle_bytes, "key set")
    ks = _bounded(parse_keyset(bytes(data), trust.root_key))
    if trust.keyset is not None and ks.serial <= trust.keyset.serial:
        raise BundleRejected(
            "keyset_rollback", f"key set serial {ks.serial} is not newer than the held serial {trust.keyset.serial}"
        )
    return ks
