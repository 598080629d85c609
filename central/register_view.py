"""Read-only access to HQ's register, so operators see who a hit is said to be.

Names, priorities and enrolment photos stay at the centre: units carry only case ids and
templates. The console reads the register SQLite file read-only through
`watchlist.format.register_read` (the queries HQ's own code reads it with, tested against a
register HQ's writer made) and, where given, HQ's enrolment folder laid out as
`<folder>/<person_id>/<photo>` (the layout `watchlist enrol` reads).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import watchlist.format.register_read as register_read
from watchlist.format.register_read import RegisterReadError, TemplateRecord

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
    templates: list[TemplateRecord] = field(default_factory=list)
    photos: list[Path] = field(default_factory=list)


class RegisterView:
    """Looks up persons in HQ's register (read-only) and their photos in the enrolment folder."""

    def __init__(self, register: Path | None, photos: Path | None = None) -> None:
        self.register = register
        self.photos = photos
        if register is not None:
            # Opened once here so that a missing file or a register of another layout stops the
            # console at start, with the reason, rather than on every hit page.
            try:
                register_read.open_read_only(register).close()
            except RegisterReadError as e:
                raise RegisterViewError(f"{e} (give HQ's register.sqlite, read access is enough)") from None
        if photos is not None and not Path(photos).is_dir():
            raise RegisterViewError(f"no photo folder at {photos} (HQ's enrolment folder <folder>/<person_id>/...)")

    def person(self, person_id: str) -> PersonInfo | None:
        """The person with this id, or None where the register does not hold them (or is not given)."""
        if self.register is None:
            return None
        try:
            conn = register_read.open_read_only(self.register)
            try:
                record = register_read.persons(conn, [person_id]).get(person_id)
                if record is None:
                    return None
                templates = register_read.templates(conn, person_id)
            finally:
                conn.close()
        except (sqlite3.Error, RegisterReadError) as e:
            raise RegisterViewError(f"cannot read the register {self.register}: {e}") from None
        return PersonInfo(record.person_id, record.name, record.priority, templates, self._photos(person_id))

    def people(self, person_ids: set[str]) -> dict[str, PersonInfo]:
        """Names and priorities of several persons (without photos), for the hit list."""
        if self.register is None or not person_ids:
            return {}
        try:
            conn = register_read.open_read_only(self.register)
            try:
                records = register_read.persons(conn, person_ids)
            finally:
                conn.close()
        except (sqlite3.Error, RegisterReadError) as e:
            log.warning("cannot read the register %s: %s", self.register, e)
            return {}
        return {pid: PersonInfo(r.person_id, r.name, r.priority) for pid, r in records.items()}

    def case_closed(self, person_id: str, published: int | None = None) -> str | None:
        """Why the case is closed, or None: HQ listed the person in a release and the list the units
        now get (`published`, the version the centre last saw HQ publish for the site, else the
        register's newest release) no longer holds them, so HQ removed them (found, or withdrawn)."""
        removal = self.removal(person_id, published)
        if removal is None:
            return None
        version, at = removal
        on = "" if at is None else f" on {time.strftime('%Y-%m-%d', time.gmtime(at))} (UTC)"
        return f"HQ removed this person from the watchlist in version {version}{on}"

    def removal(self, person_id: str, published: int | None = None) -> tuple[int, int | None] | None:
        """The release that took the person off the list the units now get (see `case_closed`) and
        when HQ built it (None where the register lacks the date), or None: still listed, never
        listed, no register, or one that cannot be read (logged)."""
        if self.register is None:
            return None
        try:
            conn = register_read.open_read_only(self.register)
            try:
                version = register_read.removed_in(conn, person_id, published)
                return None if version is None else (version, register_read.released_at(conn, version))
            finally:
                conn.close()
        except (sqlite3.Error, RegisterReadError) as e:
            log.warning("cannot read the register %s: %s", self.register, e)
            return None

    def _photos(self, person_id: str) -> list[Path]:
        if self.photos is None:
            return []
        # Person ids come from units and may hold anything: the folder is found by comparing names,
        # never by joining the id into a path.
        for entry in Path(self.photos).iterdir():
            if entry.is_dir() and entry.name == person_id:
                return sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_TYPES)
        return []
