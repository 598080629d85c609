"""Build a signed bundle from HQ's register: a full snapshot, or a delta against a released version."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.files import atomic_write
from watchlist.format.bundle import Bundle, encode_bundle, sha256_hex
from watchlist.format.errors import RegisterError
from watchlist.format.keys import KeySet, key_id
from watchlist.hq.register import Register

DEFAULT_VALID_FOR_S = 7 * 24 * 3600


def describe_changes(register: Register, bundle: Bundle, digests: dict[str, str]) -> dict:
    """What `bundle` changes on a unit holding the latest published release (a delta: its base):
    the ids it adds, changes and removes."""
    base = bundle.base_version if bundle.kind == "delta" else register.latest_published_version()
    old = register.release_digests(base) if base else {}
    return {
        "base_version": base,
        "added": sorted(set(digests) - set(old)),
        "changed": sorted(p for p in set(digests) & set(old) if digests[p] != old[p]),
        "removed": sorted(set(old) - set(digests)),
        "unchanged": sum(1 for p in set(digests) & set(old) if digests[p] == old[p]),
    }


@dataclass(frozen=True)
class Release:
    """A bundle built, signed, written and recorded in the register."""

    bundle: Bundle
    data: bytes
    sha256: str
    path: Path | None
    skipped: tuple[str, ...]  # persons left out: no template of the bundle's model


def plan_bundle(
    register: Register,
    *,
    model_id: str,
    default_threshold: float,
    kind: str = "full",
    base_version: int | None = None,
    valid_for_s: int = DEFAULT_VALID_FOR_S,
    now: float | None = None,
    with_names: bool = False,
) -> tuple[Bundle, dict[str, str], tuple[str, ...]]:
    """The next bundle from the register's current state, with the per-person digests it leaves on units.

    A delta (kind "delta") holds the persons added or changed since `base_version` (default: the
    latest *published* release, so that a build nobody published never becomes a base units lack)
    and the ids removed since.
    """
    created = int(time.time() if now is None else now)
    version = register.latest_version() + 1
    snap = register.snapshot(model_id, with_names=with_names)
    if not snap.persons and kind == "full" and not register.model_ids():
        raise RegisterError("the register holds no templates: enrol persons first (`watchlist enrol`)")
    dim = snap.embeddings.shape[1] if snap.persons else _dim_of(register, model_id)
    common = dict(
        version=version,
        created_at=created,
        expires_at=created + int(valid_for_s),
        model_id=model_id,
        embedding_dim=dim,
        default_threshold=float(default_threshold),
        embedding_offset=snap.offset,
    )
    if kind == "full":
        return (
            Bundle(kind="full", persons=snap.persons, embeddings=snap.embeddings, **common),
            snap.digests,
            snap.skipped,
        )
    if kind != "delta":
        raise RegisterError(f"kind must be 'full' or 'delta', got {kind!r}")
    if base_version is None:
        published = register.latest_published_version()
        if published is None:
            raise RegisterError(
                "no release was published yet, so no unit holds a base for a delta: publish a full bundle "
                "first (`watchlist publish`), or give --base"
            )
        base = published
    else:
        base = int(base_version)
    base_release = register.release(base)
    if base_release is None:
        raise RegisterError(
            f"version {base} was never released: give --base one of the released versions "
            f"({', '.join(str(r['version']) for r in register.releases()) or 'none yet: build a full bundle first'})"
        )
    if base_release["model_id"] != model_id:
        raise RegisterError(
            f"version {base} is of model {base_release['model_id']!r}, not {model_id!r}: build a full bundle"
        )
    old = register.release_digests(base)
    changed = [i for i, p in enumerate(snap.persons) if old.get(p.person_id) != snap.digests[p.person_id]]
    removed = tuple(sorted(set(old) - set(snap.digests)))
    persons = tuple(snap.persons[i] for i in changed)
    offsets = np.concatenate([[0], np.cumsum([len(p.templates) for p in snap.persons])])
    rows = [snap.embeddings[offsets[i] : offsets[i + 1]] for i in changed]
    emb = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
    bundle = Bundle(kind="delta", base_version=base, persons=persons, embeddings=emb, removed=removed, **common)
    return bundle, snap.digests, snap.skipped


def _dim_of(register: Register, model_id: str) -> int:
    row = register.db.execute(
        "SELECT length(embedding) FROM templates WHERE model_id = ? LIMIT 1", [model_id]
    ).fetchone()
    if row is None:
        dim = register.get_meta(f"dim:{model_id}")
        if dim is None:
            raise RegisterError(f"no template of model {model_id!r} was ever enrolled")
        return int(dim)
    return int(row[0]) // 4


def release(
    register: Register,
    bundle: Bundle,
    digests: dict[str, str],
    signing_key: Ed25519PrivateKey,
    keyset: KeySet,
    out: Path | None = None,
    skipped: tuple[str, ...] = (),
) -> Release:
    """Sign `bundle`, write it to `out` (atomically: a unit copying the folder never sees half a
    file), and record the release in the register."""
    kid = key_id(signing_key.public_key())
    if kid not in keyset.signing_keys:
        raise RegisterError(
            f"signing key {kid} is not in key set {keyset.serial}: rotate (`watchlist rotate`) "
            "or use the current signing key"
        )
    data = encode_bundle(bundle, signing_key, keyset.envelope)
    digest = sha256_hex(data)
    if out is not None:
        atomic_write(out, data)
    register.record_release(bundle, digests, size=len(data), sha256=digest, signing_key_id=kid)
    register.set_meta(f"dim:{bundle.model_id}", bundle.embedding_dim)
    if bundle.embedding_offset is not None and register.offset(bundle.model_id) is None:
        # Fixed from the first release on: a delta must encode rows the way the units' lists do.
        register.set_meta(f"offset:{bundle.model_id}", [float(v) for v in bundle.embedding_offset])
    return Release(bundle, data, digest, out, skipped)
