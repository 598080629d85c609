"""Reading HQ's register, the SQLite file `watchlist.hq.register.Register` writes.

The centre's console shows who a hit is said to be from this file, and a centre installs none of
HQ's packages: so the queries both read it with live here, below the roles, on the standard
library alone, and a test writes a register with HQ's writer and reads it back through them. A
register migration then changes these queries (and `SCHEMA_VERSION`) in the same commit, or that
test fails, instead of the console breaking with every test green.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# The register layout HQ writes and these queries read (the `schema` row of its `meta` table).
SCHEMA_VERSION = 1
# SQLite's limit on bound parameters is 999 in older builds: ids are looked up in chunks below it.
_CHUNK = 500


class RegisterReadError(RuntimeError):
    """The register cannot be read: missing, not a register, or of a layout this code does not read."""


@dataclass(frozen=True)
class PersonRecord:
    """A person as the register holds them: the name (None where HQ keeps it elsewhere) and priority 0-9."""

    person_id: str
    name: str | None
    priority: int


@dataclass(frozen=True)
class TemplateRecord:
    """One enrolled photo of a person: the model it was embedded with, the photo's date or the age."""

    model_id: str
    photo_date: str | None
    age: int | None


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the register at `path`, after checking it is one of our layout.

    Read-only at the file level (`mode=ro`): the centre may be given read access to HQ's file and
    nothing more. The caller closes the connection.
    """
    if not Path(path).is_file():
        raise RegisterReadError(f"no register at {path}")
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as e:
        raise RegisterReadError(f"cannot open the register {path}: {e}") from None
    try:
        check_layout(conn)
    except sqlite3.Error as e:
        conn.close()
        raise RegisterReadError(f"cannot read the register {path}: {e}") from None
    except RegisterReadError as e:
        conn.close()
        raise RegisterReadError(f"{path}: {e}") from None
    return conn


def check_layout(conn: sqlite3.Connection) -> None:
    """Raise RegisterReadError unless `conn` holds a register of `SCHEMA_VERSION`."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"meta", "persons", "templates", "releases", "release_persons"} <= tables:
        raise RegisterReadError("an SQLite file but not a watchlist register")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    version = None if row is None else str(row[0])
    if version != str(SCHEMA_VERSION):
        raise RegisterReadError(
            f"register layout {version}, but this software reads layout {SCHEMA_VERSION}: "
            "install the same release of checkpoint as HQ"
        )


def persons(conn: sqlite3.Connection, person_ids: Iterable[str]) -> dict[str, PersonRecord]:
    """The persons among `person_ids` that the register holds, by id."""
    ids = sorted(set(person_ids))
    out: dict[str, PersonRecord] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for pid, name, priority in conn.execute(
            f"SELECT person_id, name, priority FROM persons WHERE person_id IN ({marks})", chunk
        ):
            out[pid] = PersonRecord(pid, name, int(priority or 0))
    return out


def templates(conn: sqlite3.Connection, person_id: str) -> list[TemplateRecord]:
    """The person's enrolled photos, oldest photo first."""
    return [
        TemplateRecord(model_id, photo_date, None if age is None else int(age))
        for photo_date, age, model_id in conn.execute(
            "SELECT photo_date, age, model_id FROM templates WHERE person_id = ? ORDER BY photo_date, age",
            (person_id,),
        )
    ]


def removed_in(conn: sqlite3.Connection, person_id: str, published: int | None = None) -> int | None:
    """The release that took the person off the list the units now get, or None if it did not.

    The units' list is `published` where the register holds that release, else its newest one. A
    person HQ listed in an earlier release and that list no longer holds was removed (found, or
    withdrawn); a person never released was not, nor is anyone while nothing is released.
    """
    known = {int(r[0]) for r in conn.execute("SELECT version FROM releases")}
    latest = published if published in known else max(known, default=None)
    if latest is None:
        return None
    listed = conn.execute(
        "SELECT MAX(version) FROM release_persons WHERE person_id = ? AND version <= ?", (person_id, latest)
    ).fetchone()[0]
    if listed is None or listed == latest:
        return None
    row = conn.execute("SELECT MIN(version) FROM releases WHERE version > ? AND version <= ?", (listed, latest))
    return int(row.fetchone()[0])


def released_at(conn: sqlite3.Connection, version: int) -> int | None:
    """When HQ built release `version` (its bundle's created_at, Unix seconds), or None if the
    register has no such release."""
    row = conn.execute("SELECT created_at FROM releases WHERE version = ?", (version,)).fetchone()
    return None if row is None else int(row[0])
