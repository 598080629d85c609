"""HQ's release commands as a clerk uses them: build (--force, --dry-run), releases, publish as a
file, remove with a typo, inspect a delta before publishing, list a register, a bundle and a unit,
and apply on a unit whose [engine] decides the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.cli import main as edge_main
from testing.synthetic import make_persons, person_centers, samples_of
from watchlist.cli import main
from watchlist.format.bundle import frame, parse_verified
from watchlist.hq.register import Register
from wire.records import CANARY_PERSON_ID

MODEL = "synthetic:v1"


def run(*args: object, code: int = 0, command=main):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def edge_wl(*args: object, code: int = 0):
    """`edge watchlist ...`: the unit's side."""
    return run("watchlist", *args, code=code, command=edge_main)


@pytest.fixture
def hq(tmp_path: Path) -> dict:
    keys, reg = tmp_path / "keys", tmp_path / "hq.db"
    run("keygen", "--dir", keys)
    names = [f"case-{i}" for i in range(6)]
    persons = make_persons(names, 2)
    Register(reg).add_persons(persons, samples_of(person_centers(6), 2), model_id=MODEL)
    Register(reg).upsert_person("case-0", name="Ann B.", priority=3)
    build = ("build", "--register", reg, "--keys", keys, "--threshold", "0.5", "--no-canary")
    return {"keys": keys, "reg": reg, "build": build, "dir": tmp_path}


def test_build_refuses_to_overwrite_and_dry_run_changes_nothing(hq: dict) -> None:
    d = hq["dir"]
    run(*hq["build"], "--out", d / "v1.cpwl")
    before = (d / "v1.cpwl").read_bytes()
    r = run(*hq["build"], "--out", d / "v1.cpwl", code=2)
    assert f"{d / 'v1.cpwl'} exists: give another --out, or --force" in r.output
    assert (d / "v1.cpwl").read_bytes() == before and len(Register(hq["reg"]).releases()) == 1

    run("publish", d / "v1.cpwl", "--register", hq["reg"], "--export", d / "usb")
    run("remove", "case-5", "--register", hq["reg"])
    dry = run(*hq["build"], "--out", d / "v1.cpwl", "--delta", "--dry-run").output
    assert "dry run: would write delta 1->2" in dry and "removed 1: case-5" in dry and "added 0" in dry
    assert "unchanged 5" in dry and "nothing signed, written or recorded" in dry
    assert (d / "v1.cpwl").read_bytes() == before and len(Register(hq["reg"]).releases()) == 1

    out = run(*hq["build"], "--out", d / "v1.cpwl", "--force").output
    assert "full version 2" in out and (d / "v1.cpwl").read_bytes() != before


def test_an_unpublished_build_never_becomes_a_delta_base(hq: dict, tmp_path: Path) -> None:
    d, reg = hq["dir"], hq["reg"]
    run(*hq["build"], "--out", d / "v1.cpwl")
    r = run(*hq["build"], "--out", d / "d.cpwl", "--delta", code=2)
    assert "no release was published yet" in r.output
    assert (
        "version 1 recorded as published"
        in run("publish", d / "v1.cpwl", "--register", reg, "--export", d / "usb").output
    )
    assert (d / "usb" / "watchlist-v1-full.cpwl").exists()

    # The case: a delta built twice, only the second published. Both build on version 1.
    run("remove", "case-4", "--register", reg)
    assert "delta 1->2" in run(*hq["build"], "--out", d / "v2.cpwl", "--delta").output
    assert "delta 1->3" in run(*hq["build"], "--out", d / "v3.cpwl", "--delta").output
    run("publish", d / "v3.cpwl", "--register", reg, "--export", d / "usb")
    unit = ("--store", d / "unit.db", "--root-key", hq["keys"] / "root.pub", "--model-id", MODEL)
    edge_wl("apply", d / "usb" / "watchlist-v1-full.cpwl", *unit)
    assert "version 3 (5 persons" in edge_wl("apply", d / "usb" / "watchlist-v3-delta-from-1.cpwl", *unit).output
    assert "delta 3->4" in run(*hq["build"], "--out", d / "v4.cpwl", "--delta").output

    table = run("releases", "--register", reg).output.splitlines()
    assert table[0].split() == [
        "version", "kind", "base", "created", "(UTC)", "expires", "(UTC)", "listed", "sent", "bytes", "threshold",
        "fpir", "published"
    ]  # fmt: skip
    rows = {int(line.split()[0]): line.split() for line in table[1:]}
    assert rows[1][1:3] == ["full", "-"] and rows[1][-1].startswith("file:") and rows[1][-2].endswith("Z")
    assert rows[2][1:3] == ["delta", "1"] and rows[2][-1] == "no"
    assert rows[2][-3:-1] == ["0.5000", "-"]  # an explicit threshold (the synthetic model has no calibration)
    assert rows[3][1:3] == ["delta", "1"] and rows[4][1:3] == ["delta", "3"] and rows[4][-1] == "no"
    rel = json.loads(run("releases", "--register", reg, "--json").output)
    assert [r["persons"] for r in rel] == [6, 5, 5, 5] and rel[0]["published_at"] and rel[1]["published_at"] is None

    # A bundle from another register is not recorded anywhere.
    other = tmp_path / "other.db"
    Register(other)
    r = run("publish", d / "v2.cpwl", "--register", other, "--export", d / "usb2", code=2)
    assert "is not a release of register" in r.output and not (d / "usb2").exists()
    assert "give --register" in run("publish", d / "v2.cpwl", "--export", d / "usb2", code=2).output


def test_remove_names_every_unknown_id_and_fails(hq: dict) -> None:
    r = CliRunner().invoke(main, ["remove", "case-1", "case-2025-9999", "cse-2", "--register", str(hq["reg"])])
    assert r.exit_code == 1
    assert "1 of 3 persons removed" in r.output
    assert "not in the register (check the ids): case-2025-9999, cse-2" in r.output
    assert Register(hq["reg"]).unknown_persons(["case-1", "case-2"]) == ["case-1"]
    assert run("remove", "case-2", "--register", hq["reg"]).exit_code == 0


def test_inspect_a_delta_before_publishing(hq: dict, tmp_path: Path) -> None:
    d, reg = hq["dir"], hq["reg"]
    run(*hq["build"], "--out", d / "v1.cpwl", "--with-names")
    run("publish", d / "v1.cpwl", "--register", reg, "--export", d / "usb")
    run("remove", "case-3", "--register", reg)
    Register(reg).upsert_person("case-2", priority=7)
    run(*hq["build"], "--out", d / "v2.cpwl", "--delta", "--with-names")

    text = run("inspect", d / "v2.cpwl", "--root-key", hq["keys"] / "root.pub").output
    assert "delta bundle, version 2 (delta from version 1)" in text
    assert "signature: valid (key " in text and "removed: case-3" in text
    assert "created 20" in text and "Z, expires 20" in text
    info = json.loads(run("inspect", d / "v2.cpwl", "--root-key", hq["keys"] / "root.pub", "--json").output)
    assert info["kind"] == "delta" and info["version"] == 2 and info["base_version"] == 1
    assert info["model_id"] == MODEL and info["default_threshold"] == 0.5
    assert [(p["person_id"], p["templates"], p["priority"]) for p in info["persons"]] == [("case-2", 2, 7)]
    assert info["removed"] == ["case-3"] and info["signature"]["valid"] is True
    assert info["created_at"].endswith("Z") and "embedding_offset" not in info

    full = json.loads(run("inspect", d / "v1.cpwl", "--json").output)
    assert {p["person_id"]: p["name"] for p in full["persons"]}["case-0"] == "Ann B."
    assert "Ann B." in run("inspect", d / "v1.cpwl").output

    # Another root key: the chain does not hold, exit status 1, the reason printed.
    run("keygen", "--dir", tmp_path / "other")
    r = run("inspect", d / "v2.cpwl", "--root-key", tmp_path / "other" / "root.pub", code=1)
    assert "signature: INVALID: bad_keyset_signature" in r.output


def test_list_a_register_a_bundle_and_a_unit(hq: dict) -> None:
    d, reg = hq["dir"], hq["reg"]
    Register(reg).upsert_person("case-9", priority=2)
    from testing.synthetic import unit_rows

    Register(reg).add_template(
        "case-9", unit_rows(person_centers(1, seed=4))[0], model_id=MODEL, photo_sha256="ab" * 32, age=7
    )
    text = run("list", "--register", reg).output
    assert text.startswith(f"register {reg}: latest release none, latest published none; 7 persons, 13 templates")
    line = next(x for x in text.splitlines() if x.startswith("case-9"))
    assert line.split()[:5] == ["case-9", "2", "1", "age", "7"]
    assert "Ann B." in text  # HQ's register holds the names
    run(*hq["build"], "--out", d / "v1.cpwl")
    bundle = json.loads(run("list", d / "v1.cpwl", "--json").output)
    assert bundle["version"] == 1 and len(bundle["persons"]) == 7
    assert all(p["name"] is None for p in bundle["persons"])  # built without --with-names

    conf = d / "unit.toml"
    # Built --no-canary (synthetic embeddings), so this unit does not run the canary.
    conf.write_text(
        f'[watchlist]\nroot_key = "{hq["keys"] / "root.pub"}"\nstore = "unit.db"\n[canary]\nenabled = false\n'
    )
    # Nothing is created by looking: a store made by root here would shut the unit's user out.
    assert "no watchlist store there" in edge_wl("list", "--config", conf, code=2).output
    assert not (d / "unit.db").exists()
    assert "moved: use `edge watchlist list" in run("list", "--config", conf, code=2).output
    edge_wl("apply", d / "v1.cpwl", "--config", conf, "--model-id", MODEL)
    unit = edge_wl("list", "--config", conf).output
    assert unit.startswith(f"unit store {d / 'unit.db'}: version 1 (full), expires 20")
    assert "7 persons, 13 templates" in unit and "case-9" in unit
    assert run("list", "--register", reg, d / "v1.cpwl", code=2).exit_code == 2


def test_apply_takes_the_model_from_the_units_engine(tmp_path: Path) -> None:
    from engines.face_engine import FaceEngine

    engine = FaceEngine.load()
    model = engine.model_id
    keys, reg = tmp_path / "keys", tmp_path / "hq.db"
    run("keygen", "--dir", keys)
    # Embeddings of the engine's size: apply checks a list's size against the unit's engine too.
    centers = person_centers(1, dim=engine.embedding_dim)
    Register(reg).add_persons(make_persons(["case-1"], 1), samples_of(centers, 1), model_id=model)
    # Calibrated (--fpir 0.01); the register has no canary person yet, so build enrols it with this engine.
    out = run("build", "--register", reg, "--keys", keys, "--out", tmp_path / "v1.cpwl").output
    assert f"canary person enrolled for model {model}: 2 new templates" in out and "note:" not in out
    listed = parse_verified(frame((tmp_path / "v1.cpwl").read_bytes())).persons
    assert sorted((p.person_id, p.canary) for p in listed) == [("case-1", False), (CANARY_PERSON_ID, True)]
    out = run("build", "--register", reg, "--keys", keys, "--out", tmp_path / "v1b.cpwl").output
    assert "canary person enrolled" not in out  # once per model, as enrol-canary
    conf = tmp_path / "unit.toml"
    conf.write_text('[engine]\nthreads = 1\n[watchlist]\nroot_key = "keys/root.pub"\nstore = "wl.db"\n')
    assert "applied: watchlist version 1" in edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf).output
    # --model-id still overrides: a wrong one is refused as a unit would.
    r = edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf, "--model-id", "other:1", code=1)
    assert "rejected (wrong_model)" in r.output
    conf.write_text('[engine]\nthreds = 1\n[watchlist]\nroot_key = "keys/root.pub"\nstore = "wl2.db"\n')
    r = edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf, code=2)
    assert f"{conf}: engine.threds" in r.output  # the file and the key


def test_publishing_over_mqtt_is_recorded(hq: dict, mosquitto) -> None:
    d, reg = hq["dir"], hq["reg"]
    run(*hq["build"], "--out", d / "v1.cpwl")
    topic = "checkpoint/v1/site-1/watchlist"
    out = run("publish", d / "v1.cpwl", "--register", reg, "--topic", topic, "--host", mosquitto.host,
              "--port", mosquitto.port).output  # fmt: skip
    assert f"full bundle version 1 published on {topic}/full" in out and "recorded as published" in out
    (rel,) = Register(reg).releases()
    assert rel["published_to"] == f"mqtt://{mosquitto.host}:{mosquitto.port}/{topic}"
    assert Register(reg).latest_published_version() == 1


def test_a_register_from_before_publications_opens_and_records(hq: dict) -> None:
    import sqlite3

    run(*hq["build"], "--out", hq["dir"] / "v1.cpwl")
    with sqlite3.connect(hq["reg"]) as db:  # as registers written before the table existed
        db.execute("DROP TABLE publications")
    reg = Register(hq["reg"])
    assert reg.latest_published_version() is None and reg.releases()[0]["published_at"] is None
    run("publish", hq["dir"] / "v1.cpwl", "--register", hq["reg"], "--export", hq["dir"] / "usb")
    assert Register(hq["reg"]).latest_published_version() == 1


def test_build_refuses_a_list_without_the_canary_it_cannot_enrol(hq: dict) -> None:
    """A synthetic model has no engine here: build says so and names --no-canary, writing nothing."""
    d = hq["dir"]
    build = [a for a in hq["build"] if a != "--no-canary"]
    r = run(*build, "--out", d / "v1.cpwl", code=2)
    assert f"the register holds no canary person for model {MODEL}" in r.output and "--no-canary" in r.output
    assert "enrol-canary" in r.output and not (d / "v1.cpwl").exists() and Register(hq["reg"]).releases() == []
    dry = run(*build, "--out", d / "v1.cpwl", "--dry-run").output  # a dry run writes nothing, enrols nothing
    assert "the build without --dry-run enrols it first" in dry
    out = run(*hq["build"], "--out", d / "v1.cpwl").output
    assert "full version 1" in out and "(--no-canary)" in out
