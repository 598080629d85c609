"""Opening the SQLite files of the watchlist (HQ's register, the unit's store) the same way."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils


def open_database(
    path: Path,
    *,
    marker_table: str,
    schema: str,
    schema_version: str,
    error: type[Exception],
    what: str,
    not_ours: str,
    threaded: bool = False,
    pragmas: tuple[str, ...] = (),
) -> sqlite_utils.Database:
    """Open (creating with `schema` where empty) a database that must hold `marker_table`.

    Deleted rows are overwritten on disk (secure_delete): a removed person's embeddings must not
    linger in free pages. Raises `error` with `not_ours` when the file is another SQLite database,
    or with SQLite's reason when it is not a database at all.
    """
    try:
        db = sqlite_utils.Database(sqlite3.connect(path, check_same_thread=not threaded))
        db.execute("PRAGMA secure_delete = ON")
        db.execute("PRAGMA foreign_keys = ON")
        for pragma in pragmas:
            db.execute(f"PRAGMA {pragma}")
        tables = set(db.table_names())
        if tables and marker_table not in tables:
            raise error(f"{path} is an SQLite file but {not_ours}")
        if not tables:
            # executescript commits whatever is open, so the schema gets its own BEGIN/COMMIT.
            db.executescript(
                f"BEGIN;{schema}INSERT INTO meta(key, value) VALUES ('schema', '{schema_version}');COMMIT;"
            )
    except sqlite3.DatabaseError as exc:
        raise error(f"cannot open {what} {path}: {exc}") from None
    return db
