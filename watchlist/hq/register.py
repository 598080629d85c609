"""HQ's register: the enrolled persons and their templates, and every version released to units.

One SQLite file at HQ. Releases remember a digest per person, so the next delta can be computed
against any released version without keeping old bundles.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.sqlite import open_database
from watchlist.format import canonical
from watchlist.format.bundle import Bundle, Person, Template, check_person_id
from watchlist.format.errors import RegisterError

# The layout is declared beside the queries that read it (the centre's console among them), so a
# migration here cannot leave them behind: see watchlist/format/register_read.py.
from watchlist.format.register_read import SCHEMA_VERSION
from watchlist.format.register_read import persons as read_persons

_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS persons (
    person_id TEXT PRIMARY KEY,
    name TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    threshold REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY,
    person_id TEXT NOT NULL REFERENCES persons(person_id),
    model_id TEXT NOT NULL,
    photo_sha256 TEXT NOT NULL,
    photo_date TEXT,
    age INTEGER,
    embedding BLOB NOT NULL,
    enrolled_at REAL NOT NULL,
    UNIQUE (person_id, model_id, photo_sha256)
);
CREATE INDEX IF NOT EXISTS templates_person ON templates(person_id);
CREATE TABLE IF NOT EXISTS releases (
    version INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    base_version INTEGER,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    model_id TEXT NOT NULL,
    persons INTEGER NOT NULL,
    templates INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    signing_key_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS release_persons (
    version INTEGER NOT NULL,
    person_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (version, person_id)
) WITHOUT ROWID;
"""
# Added after schema 1 shipped, so created on every open (registers made before it lack it).
_PUBLICATIONS = """
CREATE TABLE IF NOT EXISTS publications (
    version INTEGER NOT NULL REFERENCES releases(version),
    published_at REAL NOT NULL,
    target TEXT NOT NULL
);
"""


def person_digest(person: Person, rows: np.ndarray, offset: np.ndarray | None) -> str:
    """What identifies a person's record as shipped: its JSON, its float16 rows and their offset."""
    h = hashlib.sha256(canonical.dumps(person.to_json()))
    h.update(np.ascontiguousarray(rows, dtype="<f2").tobytes())
    if offset is not None:
        h.update(np.asarray(offset, dtype="<f4").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """The register's current list for one model, as a full bundle would carry it."""

    persons: tuple[Person, ...]
    embeddings: np.ndarray  # float16 (templates, D): the embeddings minus `offset`
    offset: np.ndarray | None  # float32 (D,)
    digests: dict[str, str]
    skipped: tuple[str, ...]  # persons with no template of this model


class Register:
    """HQ's enrolment database.

    Example::

        reg = Register("hq.db")
        reg.upsert_person("case-2024-0173", name="A. B.", priority=2)
        reg.add_template("case-2024-0173", emb, model_id=engine.model_id, photo_sha256=digest, age=6)
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.db = open_database(
            self.path,
            marker_table="releases",
            schema=_SCHEMA,
            schema_version=str(SCHEMA_VERSION),
            error=RegisterError,
            what="register",
            not_ours="not a watchlist register",
        )
        self.db.executescript(f"BEGIN;{_PUBLICATIONS}COMMIT;")

    def close(self) -> None:
        self.db.close()

    # ---- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str, default: object = None) -> object:
        """A remembered setting (e.g. the threshold per model)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: object) -> None:
        """Remember a setting (JSON value)."""
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, json.dumps(value)],
            )

    # ---- persons and templates ---------------------------------------------------------------

    def upsert_person(
        self, person_id: str, *, name: str | None = None, priority: int = 0, threshold: float | None = None
    ) -> None:
        """Add a person or update their name, priority and threshold override."""
        check_person_id(person_id)
        with self.db.atomic():
            self._upsert_person(person_id, name, priority, threshold)

    def _upsert_person(self, person_id: str, name: str | None, priority: int, threshold: float | None) -> None:
        self.db.execute(
            "INSERT INTO persons(person_id, name, priority, threshold, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(person_id) DO UPDATE SET name = excluded.name, priority = excluded.priority, "
            "threshold = excluded.threshold, updated_at = excluded.updated_at",
            [person_id, name, int(priority), threshold, time.time()],
        )

    def add_template(
        self,
        person_id: str,
        embedding: np.ndarray,
        *,
        model_id: str,
        photo_sha256: str,
        photo_date: str | None = None,
        age: int | None = None,
    ) -> bool:
        """Add one template; False when this photo is already enrolled for this person and model."""
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(emb)) or abs(float(np.linalg.norm(emb)) - 1.0) > 1e-2:
            raise RegisterError(f"person {person_id}: embedding must be finite and of unit length")
        with self.db.atomic():
            if self.db.execute("SELECT 1 FROM persons WHERE person_id = ?", [person_id]).fetchone() is None:
                raise RegisterError(f"person {person_id} is not registered: upsert_person first")
            cur = self.db.execute(
                "INSERT OR IGNORE INTO templates(person_id, model_id, photo_sha256, photo_date, age, embedding, "
                "enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [person_id, model_id, photo_sha256, photo_date, age, emb.astype("<f4").tobytes(), time.time()],
            )
            return cur.rowcount == 1

    def add_persons(self, persons: Sequence[Person], embeddings: np.ndarray, *, model_id: str) -> None:
        """Bulk load (imports, benchmarks): persons with their templates, rows of `embeddings` in order.
        Photo digests are derived from the embeddings."""
        emb = np.asarray(embeddings, dtype="<f4")
        now = time.time()
        rows = []
        pos = 0
        for p in persons:
            check_person_id(p.person_id)
            for t in p.templates:
                blob = emb[pos].tobytes()
                rows.append((p.person_id, model_id, hashlib.sha256(blob).hexdigest(), t.photo_date, t.age, blob, now))
                pos += 1
        if pos != emb.shape[0]:
            raise RegisterError(f"{pos} templates listed for {emb.shape[0]} embeddings")
        with self.db.atomic():
            self.db.conn.executemany(
                "INSERT INTO persons(person_id, name, priority, threshold, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(person_id) DO UPDATE SET name = excluded.name, priority = excluded.priority, "
                "threshold = excluded.threshold, updated_at = excluded.updated_at",
                [(p.person_id, p.name, p.priority, p.threshold, now) for p in persons],
            )
            self.db.conn.executemany(
                "INSERT OR IGNORE INTO templates(person_id, model_id, photo_sha256, photo_date, age, embedding, "
                "enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def unknown_persons(self, person_ids: Iterable[str]) -> list[str]:
        """The ids in `person_ids` that the register does not hold, in the order given."""
        ids = list(dict.fromkeys(person_ids))
        known = read_persons(self.db.conn, ids)
        return [i for i in ids if i not in known]

    def persons(self) -> list[dict]:
        """Every person with their priority, threshold, update time and templates (per model, with
        the photo date or age of each), sorted by id."""
        out = {
            pid: {
                "person_id": pid,
                "name": name,
                "priority": int(priority),
                "threshold": threshold,
                "updated_at": updated_at,
                "templates": [],
            }
            for pid, name, priority, threshold, updated_at in self.db.execute(
                "SELECT person_id, name, priority, threshold, updated_at FROM persons ORDER BY person_id"
            )
        }
        for pid, model_id, date, age, enrolled_at in self.db.execute(
            "SELECT person_id, model_id, photo_date, age, enrolled_at FROM templates ORDER BY id"
        ):
            out[pid]["templates"].append(
                {"model_id": model_id, "photo_date": date, "age": age, "enrolled_at": enrolled_at}
            )
        return list(out.values())

    def remove_persons(self, person_ids: Iterable[str]) -> int:
        """Delete persons (found, or withdrawn) and all their templates; returns how many existed."""
        ids = list(person_ids)
        removed = 0
        with self.db.atomic():
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                self.db.execute(f"DELETE FROM templates WHERE person_id IN ({marks})", chunk)
                removed += self.db.execute(f"DELETE FROM persons WHERE person_id IN ({marks})", chunk).rowcount
        return removed

    def counts(self) -> tuple[int, int]:
        """(persons, templates) in the register."""
        p = self.db.execute("SELECT count(*) FROM persons").fetchone()[0]
        t = self.db.execute("SELECT count(*) FROM templates").fetchone()[0]
        return int(p), int(t)

    def model_ids(self) -> list[str]:
        """The embedding models templates were enrolled with."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT model_id FROM templates ORDER BY model_id").fetchall()]

    def offset(self, model_id: str) -> np.ndarray | None:
        """The float32 offset bundles of `model_id` carry embeddings around (None until the first build)."""
        value = self.get_meta(f"offset:{model_id}")
        return None if value is None else np.array(value, dtype=np.float32)

    def snapshot(self, model_id: str, *, with_names: bool = False, offset: np.ndarray | None = None) -> Snapshot:
        """The current list for `model_id`: persons sorted by id, templates in enrolment order.

        Embeddings are taken relative to `offset` (default: the model's remembered offset, or the
        mean of the current templates when there is none yet).
        """
        meta = {
            r[0]: r[1:]
            for r in self.db.execute(
                "SELECT person_id, name, priority, threshold FROM persons ORDER BY person_id"
            ).fetchall()
        }
        cur = self.db.execute(
            "SELECT person_id, photo_date, age, embedding FROM templates WHERE model_id = ? ORDER BY person_id, id",
            [model_id],
        )
        by_person: dict[str, list[tuple]] = {}
        for pid, date, age, blob in cur:
            by_person.setdefault(pid, []).append((date, age, blob))
        persons: list[Person] = []
        blocks: list[np.ndarray] = []
        for pid in sorted(by_person):
            name, priority, threshold = meta[pid]
            rows = by_person[pid]
            persons.append(
                Person(
                    person_id=pid,
                    templates=tuple(Template(photo_date=d, age=a) for d, a, _ in rows),
                    name=name if with_names else None,
                    priority=int(priority),
                    threshold=None if threshold is None else float(threshold),
                )
            )
            blocks.append(np.frombuffer(b"".join(b for _, _, b in rows), dtype="<f4").reshape(len(rows), -1))
        if blocks:
            dim = blocks[0].shape[1]
        else:
            stored = self.get_meta(f"dim:{model_id}")  # each release records its model's dimension
            dim = stored if isinstance(stored, int) else 0
        absolute = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
        if offset is None:
            offset = self.offset(model_id)
        if offset is None and len(absolute):
            offset = absolute.mean(axis=0, dtype=np.float64).astype(np.float32)
        rel = (absolute - offset if offset is not None else absolute).astype(np.float16)
        digests: dict[str, str] = {}
        pos = 0
        for person in persons:
            n = len(person.templates)
            digests[person.person_id] = person_digest(person, rel[pos : pos + n], offset)
            pos += n
        skipped = tuple(sorted(set(meta) - set(by_person)))
        return Snapshot(tuple(persons), rel, offset, digests, skipped)

    # ---- releases -----------------------------------------------------------------------------

    def releases(self) -> list[dict]:
        """Every released version, oldest first."""
        cols = (
            "version",
            "kind",
            "base_version",
            "created_at",
            "expires_at",
            "model_id",
            "persons",
            "templates",
            "bytes",
            "sha256",
            "signing_key_id",
        )
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM releases ORDER BY version").fetchall()
        published: dict[int, tuple[float, str]] = {}
        for version, at, target in self.db.execute(
            "SELECT version, published_at, target FROM publications ORDER BY published_at"
        ):
            published.setdefault(version, (at, target))
        return [
            dict(zip(cols, r))
            | {
                "published_at": published.get(r[0], (None, None))[0],
                "published_to": published.get(r[0], (None, None))[1],
            }
            for r in rows
        ]

    def latest_published_version(self) -> int | None:
        """The highest version ever published (None: nothing published yet)."""
        row = self.db.execute("SELECT max(version) FROM publications").fetchone()
        return None if row[0] is None else int(row[0])

    def mark_published(self, sha256: str, target: str, at: float | None = None) -> int:
        """Record that the release with bundle digest `sha256` went out to `target` (a topic or a
        file); returns its version. Deltas are built against published versions only."""
        version = self.release_with_sha256(sha256)
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO publications(version, published_at, target) VALUES (?, ?, ?)",
                [version, time.time() if at is None else float(at), target],
            )
        return version

    def release_with_sha256(self, sha256: str) -> int:
        """The version of the release whose bundle has digest `sha256`; RegisterError if none."""
        row = self.db.execute("SELECT version FROM releases WHERE sha256 = ?", [sha256]).fetchone()
        if row is None:
            raise RegisterError(
                f"this bundle (sha256 {sha256[:16]}...) is not a release of register {self.path}: "
                "publish bundles built from this register (`watchlist releases` lists them)"
            )
        return int(row[0])

    def latest_version(self) -> int:
        """The highest released version (0: none yet)."""
        row = self.db.execute("SELECT max(version) FROM releases").fetchone()
        return int(row[0] or 0)

    def release(self, version: int) -> dict | None:
        """One released version's record, or None."""
        return next((r for r in self.releases() if r["version"] == version), None)

    def release_digests(self, version: int) -> dict[str, str]:
        """Person id -> digest of their record as that version left it on the units."""
        return dict(
            self.db.execute("SELECT person_id, digest FROM release_persons WHERE version = ?", [version]).fetchall()
        )

    def record_release(
        self, bundle: Bundle, digests: dict[str, str], *, size: int, sha256: str, signing_key_id: str
    ) -> None:
        """Remember a released version and the digest of every person it leaves on the units."""
        with self.db.atomic():
            if self.db.execute("SELECT 1 FROM releases WHERE version = ?", [bundle.version]).fetchone():
                raise RegisterError(f"version {bundle.version} was already released; build again for a new version")
            self.db.execute(
                "INSERT INTO releases(version, kind, base_version, created_at, expires_at, model_id, persons, "
                "templates, bytes, sha256, signing_key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    bundle.version,
                    bundle.kind,
                    bundle.base_version,
                    bundle.created_at,
                    bundle.expires_at,
                    bundle.model_id,
                    len(digests),
                    bundle.n_templates,
                    size,
                    sha256,
                    signing_key_id,
                ],
            )
            self.db.conn.executemany(
                "INSERT INTO release_persons(version, person_id, digest) VALUES (?, ?, ?)",
                [(bundle.version, pid, d) for pid, d in digests.items()],
            )
