"""`edge check-config`: the software version, whether a list is applied, and `--probe` against a
real RTSP server and a real Mosquitto (with a password file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner

from common.version import software_version
from edge.cli import main


def _config(tmp: Path, cameras: dict[str, str], broker: Any = None, password: str = "right") -> Path:
    (tmp / "hq-root.pub").write_text("0" * 64)
    cams = "".join(
        f'\n[[cameras]]\nid = "{cid}"\nurl = "{url}"\nopen_timeout_s = 3\nread_timeout_s = 3\n'
        for cid, url in cameras.items()
    )
    text = f'[unit]\nid = "unit-p"\nsite = "site-p"\n{cams}\n[watchlist]\nroot_key = "hq-root.pub"\nstore = "wl.db"\n'
    if broker is None:
        text += '[sinks.jsonl]\npath = "hits.jsonl"\n'
    else:
        text += (
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nusername = "unit"\npassword = "{password}"\n'
            f'connect_timeout_s = 3\n[outbox]\npath = "outbox.sqlite"\n'
        )
    path = tmp / "unit.toml"
    path.write_text(text)
    return path


def test_check_config_says_the_version_and_whether_a_list_is_applied(tmp_path: Path, people: Any) -> None:
    from tests.edge_support import signed_store

    conf = _config(tmp_path, {"cam": str(tmp_path / "clip.mp4")})
    (tmp_path / "clip.mp4").write_bytes(b"")
    out = CliRunner().invoke(main, ["check-config", str(conf)])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"{conf}: OK (checkpoint {software_version()})")
    assert "watchlist: no list applied yet (the store is created at first start)" in out.output
    assert not (tmp_path / "wl.db").exists()

    root_pub, store = signed_store(tmp_path / "hq", people)
    conf.write_text(
        conf.read_text()
        .replace('root_key = "hq-root.pub"', f'root_key = "{root_pub}"')
        .replace('store = "wl.db"', f'store = "{store}"')
    )
    out = CliRunner().invoke(main, ["check-config", str(conf)])
    assert "watchlist: version 1 (full), 1 persons, 1 templates, expires 20" in out.output, out.output


def test_check_config_names_file_and_key_of_a_bad_gating_value(tmp_path: Path) -> None:
    conf = _config(tmp_path, {"cam": str(tmp_path / "clip.mp4")})
    (tmp_path / "clip.mp4").write_bytes(b"")
    conf.write_text(conf.read_text() + "\n[analysis.gating]\nfull_frame_interval_s = 0\n")
    out = CliRunner().invoke(main, ["check-config", str(conf)])
    assert out.exit_code != 0
    assert f"{conf}: analysis.gating.full_frame_interval_s:" in out.output, out.output


def test_probe_reads_a_frame_from_each_camera_and_connects_to_the_broker(
    tmp_path: Path, rtsp_server_factory: Any, face_clip: Path, broker_factory: Any
) -> None:
    srv = rtsp_server_factory({"gate": face_clip})
    broker = broker_factory(users={"unit": "right"}).start()
    good = _config(tmp_path, {"gate": srv.url("gate")}, broker)
    out = CliRunner().invoke(main, ["check-config", "--probe", str(good)])
    assert out.exit_code == 0, out.output
    assert f"camera gate: OK: {srv.url('gate')}: one frame, 640x360, via" in out.output
    assert f"broker: OK: connected to {broker.host}:{broker.port} (MQTT 5, as unit)" in out.output
    assert "probe: 2 of 2 worked" in out.output

    bad = _config(
        tmp_path,
        {"gate": srv.url("gate"), "gone": srv.url("gate").replace("/gate", "/nosuchmount")},
        broker,
        password="wrong",
    )
    out = CliRunner().invoke(main, ["check-config", "--probe", str(bad)])
    assert out.exit_code == 1, out.output
    assert "camera gate: OK" in out.output and "camera gone: FAILED: " in out.output
    assert "broker: FAILED: " in out.output and "refused the connection" in out.output
    assert "check username" in out.output
    assert "probe: 1 of 3 worked; failed: camera gone, broker" in out.output

    broker.stop()
    out = CliRunner().invoke(main, ["check-config", "--probe", str(good)])
    assert out.exit_code == 1 and "broker: FAILED: " in out.output and "connection refused by" in out.output, out.output


def test_check_config_refuses_a_threshold_below_the_models_calibrated_level(tmp_path: Path) -> None:
    """Issue 20, item 3: `edge check-config` (and `edge run`, which loads the config the same way; the
    daemon checks again against the engine it loaded, tests/test_daemon.py) refuses the unit's own
    threshold where the model's calibration says strangers would match."""
    conf = _config(tmp_path, {"cam": str(tmp_path / "clip.mp4")})
    (tmp_path / "clip.mp4").write_bytes(b"")
    conf.write_text(conf.read_text() + "\n[matching]\nthreshold = 0.5\n")
    out = CliRunner().invoke(main, ["check-config", str(conf)])
    assert out.exit_code == 2, out.output
    assert f"{conf}: matching.threshold: 0.5 is at or below the strangers' median score" in out.output
    assert "raises a false alert" in out.output
