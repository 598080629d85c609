"""Read-only access to HQ's register, so operators see who a hit is said to be.

Names, priorities and enrolment photos stay at the centre: units carry only case ids and
templates. The console opens the register SQLite file read-only (`persons`: name, priority;
`templates`: photo date and age per enrolled photo) and, where given, HQ's enrolment folder
laid out as `<folder>/<person_id>/<photo>` (the layout `watchlist enrol` reads).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PHOTO_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class RegisterViewError(RuntimeError):
    """The register file cannot be read."""


@dataclass(frozen=True)
class PersonInfo:
    """What the centre knows of a person: name and priority (0-9), enrolled photos' dates/ages,
    and the photo files found for them."""

    person_id: str
    name: str | None
    priority: int
    templates: list[dict] = field(default_factory=list)
    photos: list[Path] = field(default_factory=list)


class RegisterView:
    """Looks up persons in HQ's register (read-only) and their photos in the enrolment folder."""

    def __init__(self, register: Path | None, photos: Path | None = None) -> None:
        self.register = register
        self.photos = photos
        if register is not None and not Path(register).is_file():
            raise RegisterViewError(f"no register at {register} (give HQ's register.sqlite, read access is enough)")
        if photos is not None and not Path(photos).is_dir():
            raise RegisterViewError(f"no photo folder at {photos} (HQ's enrolment folder <folder>/<person_id>/...)")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{Path(self.register).resolve()}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        return conn

    def person(self, person_id: str) -> PersonInfo | None:
        """The person with this id, or None where the register does not hold them (or is not given)."""
        if self.register is None:
            return None
        try:
            conn = self._connect()
            try:
                row = conn.execute(
                    "SELECT person_id, name, priority FROM persons WHERE person_id = ?", (person_id,)
                ).fetchone()
                if row is None:
                    return None
                templates = [
                    dict(r)
                    for r in conn.execute(
                        "SELECT photo_date, age, model_id FROM templates WHERE person_id = ? ORDER BY photo_date, age",
                        (person_id,),
                    )
                ]
            finally:
                conn.close()
        except sqlite3.Error as e:
            raise RegisterViewError(f"cannot read the register {self.register}: {e}") from None
        return PersonInfo(row["person_id"], row["name"], int(row["priority"] or 0), templates, self._photos(person_id))

    def people(self, person_ids: set[str]) -> dict[str, PersonInfo]:
        """Names and priorities of several persons (without photos), for the hit list."""
        if self.register is None or not person_ids:
            return {}
        ids = sorted(person_ids)
        out: dict[str, PersonInfo] = {}
        try:
            conn = self._connect()
            try:
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    for r in conn.execute(
                        f"SELECT person_id, name, priority FROM persons WHERE person_id IN ({marks})", chunk
                    ):
                        out[r["person_id"]] = PersonInfo(r["person_id"], r["name"], int(r["priority"] or 0))
            finally:
                conn.close()
        except sqlite3.Error as e:
            log.warning("cannot read the register %s: %s", self.register, e)
        return out

    def case_closed(self, person_id: str, published: int | None = None) -> str | None:
        """Why the case is closed, or None: HQ listed the person in a release and the list the units
        now get (`published`, the version the centre last saw HQ publish for the site, else the
        register's newest release) no longer holds them, so HQ removed them (found, or withdrawn).
        A person never released is not a closed case but an unknown one, and a register without
        releases (or none given) closes nothing."""
        if self.register is None:
            return None
        try:
            conn = self._connect()
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not {"releases", "release_persons"} <= tables:
                    return None
                known = {int(r[0]) for r in conn.execute("SELECT version FROM releases")}
                latest = published if published in known else max(known, default=None)
                if latest is None:
                    return None
                listed = conn.execute(
                    "SELECT MAX(version) FROM release_persons WHERE person_id = ? AND version <= ?", (person_id, latest)
                ).fetchone()[0]
                if listed is None or listed == latest:
                    return None
                removed_in = conn.execute(
                    "SELECT MIN(version) FROM releases WHERE version > ? AND version <= ?", (listed, latest)
                ).fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error as e:
            log.warning("cannot read the register %s: %s", self.register, e)
            return None
        return f"HQ removed this person from the watchlist in version {removed_in}"

    def _photos(self, person_id: str) -> list[Path]:
        if self.photos is None:
            return []
        # Person ids come from units and may hold anything: the folder is found by comparing names,
        # never by joining the id into a path.
        for entry in Path(self.photos).iterdir():
            if entry.is_dir() and entry.name == person_id:
                return sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_TYPES)
        return []
