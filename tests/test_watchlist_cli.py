"""The `watchlist` command line, HQ to unit, with real files."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edge.cli import main as edge_main
from testing.synthetic import make_persons, person_centers, samples_of
from watchlist.cli import main
from watchlist.hq.register import Register

MODEL = "synthetic:v1"
# Synthetic embeddings: no engine here could enrol the canary person for this model.
BUILD = ("build", "--no-canary")


def run(*args: str, ok: bool = True, command=main):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def edge_wl(*args: str, ok: bool = True):
    """`edge watchlist ...`: the unit's side."""
    return run("watchlist", *args, ok=ok, command=edge_main)


def test_hq_to_unit_through_the_cli(tmp_path: Path) -> None:
    keys, hq, unit = tmp_path / "keys", tmp_path / "hq.db", tmp_path / "unit.db"
    assert "pin" in run("keygen", "--dir", keys).output
    assert "already holds HQ keys" in run("keygen", "--dir", keys, ok=False).output
    reg = Register(hq)
    reg.add_persons(
        make_persons([f"case-{i}" for i in range(12)], 2), samples_of(person_centers(12), 2), model_id=MODEL
    )

    r = run(*BUILD, "--register", hq, "--keys", keys, "--out", tmp_path / "v1.cpwl", ok=False)
    assert r.exit_code == 2 and "--threshold" in r.output
    assert (
        "full version 1: 12 persons"
        in run(*BUILD, "--register", hq, "--keys", keys, "--out", tmp_path / "v1.cpwl", "--threshold", "0.55").output
    )
    unit_args = ("--store", unit, "--root-key", keys / "root.pub")
    r = edge_wl("apply", tmp_path / "v1.cpwl", *unit_args, ok=False)
    assert r.exit_code != 0 and "--model-id" in r.output
    assert (
        "version 1 (12 persons, 24 templates)"
        in edge_wl("apply", tmp_path / "v1.cpwl", *unit_args, "--model-id", MODEL).output
    )

    run("publish", tmp_path / "v1.cpwl", "--register", hq, "--export", tmp_path / "usb")
    run("remove", "case-3", "case-4", "--register", hq)
    out = run(
        *BUILD, "--register", hq, "--keys", keys, "--out", tmp_path / "v2.cpwl", "--delta", "--valid-for", "2d"
    ).output
    assert "delta 1->2: 0 persons (0 templates) in, 2 removed" in out
    assert "version 2 (10 persons, 20 templates)" in edge_wl("apply", tmp_path / "v2.cpwl", *unit_args).output

    # Rotation: the next bundle is signed by the new key and carries key set 2, revoking the first key.
    run("publish", tmp_path / "v2.cpwl", "--register", hq, "--export", tmp_path / "usb")
    first_kid = (keys / "signing.current").read_text().strip()
    assert first_kid in run("rotate", "--dir", keys).output
    run(*BUILD, "--register", hq, "--keys", keys, "--out", tmp_path / "v3.cpwl", "--delta")
    edge_wl("apply", tmp_path / "v3.cpwl", *unit_args)
    status = json.loads(edge_wl("status", "--store", unit, "--json").output)
    assert status["version"] == 3 and status["persons"] == 10 and status["expired"] is False
    assert status["signing_key_id"] == (keys / "signing.current").read_text().strip() != first_kid
    assert [e["kind"] for e in status["events"][:3]] == ["applied", "applied", "applied"]

    # A tampered copy is refused with its reason; the unit keeps version 3.
    data = bytearray((tmp_path / "v3.cpwl").read_bytes())
    data[-100] ^= 1
    (tmp_path / "bad.cpwl").write_bytes(bytes(data))
    r = edge_wl("apply", tmp_path / "bad.cpwl", *unit_args, ok=False)
    assert r.exit_code == 1 and "rejected (bad_signature)" in r.output
    assert "version 3 (delta)" in edge_wl("status", "--store", unit).output
    assert "rejected" in edge_wl("status", "--store", unit).output

    # Revoking the only signing key: HQ cannot build until it rotates.
    current = (keys / "signing.current").read_text().strip()
    assert "run rotate" in run("revoke", current, "--dir", keys).output
    r = run(*BUILD, "--register", hq, "--keys", keys, "--out", tmp_path / "v4.cpwl", "--delta", ok=False)
    assert r.exit_code == 2 and "not in key set" in r.output
    # The key set file on its own revokes the key on the unit too.
    assert "key set 3 accepted" in edge_wl("apply", keys / "keyset.bin", *unit_args).output
    status = json.loads(edge_wl("status", "--store", unit, "--json").output)
    assert status["events"][0]["kind"] == "keyset"

    info = json.loads(run("inspect", tmp_path / "v2.cpwl", "--json").output)
    assert info["removed"] == ["case-3", "case-4"] and info["signature"]["valid"] is None
    assert "valid" in run("inspect", tmp_path / "v1.cpwl", "--root-key", keys / "root.pub").output


def test_unit_config_file_is_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    run("keygen", "--dir", keys)
    reg = Register(tmp_path / "hq.db")
    reg.add_persons(make_persons(["case-1"], 1), samples_of(person_centers(1), 1), model_id=MODEL)
    run(*BUILD, "--register", tmp_path / "hq.db", "--keys", keys, "--out", tmp_path / "v1.cpwl", "--threshold", "0.5")
    conf = tmp_path / "unit.toml"
    # Built --no-canary (synthetic embeddings), so this unit does not run the canary.
    conf.write_text(
        '[watchlist]\nroot_key = "keys/root.pub"\nstore = "state/wl.db"\non_expired = "stop"\n[canary]\nenabled = false\n'
    )
    edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf, "--model-id", MODEL)
    assert (tmp_path / "state" / "wl.db").exists()
    assert "version 1 (full)" in edge_wl("status", "--config", conf).output
    conf.write_text('[watchlist]\nroot_key = "keys/root.pub"\non_expired = "later"\n')
    r = edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf, "--model-id", MODEL, ok=False)
    assert r.exit_code == 2 and "on_expired" in r.output


def test_encrypted_keys_need_their_passphrase(tmp_path: Path, monkeypatch) -> None:
    keys = tmp_path / "keys"
    monkeypatch.setenv("HQ_PASS", "correct horse")
    run("keygen", "--dir", keys, "--passphrase-env", "HQ_PASS")
    assert b"ENCRYPTED" in (keys / "root.key").read_bytes()
    reg = Register(tmp_path / "hq.db")
    reg.add_persons(make_persons(["case-1"], 1), samples_of(person_centers(1), 1), model_id=MODEL)
    build = (
        *BUILD,
        "--register",
        tmp_path / "hq.db",
        "--keys",
        keys,
        "--out",
        tmp_path / "v1.cpwl",
        "--threshold",
        "0.5",
    )
    r = run(*build, ok=False)
    assert r.exit_code == 2 and "passphrase" in r.output
    monkeypatch.setenv("HQ_PASS", "wrong")
    r = run(*build, "--passphrase-env", "HQ_PASS", ok=False)
    assert r.exit_code == 2 and "not a readable private key" in r.output
    monkeypatch.setenv("HQ_PASS", "correct horse")
    run(*build, "--passphrase-env", "HQ_PASS")
    run("rotate", "--dir", keys, "--passphrase-env", "HQ_PASS")


def test_the_units_old_spellings_say_where_they_moved(tmp_path: Path) -> None:
    """Issue 23: the unit's commands are `edge watchlist ...`; the old ones name the new one, exit 2."""
    for args in (
        ["apply", "v1.cpwl", "--config", "unit.toml"],
        ["status", "--store", "x.db"],
        ["list", "--store", "x"],
    ):
        r = run(*args, ok=False)
        assert r.exit_code == 2 and f"moved: use `edge watchlist {args[0]} " in r.output
    assert not (tmp_path / "x.db").exists()
    helped = run("--help").output
    assert "apply" not in helped.split("Commands:")[1] and "edge watchlist" in helped


def test_apply_refuses_what_is_not_a_regular_file_before_opening_it(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    keys = tmp_path / "keys"
    run("keygen", "--dir", keys)
    fifo, link = tmp_path / "fifo.cpwl", tmp_path / "list.cpwl"
    os.mkfifo(fifo)  # nobody writes to it: opening it would wait for ever (issue 20, item 7)
    link.symlink_to("/dev/zero")  # before the bounded read this was read until memory ran out
    for path, kind in ((fifo, "a FIFO"), (link, "a character device")):
        args = [
            "watchlist",
            "apply",
            str(path),
            "--store",
            str(tmp_path / "unit.db"),
            "--root-key",
            str(keys / "root.pub"),
        ]
        args += ["--model-id", MODEL, "--max-bytes", str(1 << 20)]
        code = "import sys; from edge.cli import main; sys.exit(main())"
        # A subprocess with a timeout: a command that hangs fails the test instead of stopping it.
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parents[1],
        )
        assert done.returncode == 2 and f"is {kind}, not a regular file" in done.stderr, done.stderr
    assert not (tmp_path / "unit.db").exists()


def test_apply_with_a_unit_config_checks_the_engines_model_and_size(tmp_path: Path) -> None:
    """Issue 20, item 4: `watchlist apply --config` (now `edge watchlist apply`) passed the engine's model but not its size, so a
    signed list of another size was applied and blinded the unit. The size comes from the config and
    the model's weights (no engine loaded); a list of another size is refused, one of the right size applied."""
    from engines.config import EngineConfig
    from engines.ensemble import config_identity
    from testing.synthetic import Authority

    unit = config_identity(EngineConfig())  # the config's [engine] is empty: the default model
    hq = Authority(model_id=unit.model_id, dim=64, threshold=0.99)
    hq.write_root(tmp_path / "root.pub")
    conf = tmp_path / "unit.toml"
    conf.write_text('[engine]\n[watchlist]\nroot_key = "root.pub"\nstore = "unit.db"\n')
    persons = make_persons(["case-1", "case-2"], 1)
    (tmp_path / "v1.cpwl").write_bytes(hq.bundle(1, persons, samples_of(person_centers(2, dim=64), 1)))
    r = edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf, ok=False)
    assert r.exit_code == 1 and "rejected (wrong_dimension)" in r.output
    assert f"this unit's engine makes {unit.embedding_dim}-d ones" in r.output

    hq.dim = unit.embedding_dim
    bundle = hq.bundle(2, persons, samples_of(person_centers(2, dim=hq.dim), 1), canary=True)
    (tmp_path / "v2.cpwl").write_bytes(bundle)  # the two and the canary person
    assert "applied: watchlist version 2 (3 persons" in edge_wl("apply", tmp_path / "v2.cpwl", "--config", conf).output


def test_apply_with_a_unit_config_that_runs_the_canary_refuses_a_list_without_it(tmp_path: Path) -> None:
    """A unit runs the canary by default and refuses lists without the canary person over MQTT; a
    list applied from USB with `--config` meets the same rule, and a unit that turned it off takes it."""
    from engines.config import EngineConfig
    from engines.ensemble import config_identity
    from testing.synthetic import Authority

    unit = config_identity(EngineConfig())
    hq = Authority(model_id=unit.model_id, dim=unit.embedding_dim, threshold=0.99)
    hq.write_root(tmp_path / "root.pub")
    conf = tmp_path / "unit.toml"
    conf.write_text('[engine]\n[watchlist]\nroot_key = "root.pub"\nstore = "unit.db"\n')
    persons = make_persons(["case-1", "case-2"], 1)
    (tmp_path / "v1.cpwl").write_bytes(hq.bundle(1, persons, samples_of(person_centers(2, dim=hq.dim), 1)))
    r = edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf, ok=False)
    assert r.exit_code == 1 and "rejected (no_canary)" in r.output

    conf.write_text(conf.read_text() + "[canary]\nenabled = false\n")
    assert "applied: watchlist version 1 (2 persons" in edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf).output

    conf.write_text(conf.read_text() + "colour = 1\n")
    r = edge_wl("apply", tmp_path / "v1.cpwl", "--config", conf, ok=False)
    assert r.exit_code == 2 and "[canary]" in r.output and "colour" in r.output
