"""centre.toml (central/config.py) and how `run`/`serve` lay their flags over it (issue 23, item 3)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from central.cli import main as cli
from central.cli.receive import FLAG_KEYS, centre_config, serve
from central.config import RECEIVER_TABLES, STORE_KEYS, ConfigError, ConsoleConfig, load_centre_config
from central.receiver import ReceiverConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "centre.example.toml"


def test_the_example_file_loads_and_says_the_defaults():
    cfg = load_centre_config(EXAMPLE)
    defaults = ReceiverConfig()
    for key in ("host", "port", "protocol", "group", "shared", "queue_max", "queue_max_bytes", "retention_days"):
        assert getattr(cfg.receiver, key) == getattr(defaults, key), key
    assert cfg.console == ConsoleConfig()
    assert cfg.db == str(EXAMPLE.parent / "checkpoint-hits.sqlite"), "a relative db is the file's folder's"


def test_every_receiver_setting_has_exactly_one_table():
    placed = [key for keys in RECEIVER_TABLES.values() for key in keys]
    assert sorted(placed) == sorted(ReceiverConfig.model_fields)


def test_unknown_keys_and_bad_values_name_the_file_and_key(tmp_path):
    f = tmp_path / "centre.toml"
    f.write_text('[mqtt]\nprot = "5"\nport = 0\n[console]\nlistn = "x"\n[store]\nretention_days = -1\n[mqt]\n')
    with pytest.raises(ConfigError) as e:
        load_centre_config(f)
    lines = str(e.value).splitlines()
    assert any(line.startswith(f"{f}: mqtt.prot: unknown key") for line in lines), lines
    assert f"{f}: mqtt.port: port must be between 1 and 65535, got 0" in lines
    assert any(line.startswith(f"{f}: console.listn: unknown key") for line in lines), lines
    assert any(line.startswith(f"{f}: store.retention_days: ") for line in lines), lines
    assert any(line.startswith(f"{f}: mqt: unknown table") for line in lines), lines


def test_cross_key_rules_hold_across_tables(tmp_path):
    f = tmp_path / "centre.toml"
    f.write_text('[receiver]\nunsigned = "reject"\n')
    with pytest.raises(ConfigError, match="unit_keys"):
        load_centre_config(f)


def test_relative_paths_are_the_files_folders(tmp_path):
    (tmp_path / "receiver.pw").write_text("secret\n")
    f = tmp_path / "etc" / "centre.toml"
    f.parent.mkdir()
    f.write_text('[mqtt]\nusername = "r"\npassword_file = "../receiver.pw"\n')
    assert load_centre_config(f).receiver.secret() == "secret"


def _resolved(args: list[str], config: Path | None) -> object:
    """What `serve` would run with, from the flags and the file, without starting anything."""
    ctx = serve.make_context("serve", args + (["--config", str(config)] if config else []))
    return centre_config(ctx, ctx.params["config_file"])


def test_flags_given_override_the_file_and_defaults_do_not(tmp_path):
    f = tmp_path / "centre.toml"
    f.write_text(
        '[mqtt]\nhost = "broker.example.org"\nport = 8883\nshared = true\n'
        '[store]\ndb = "postgresql://c@db/checkpoint"\n[console]\nport = 8443\nreceiver = false\n'
        'trusted_proxies = ["10.0.0.1"]\n'
    )
    from_file = _resolved([], f)
    assert from_file.receiver.port == 8883 and from_file.receiver.host == "broker.example.org"
    assert from_file.console.port == 8443 and not from_file.console.receiver
    assert from_file.db == "postgresql://c@db/checkpoint"
    given = _resolved(["--port", "1884", "--http-port", "9000", "--no-share", "--trusted-proxy", "::1"], f)
    assert given.receiver.port == 1884 and given.receiver.host == "broker.example.org"
    assert given.console.port == 9000 and given.console.trusted_proxies == ["::1"]
    assert not given.receiver.shared


def test_a_flag_replaces_the_files_password_source(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    f = tmp_path / "centre.toml"
    f.write_text('[mqtt]\nusername = "r"\npassword_file = "pw"\n')
    assert _resolved(["--password", "from-flag"], f).receiver.secret() == "from-flag"


def test_a_bad_flag_is_named_as_the_flag(tmp_path):
    f = tmp_path / "centre.toml"
    f.write_text("[mqtt]\nport = 1883\n")
    with pytest.raises(click.ClickException) as e:
        _resolved(["--port", "0"], f)
    assert e.value.exit_code == 2 and e.value.message.startswith("--port: ")


def test_click_defaults_are_the_models_defaults():
    # The flags show their defaults in --help; the file and models own them. They must agree.
    receiver, console = ReceiverConfig(), ConsoleConfig()
    by_key = {
        **{f"mqtt.{k}": v for k, v in receiver.model_dump().items()},
        **{f"receiver.{k}": v for k, v in receiver.model_dump().items()},
        **{f"store.{k}": v for k, v in receiver.model_dump().items() if k in STORE_KEYS},
        **{f"console.{k}": v for k, v in console.model_dump(by_alias=True).items()},
        "store.db": "checkpoint-hits.sqlite",
    }
    for param in serve.params:
        if param.name in FLAG_KEYS and isinstance(param.default, (str, int, float)) and not param.is_flag:
            flag, key = FLAG_KEYS[param.name]
            expected = by_key[key]
            assert param.default == expected, flag


def test_serve_with_a_bad_config_exits_2_naming_file_and_key(tmp_path):
    f = tmp_path / "centre.toml"
    f.write_text('[mqtt]\nprot = "5"\n')
    res = CliRunner().invoke(cli, ["serve", "--config", str(f)])
    assert res.exit_code == 2 and f"{f}: mqtt.prot: unknown key" in res.output, res.output
    res = CliRunner().invoke(cli, ["run", "--config", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "missing.toml: no such config file" in res.output, res.output


def test_exit_status_refusal_1_usage_2(tmp_path):
    db = tmp_path / "h.sqlite"
    runner = CliRunner()
    assert runner.invoke(cli, ["hits", "--db", str(db)]).exit_code == 1, "no store: refused"
    pw = tmp_path / "pw"
    pw.write_text("long-enough-password")
    assert runner.invoke(cli, ["user", "add", "--db", str(db), "--password-file", str(pw), "ana"]).exit_code == 0
    res = runner.invoke(cli, ["user", "add", "--db", str(db), "--password-file", str(pw), "ana"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    res = runner.invoke(cli, ["crop", "--db", str(db), "nonexistent", "--out", str(tmp_path / "f.jpg")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert runner.invoke(cli, ["purge", "--db", str(db), "--older-than-days", "0"]).exit_code == 2
    assert runner.invoke(cli, ["hits", "--db", str(db), "--nonsense"]).exit_code == 2
