"""HQ's register as the centre reads it: written by `watchlist.hq.register.Register`, read back through
`watchlist.format.register_read` and the console's `RegisterView`. A register migration that the
reader does not follow fails here, not on the operators' hit pages."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from central.register_view import RegisterView, RegisterViewError
from watchlist.format import register_read
from watchlist.format.bundle import Bundle
from watchlist.format.register_read import PersonRecord, RegisterReadError, TemplateRecord
from watchlist.hq.register import Register

MODEL = "test-model"


def _release(reg: Register, version: int) -> None:
    """Record the register's current list as a release (unsigned: nothing here verifies a bundle)."""
    snap = reg.snapshot(MODEL)
    bundle = Bundle(
        kind="full",
        version=version,
        created_at=1_700_000_000 + version,
        expires_at=1_800_000_000,
        model_id=MODEL,
        embedding_dim=4,
        default_threshold=0.6,
        persons=snap.persons,
        embeddings=snap.embeddings,
        embedding_offset=snap.offset,
    )
    reg.record_release(bundle, snap.digests, size=0, sha256=f"{version:064x}", signing_key_id="test")


@pytest.fixture
def register(tmp_path: Path) -> Path:
    """Two persons enrolled and released in 1; the second removed and the rest released in 2."""
    path = tmp_path / "register.sqlite"
    reg = Register(path)
    try:
        reg.upsert_person("case-1", name="Mila Novak", priority=9)
        reg.upsert_person("case-2", priority=3)
        for i, (pid, date, age) in enumerate([("case-1", "2019-09-12", 10), ("case-1", None, 7), ("case-2", None, 30)]):
            emb = np.eye(4, dtype=np.float32)[i]
            reg.add_template(pid, emb, model_id=MODEL, photo_sha256=f"{i:064x}", photo_date=date, age=age)
        _release(reg, 1)
        reg.remove_persons(["case-2"])
        reg.upsert_person("case-3", name="Lea Horvat")
        _release(reg, 2)
    finally:
        reg.close()
    return path


def test_the_reader_reads_what_hq_writes(register: Path) -> None:
    conn = register_read.open_read_only(register)
    try:
        assert register_read.persons(conn, ["case-1", "case-2", "case-3", "nobody"]) == {
            "case-1": PersonRecord("case-1", "Mila Novak", 9),
            "case-3": PersonRecord("case-3", "Lea Horvat", 0),
        }
        assert register_read.templates(conn, "case-1") == [
            TemplateRecord(MODEL, None, 7),
            TemplateRecord(MODEL, "2019-09-12", 10),
        ]
        assert register_read.removed_in(conn, "case-2") == 2
        assert register_read.removed_in(conn, "case-2", published=1) is None
        assert register_read.removed_in(conn, "case-1") is None
        assert register_read.removed_in(conn, "case-3") is None  # never released: unknown, not closed
        assert (register_read.released_at(conn, 2), register_read.released_at(conn, 9)) == (1_700_000_002, None)
        # Read-only at the file: the centre cannot change HQ's register even by mistake.
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM persons")
    finally:
        conn.close()


def test_the_console_shows_what_hq_wrote(register: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "case-1").mkdir(parents=True)
    (photos / "case-1" / "2019-09-12_front.jpg").write_bytes(b"jpeg")
    view = RegisterView(register, photos)
    person = view.person("case-1")
    assert person is not None
    assert (person.name, person.priority, len(person.templates)) == ("Mila Novak", 9, 2)
    assert [p.name for p in person.photos] == ["2019-09-12_front.jpg"]
    assert view.person("case-2") is None
    assert {pid: p.name for pid, p in view.people({"case-1", "case-2", "case-3"}).items()} == {
        "case-1": "Mila Novak",
        "case-3": "Lea Horvat",
    }
    # Release 2 was built at 1_700_000_002: 2023-11-14 UTC.
    assert view.case_closed("case-2") == "HQ removed this person from the watchlist in version 2 on 2023-11-14 (UTC)"
    assert view.case_closed("case-1") is None


def test_hq_finds_unknown_persons_through_the_reader(register: Path) -> None:
    reg = Register(register)
    try:
        assert reg.unknown_persons(["case-3", "x", "case-2", "x"]) == ["x", "case-2"]
    finally:
        reg.close()


def test_a_register_of_another_layout_is_refused_at_start(register: Path) -> None:
    # What a migration that forgot the reader would leave: HQ's file moved on, the console did not.
    conn = sqlite3.connect(register)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(register_read.SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(RegisterReadError, match="this software reads layout"):
        register_read.open_read_only(register)
    with pytest.raises(RegisterViewError, match="this software reads layout"):
        RegisterView(register)


def test_files_that_are_not_a_register_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RegisterViewError, match="no register at"):
        RegisterView(tmp_path / "missing.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(RegisterViewError, match="not a watchlist register"):
        RegisterView(other)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RegisterViewError, match="cannot read the register"):
        RegisterView(garbage)
