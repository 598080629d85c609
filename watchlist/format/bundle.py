"""The watchlist bundle: what it holds, its byte layout, and signing it.

Layout (all integers little-endian; docs/watchlist.md is the reference)::

    magic        8 bytes  b"CPWLBUN1"
    keyset_len   u32      } the key set in force when the bundle was built (watchlist.format.keys),
    keyset       bytes    } so a unit can check the signing key without another message
    header_len   u32
    header       canonical JSON (watchlist.format.canonical), see `Bundle.header`
    blob_len     u64
    blob         the embeddings minus `embedding_offset` (header): float16 little-endian, row-major
                 (templates x embedding_dim), rows in the order the header lists persons and,
                 within a person, templates
    key_id       16 bytes  id of the signing key (watchlist.format.keys.key_id)
    signature    64 bytes  Ed25519(signing key, BUNDLE_DOMAIN || SHA-256(every byte before the signature))

Embeddings travel as float16 around an offset (HQ's mean embedding for the model, float32 in the
header): half the bytes of float32, and, since real embeddings share a large common part that
float16 would round coarsely, a cosine score moves by about 1e-6 (1e-4 without the offset).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from watchlist.format import canonical
from watchlist.format.errors import BundleRejected
from watchlist.format.keys import MAX_KEYSET_BYTES, SIGNATURE_BYTES, key_id, signed_message
from wire.records import CANARY_PERSON_ID, id_problem

BUNDLE_MAGIC = b"CPWLBUN1"
BUNDLE_DOMAIN = b"checkpoint-watchlist-bundle-v1\x00"
FORMAT = 1
EMBEDDING_DTYPE = "float16"
KEY_ID_BYTES = 16
MAX_PERSON_ID_BYTES = 64
MAX_NAME_CHARS = 200
# Bounds a unit checks in a signed header (HQ's tools never come near them): every integer fits
# SQLite and JSON doubles, a dimension and a template count cannot size a huge allocation.
MAX_VERSION = 2**53 - 1
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z
MAX_EMBEDDING_DIM = 4096
MAX_TEMPLATES = 50_000_000
UNIT_NORM_TOLERANCE = 0.01  # float16 storage moves a unit row's length by about 1e-3
_NORM_BLOCK = 65536
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class BundleFormatError(ValueError):
    """A bundle being built breaks a rule of the format (HQ side; the message names the field)."""


@dataclass(frozen=True)
class Template:
    """What is known about one enrolled photo besides its embedding."""

    photo_date: str | None = None  # YYYY-MM-DD
    age: int | None = None  # the person's age in the photo, years

    def to_json(self) -> dict[str, Any]:
        return {"photo_date": self.photo_date, "age": self.age}


@dataclass(frozen=True)
class Person:
    """One watchlist person: an opaque case number, optional display name, priority, threshold."""

    person_id: str
    templates: tuple[Template, ...]
    name: str | None = None
    priority: int = 0
    threshold: float | None = None  # overrides the list's default threshold for this person

    @property
    def canary(self) -> bool:
        """The canary person (wire.records.CANARY_PERSON_ID): the units' end-to-end check, not a missing
        person. Flagged ``"canary": true`` in the header; a unit never shows its hits to operators."""
        return self.person_id == CANARY_PERSON_ID

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.person_id,
            "name": self.name,
            "priority": self.priority,
            "threshold": self.threshold,
            "templates": [t.to_json() for t in self.templates],
        }
        if self.canary:
            # Only on the canary: every other person's JSON, and so its digest, is as before the flag.
            out["canary"] = True
        return out


def check_person_id(pid: object, where: str = "person id") -> str:
    """Person ids are opaque case numbers: the wire's id rule (`wire.records.id_problem`: no control
    characters, C1 ones included, nor line separators, so every listed person can travel in a hit),
    no edge spaces, <= 64 UTF-8 bytes."""
    if id_problem(pid) is not None or not isinstance(pid, str) or pid != pid.strip():
        raise BundleFormatError(
            f"{where} {pid!r} must be non-empty text without control characters (C1 ones included), "
            "line separators or edge spaces"
        )
    if len(pid.encode()) > MAX_PERSON_ID_BYTES:
        raise BundleFormatError(f"{where} {pid!r} is longer than {MAX_PERSON_ID_BYTES} bytes")
    return pid


def _check_person(p: Person) -> None:
    check_person_id(p.person_id)
    if not p.templates:
        raise BundleFormatError(f"person {p.person_id}: has no templates (enrol at least one photo)")
    if p.name is not None and (not isinstance(p.name, str) or len(p.name) > MAX_NAME_CHARS):
        raise BundleFormatError(f"person {p.person_id}: name must be text of at most {MAX_NAME_CHARS} characters")
    if not isinstance(p.priority, int) or isinstance(p.priority, bool) or not 0 <= p.priority <= 9:
        raise BundleFormatError(f"person {p.person_id}: priority must be an integer 0..9, got {p.priority!r}")
    if p.threshold is not None and not (isinstance(p.threshold, float) and -1.0 < p.threshold < 1.0):
        raise BundleFormatError(f"person {p.person_id}: threshold must be a float in (-1, 1), got {p.threshold!r}")
    for i, t in enumerate(p.templates):
        if t.photo_date is not None:
            if not isinstance(t.photo_date, str) or not _DATE_RE.match(t.photo_date):
                raise BundleFormatError(f"person {p.person_id} template {i}: photo_date must be YYYY-MM-DD")
            try:
                dt.date.fromisoformat(t.photo_date)
            except ValueError:
                raise BundleFormatError(f"person {p.person_id} template {i}: {t.photo_date} is not a date") from None
        if t.age is not None and (not isinstance(t.age, int) or isinstance(t.age, bool) or not 0 <= t.age <= 130):
            raise BundleFormatError(f"person {p.person_id} template {i}: age must be an integer 0..130")


@dataclass(frozen=True)
class Bundle:
    """A full watchlist (kind "full") or the changes from `base_version` (kind "delta").

    In a delta, `persons` are added or replaced whole (all their templates), `removed` are
    deleted. `embeddings` holds every template of `persons`, in order, as float16 differences
    from `embedding_offset` (None: zeros).
    """

    kind: Literal["full", "delta"]
    version: int
    created_at: int
    expires_at: int
    model_id: str
    embedding_dim: int
    default_threshold: float
    persons: tuple[Person, ...]
    embeddings: np.ndarray
    base_version: int | None = None
    removed: tuple[str, ...] = ()
    embedding_offset: np.ndarray | None = field(default=None, compare=False)
    _offsets: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("full", "delta"):
            raise BundleFormatError(f"kind must be 'full' or 'delta', got {self.kind!r}")
        if not isinstance(self.version, int) or not 1 <= self.version <= MAX_VERSION:
            raise BundleFormatError(f"version must be an integer in [1, {MAX_VERSION}], got {self.version!r}")
        if not isinstance(self.embedding_dim, int) or not 1 <= self.embedding_dim <= MAX_EMBEDDING_DIM:
            raise BundleFormatError(f"embedding_dim must be in [1, {MAX_EMBEDDING_DIM}], got {self.embedding_dim!r}")
        if self.kind == "delta":
            if not isinstance(self.base_version, int) or not 0 <= self.base_version < self.version:
                raise BundleFormatError(f"a delta needs base_version in [0, version), got {self.base_version!r}")
        elif self.base_version is not None or self.removed:
            raise BundleFormatError("a full bundle has no base_version and no removed list")
        if (
            not isinstance(self.created_at, int)
            or not isinstance(self.expires_at, int)
            or self.expires_at <= self.created_at
            or not 0 <= self.created_at < self.expires_at <= MAX_EPOCH
        ):
            raise BundleFormatError(
                "created_at and expires_at must be integer epoch seconds up to 9999-12-31, expires_at later"
            )
        if not isinstance(self.model_id, str) or not self.model_id:
            raise BundleFormatError("model_id must name the embedding model")
        if not isinstance(self.default_threshold, float) or not -1.0 < self.default_threshold < 1.0:
            raise BundleFormatError(f"default_threshold must be a float in (-1, 1), got {self.default_threshold!r}")
        seen: set[str] = set()
        for p in self.persons:
            _check_person(p)
            if p.person_id in seen:
                raise BundleFormatError(f"person {p.person_id} appears twice")
            seen.add(p.person_id)
        for r in self.removed:
            check_person_id(r, "removed id")
            if r in seen:
                raise BundleFormatError(f"person {r} is both removed and added")
        if len(set(self.removed)) != len(self.removed):
            raise BundleFormatError("a person is removed twice")
        emb = self.embeddings
        counts = np.array([len(p.templates) for p in self.persons], dtype=np.int64)
        if not isinstance(emb, np.ndarray) or emb.ndim != 2 or emb.shape != (int(counts.sum()), self.embedding_dim):
            raise BundleFormatError(
                f"embeddings must have shape ({int(counts.sum())}, {self.embedding_dim}) "
                f"(one row per template), got {getattr(emb, 'shape', None)}"
            )
        if emb.dtype != np.float16:
            object.__setattr__(self, "embeddings", emb.astype(np.float16))
        if self.embedding_offset is not None:
            off = np.asarray(self.embedding_offset, dtype=np.float32)
            if off.shape != (self.embedding_dim,) or not np.all(np.isfinite(off)):
                raise BundleFormatError(f"embedding_offset must be {self.embedding_dim} finite values")
            object.__setattr__(self, "embedding_offset", off)
        object.__setattr__(self, "_offsets", np.concatenate([[0], np.cumsum(counts)]))

    @property
    def n_templates(self) -> int:
        return int(self.embeddings.shape[0])

    def rows_of(self, i: int) -> np.ndarray:
        """The stored rows of `persons[i]` (float16, before the offset is added)."""
        return self.embeddings[self._offsets[i] : self._offsets[i + 1]]

    @property
    def has_canary(self) -> bool:
        """Whether the canary person is among `persons`."""
        return any(p.canary for p in self.persons)

    def template_person_ids(self) -> list[str]:
        """The person id of each embedding row."""
        return [p.person_id for p in self.persons for _ in p.templates]

    def header(self) -> dict[str, Any]:
        """The header as signed (before canonical encoding)."""
        return {
            "format": FORMAT,
            "kind": self.kind,
            "version": self.version,
            "base_version": self.base_version,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "model_id": self.model_id,
            "embedding_dim": self.embedding_dim,
            "embedding_dtype": EMBEDDING_DTYPE,
            "embedding_offset": None if self.embedding_offset is None else [float(v) for v in self.embedding_offset],
            "default_threshold": self.default_threshold,
            "templates": self.n_templates,
            "persons": [p.to_json() for p in self.persons],
            "removed": list(self.removed),
        }


def encode_bundle(bundle: Bundle, signing_key: Ed25519PrivateKey, keyset: bytes) -> bytes:
    """The signed bytes of `bundle`, carrying `keyset` (the envelope the signing key is listed in)."""
    if len(keyset) > MAX_KEYSET_BYTES:
        raise BundleFormatError(f"key set of {len(keyset)} bytes is larger than {MAX_KEYSET_BYTES}")
    header = canonical.dumps(bundle.header())
    blob = np.ascontiguousarray(bundle.embeddings, dtype="<f2").tobytes()
    kid = bytes.fromhex(key_id(signing_key.public_key()))
    body = b"".join(
        [
            BUNDLE_MAGIC,
            _U32.pack(len(keyset)),
            keyset,
            _U32.pack(len(header)),
            header,
            _U64.pack(len(blob)),
            blob,
            kid,
        ]
    )
    return body + signing_key.sign(signed_message(BUNDLE_DOMAIN, body))


@dataclass(frozen=True)
class Framed:
    """A bundle's sections located by their lengths; nothing in them is trusted yet."""

    keyset: memoryview
    header: memoryview
    blob: memoryview
    key_id: str
    signed_region: memoryview
    signature: bytes


def frame(data: bytes | memoryview) -> Framed:
    """Locate the sections of a bundle from its length fields only (no JSON is parsed).

    Raises BundleRejected: not_a_bundle (magic), truncated (lengths disagree with the size).
    """
    mv = memoryview(data)
    size = len(mv)
    if bytes(mv[:8]) != BUNDLE_MAGIC:
        raise BundleRejected("not_a_bundle", "does not start with CPWLBUN1: not a watchlist bundle")
    pos = 8

    def need(n: int, what: str) -> None:
        if pos + n > size:
            raise BundleRejected("truncated", f"ends inside the {what} ({size} bytes received)")

    need(4, "key set length")
    (klen,) = _U32.unpack_from(mv, pos)
    pos += 4
    if klen > MAX_KEYSET_BYTES:
        raise BundleRejected("truncated", f"key set length {klen} is beyond the format's limit: corrupt bundle")
    need(klen, "key set")
    keyset = mv[pos : pos + klen]
    pos += klen
    need(4, "header length")
    (hlen,) = _U32.unpack_from(mv, pos)
    pos += 4
    need(hlen, "header")
    header = mv[pos : pos + hlen]
    pos += hlen
    need(8, "embedding length")
    (blen,) = _U64.unpack_from(mv, pos)
    pos += 8
    need(blen, "embeddings")
    blob = mv[pos : pos + blen]
    pos += blen
    need(KEY_ID_BYTES + SIGNATURE_BYTES, "signature")
    kid = bytes(mv[pos : pos + KEY_ID_BYTES]).hex()
    pos += KEY_ID_BYTES
    if pos + SIGNATURE_BYTES != size:
        raise BundleRejected("truncated", f"{size - pos - SIGNATURE_BYTES} bytes after the signature: corrupt bundle")
    return Framed(keyset, header, blob, kid, mv[:pos], bytes(mv[pos:]))


def _person_from_json(d: dict[str, Any], cache: dict[tuple[Any, Any], Template]) -> Person:
    # Most templates share a (date, age) pair with others; one object each keeps a large list light.
    templates = []
    for t in d["templates"]:
        key = (t["photo_date"], t["age"])
        if not all(v is None or isinstance(v, (str, int)) for v in key):
            raise ValueError(f"person {_short(d.get('id'))}: photo_date and age must be text or integers")
        tpl = cache.get(key)
        if tpl is None:
            tpl = cache[key] = Template(photo_date=key[0], age=key[1])
        templates.append(tpl)
    # Format 1 readers before the flag ignore it; readers since refuse a flag that disagrees with the
    # reserved id, so a listed person can never be hidden from operators as a canary.
    if d.get("canary", False) is not (d["id"] == CANARY_PERSON_ID):
        raise ValueError(f"person {_short(d.get('id'))}: canary must be true exactly for {CANARY_PERSON_ID!r}")
    return Person(
        person_id=d["id"],
        templates=tuple(templates),
        name=d["name"],
        priority=d["priority"],
        threshold=_as_float(d["threshold"]),
    )


@overload
def _int_in(h: dict[str, Any], key: str, lo: int, hi: int, *, null: Literal[False] = False) -> int: ...
@overload
def _int_in(h: dict[str, Any], key: str, lo: int, hi: int, *, null: bool) -> int | None: ...
def _int_in(h: dict[str, Any], key: str, lo: int, hi: int, *, null: bool = False) -> int | None:
    v = h[key]
    if v is None and null:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{key} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise BundleRejected("out_of_range", f"{key} {_short(v)} is outside [{lo}, {hi}]: refused")
    return v


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_sizes(h: dict[str, Any]) -> tuple[int, int]:
    """The header's numbers that size or order anything, bounded before they are used."""
    _int_in(h, "version", 1, MAX_VERSION)
    _int_in(h, "base_version", 0, MAX_VERSION, null=True)
    _int_in(h, "created_at", 0, MAX_EPOCH)
    _int_in(h, "expires_at", 0, MAX_EPOCH)
    dim = _int_in(h, "embedding_dim", 1, MAX_EMBEDDING_DIM)
    n = _int_in(h, "templates", 0, MAX_TEMPLATES)
    persons, removed = h["persons"], h["removed"]
    if not isinstance(persons, list) or not isinstance(removed, list):
        raise ValueError("persons and removed must be lists")
    if len(persons) + len(removed) > MAX_TEMPLATES:
        raise BundleRejected("out_of_range", f"{len(persons)} persons and {len(removed)} removals: too many")
    for p in persons:
        if not isinstance(p, dict) or not isinstance(p.get("templates"), list):
            raise ValueError("each person must be an object with a templates list")
    listed = sum(len(p["templates"]) for p in persons)
    if listed != n:
        raise ValueError(f"persons list {listed} templates, the header says {n}")
    return dim, n


def _check_unit_norm(emb: np.ndarray, offset: np.ndarray | None) -> None:
    # Rows are float16 around the offset; blockwise so a large list never needs a float32 copy.
    for start in range(0, emb.shape[0], _NORM_BLOCK):
        block = emb[start : start + _NORM_BLOCK].astype(np.float32)
        if offset is not None:
            block += offset
        if not np.all(np.isfinite(block)):
            raise BundleRejected("bad_embedding", "an embedding contains NaN or infinity")
        norms = np.linalg.norm(block, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
        if bad.size:
            i = int(bad[0])
            raise BundleRejected(
                "bad_embedding",
                f"template {start + i} has length {float(norms[i]):.4g}, not 1 (+-{UNIT_NORM_TOLERANCE}): "
                "the unit compares unit-length embeddings only",
            )


def parse_verified(framed: Framed) -> Bundle:
    """Build the Bundle from sections whose signature has been checked.

    The signature only says who made the bytes; everything a mistaken or compromised HQ could
    put in them is still checked (defence in depth). Raises BundleRejected -- malformed (breaks
    the format), out_of_range (a number beyond the format's limits), bad_embedding (not unit
    length, not finite) -- and never any other exception.
    """
    try:
        h = canonical.loads(bytes(framed.header))
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise ValueError(f"format {h.get('format') if isinstance(h, dict) else None!r}, this unit reads {FORMAT}")
        if h["embedding_dtype"] != EMBEDDING_DTYPE:
            raise ValueError(f"embedding_dtype {_short(h['embedding_dtype'])}")
        dim, n = _check_sizes(h)
        if len(framed.blob) != n * dim * 2:
            raise ValueError(f"{len(framed.blob)} embedding bytes for {n} templates of {dim} float16")
        emb = np.frombuffer(framed.blob, dtype="<f2").reshape(n, dim)
        threshold = h["default_threshold"]
        offset = h["embedding_offset"]
        if offset is not None and (
            not isinstance(offset, list)
            or len(offset) != dim
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 2.0 for v in offset)
        ):
            # The offset is a mean of unit vectors: each value lies in [-1, 1].
            raise ValueError(f"embedding_offset must be null or a list of {dim} numbers in [-2, 2]")
        off = None if offset is None else np.array(offset, dtype=np.float32)
        _check_unit_norm(emb, off)
        cache: dict[tuple[Any, Any], Template] = {}
        return Bundle(
            kind=h["kind"],
            version=h["version"],
            base_version=h["base_version"],
            created_at=h["created_at"],
            expires_at=h["expires_at"],
            model_id=h["model_id"],
            embedding_dim=dim,
            default_threshold=_as_float(threshold),
            persons=tuple(_person_from_json(p, cache) for p in h["persons"]),
            embeddings=emb,
            removed=tuple(h["removed"]),
            embedding_offset=off,
        )
    except BundleRejected:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        # KeyError's text is the bare key: say it is a missing one.
        what = f"missing {exc}" if isinstance(exc, KeyError) else _short_text(exc)
        raise BundleRejected("malformed", f"bundle is signed but its header is malformed: {what}") from None


def _short_text(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


_T = TypeVar("_T")


def _as_float(v: _T) -> _T | float:
    # JSON has one number type; a threshold written as 1 or 0 is read as a float, anything else is left
    # for Bundle to refuse. A huge integer has no float: OverflowError, reported as malformed.
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def sha256_hex(data: bytes | memoryview) -> str:
    """SHA-256 of `data` in hex (bundle digests in logs, manifests and the store)."""
    return hashlib.sha256(data).hexdigest()


def peek(data: bytes | memoryview) -> dict[str, Any]:
    """The header of a bundle without verifying it -- for HQ's own tools (publishing, inspecting),
    never for a decision on a unit."""
    framed = frame(data)
    try:
        header = canonical.loads(bytes(framed.header))
    except ValueError as exc:
        raise BundleRejected("malformed", f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BundleRejected("malformed", "header is not a JSON object")
    return header
