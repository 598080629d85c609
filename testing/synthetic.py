"""Synthetic watchlists for tests and benchmarks: clustered face-like embeddings and an in-memory HQ.

The embeddings are not faces; they mimic what matters to matching and transport: unit length,
several templates per person scattered around the person's direction, with an anisotropic spread
(a few directions vary more, as in real embedders). Two shapes:

* `ENGINE_LIKE` (benchmarks): every face leans on one shared direction, as with the project's
  default engine (dlib's model with its norm anchor), where two strangers score about 0.97 and
  two photos of one person about 0.985;
* the default (tests): persons spread over the whole sphere, strangers near 0, one person's
  photos near 0.7, so thresholds like 0.5 read naturally.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from watchlist.format.bundle import Bundle, Person, Template, encode_bundle
from watchlist.format.keys import generate_key, key_id, make_keyset, save_public_key
from wire.records import CANARY_PERSON_ID


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _spectrum(dim: int) -> np.ndarray:
    # Per-dimension scale falling off like a real embedder's principal components.
    return (1.0 / np.sqrt(1.0 + np.arange(dim) / 16.0)).astype(np.float32)


ENGINE_LIKE = {"shared": 0.992, "spread": 0.124}  # person_centers(shared=...), samples_of(spread=...)


def _shared_direction(dim: int) -> np.ndarray:
    return unit_rows(np.random.default_rng(20240917).standard_normal((1, dim)))[0]


def person_centers(n: int, dim: int = 128, seed: int = 0, shared: float = 0.0) -> np.ndarray:
    """`n` unit person directions; `shared` (0..1) is the weight of a direction all faces share."""
    rng = np.random.default_rng(seed)
    own = unit_rows(rng.standard_normal((n, dim), dtype=np.float32) * _spectrum(dim))
    if not shared:
        return own
    return unit_rows(shared * _shared_direction(dim) + np.sqrt(1.0 - shared**2) * own)


def samples_of(centers: np.ndarray, per_center: int, spread: float = 0.55, seed: int = 1) -> np.ndarray:
    """`per_center` noisy unit vectors around each center, rows grouped by center.

    spread 0.55 puts two photos of one person at a cosine of about 0.6-0.8 and persons at about 0.
    """
    rng = np.random.default_rng(seed)
    n, dim = centers.shape
    out = np.empty((n * per_center, dim), np.float32)
    step = 65536
    for s in range(0, n * per_center, step):
        idx = np.arange(s, min(s + step, n * per_center)) // per_center
        shape = _spectrum(dim) * (spread / np.linalg.norm(_spectrum(dim)))  # E|noise| = spread
        out[s : s + len(idx)] = unit_rows(centers[idx] + rng.standard_normal((len(idx), dim), dtype=np.float32) * shape)
    return out


def make_persons(ids: list[str], per_person: int) -> tuple[Person, ...]:
    ages = (4, 9, 14, 20)
    return tuple(Person(pid, tuple(Template(age=ages[j % len(ages)]) for j in range(per_person))) for pid in ids)


def with_canary(persons: tuple[Person, ...], embeddings: np.ndarray) -> tuple[tuple[Person, ...], np.ndarray]:
    """`persons` and their `embeddings` with the canary person (wire.records.CANARY_PERSON_ID) added last,
    one template in a direction of its own: a list that a unit with its canary on accepts (without it,
    `no_canary`). The template is no face's, so that unit's canary runs fail at matching, saying so."""
    dim = embeddings.shape[1]
    template = unit_rows(np.random.default_rng(20250119).standard_normal((1, dim), dtype=np.float32))
    return (*persons, Person(CANARY_PERSON_ID, (Template(),))), np.vstack([embeddings, template])


@dataclass
class Authority:
    """An in-memory HQ: root key, signing key, key set; builds signed bundles."""

    model_id: str = "synthetic:v1"
    dim: int = 128
    threshold: float = 0.5
    root: Ed25519PrivateKey = field(default_factory=generate_key)
    signing: Ed25519PrivateKey = field(default_factory=generate_key)
    serial: int = 1
    revoked: set[str] = field(default_factory=set)
    keyset: bytes = b""

    def __post_init__(self) -> None:
        if not self.keyset:
            self.keyset = make_keyset(self.root, self.serial, [self.signing.public_key()], self.revoked)

    def write_root(self, path: Path) -> Path:
        save_public_key(self.root.public_key(), path)
        return path

    def rotate(self, revoke_old: bool = True) -> Ed25519PrivateKey:
        """A new signing key and key set; the old key revoked unless `revoke_old` is False."""
        old = self.signing
        self.signing = generate_key()
        self.serial += 1
        keep = [self.signing.public_key()] + ([] if revoke_old else [old.public_key()])
        if revoke_old:
            self.revoked.add(key_id(old.public_key()))
        self.keyset = make_keyset(self.root, self.serial, keep, self.revoked)
        return old

    def bundle(
        self,
        version: int,
        persons: tuple[Person, ...],
        embeddings: np.ndarray,
        *,
        kind: Literal["full", "delta"] = "full",
        base: int | None = None,
        removed: tuple[str, ...] = (),
        model_id: str | None = None,
        created_at: int | None = None,
        valid_for_s: int = 7 * 86400,
        signing: Ed25519PrivateKey | None = None,
        keyset: bytes | None = None,
        offset: np.ndarray | None = None,
        canary: bool = False,
    ) -> bytes:
        """A signed bundle of `persons` with `embeddings` (absolute values; stored around `offset`);
        `canary`: with the canary person too (`with_canary`), as HQ's lists carry it for units."""
        if canary:
            persons, embeddings = with_canary(persons, embeddings)
        created = int(time.time()) if created_at is None else created_at
        b = Bundle(
            kind=kind,
            version=version,
            created_at=created,
            expires_at=created + valid_for_s,
            model_id=model_id or self.model_id,
            embedding_dim=embeddings.shape[1] if embeddings.ndim == 2 else self.dim,
            default_threshold=self.threshold,
            persons=persons,
            embeddings=embeddings if offset is None else embeddings - offset,
            base_version=base,
            removed=removed,
            embedding_offset=offset,
        )
        return encode_bundle(b, signing or self.signing, keyset if keyset is not None else self.keyset)


def register_release(register: Path, data: bytes) -> Path:
    """Record a bundle made by an `Authority` as a release of the HQ register at `register`, so that
    `watchlist publish --register` takes it, as it takes the register's own builds."""
    from watchlist.format.bundle import frame, parse_verified, sha256_hex
    from watchlist.hq.register import Register

    framed = frame(data)
    reg = Register(register)
    reg.record_release(
        parse_verified(framed), {}, size=len(data), sha256=sha256_hex(data), signing_key_id=framed.key_id
    )
    return register
