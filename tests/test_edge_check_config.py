"""`edge check-config`: the software version, whether a list is applied, and `--probe` against a
real RTSP server and a real Mosquitto (with a password file), and against the site broker on the
deploy/ files: each wrong setup of issue 19, item 5 fails the probe with its reason."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from common.version import software_version
from edge.cli import main
from testing.broker import HOST
from testing.site import Site, make_site_credentials, start_deployed_broker
from testing.synthetic import Authority, make_persons, person_centers, samples_of
from watchlist.hq.publish import publish_bundle
from wire.signing import generate_unit_key, write_unit_key


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
            f'connect_timeout_s = 3\nsigning_key = "signing.key"\n[outbox]\npath = "outbox.sqlite"\n'
        )
        if not (tmp / "signing.key").exists():
            write_unit_key(generate_unit_key(), tmp / "signing.key")
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
    assert "probe: 3 of 3 worked" in out.output

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
    assert "probe: 2 of 4 worked; failed: camera gone, broker" in out.output

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


@pytest.fixture
def site(tmp_path: Path, mosquitto_bin: str):
    creds = tmp_path / "creds"
    unit_keys = make_site_credentials(creds)
    broker = start_deployed_broker(tmp_path / "broker", creds)
    hq = Authority(model_id="synthetic:v1", threshold=0.5)
    bundle = hq.bundle(1, make_persons(["p1"], 1), samples_of(person_centers(1, seed=1), 1, seed=2), canary=True)
    publish_bundle(bundle, "checkpoint/v1/site-a/watchlist", connection=Site(broker, creds, unit_keys).account("hq"))
    yield Site(broker, creds, unit_keys, hq)
    broker.stop()


def _site_config(tmp: Path, site: Site, clip: Path, **change: str) -> Path:
    """unit-1's config as make-credentials' mqtt.toml has it, with the [mqtt] keys in `change` replaced
    (a value of "" removes the key)."""
    d = site.creds / "unit-1"
    (tmp / "hq-root.pub").write_text("0" * 64)
    mqtt = {
        "host": f'"{HOST}"',
        "port": str(site.broker.port),
        "username": '"site-a/unit-1"',
        "password_file": f'"{d / "mqtt.pw"}"',
        "signing_key": f'"{d / "signing.key"}"',
        "watchlist_username": '"site-a/unit-1/watchlist"',
        "watchlist_password_file": f'"{d / "watchlist.pw"}"',
        "connect_timeout_s": "3",
        **change,
    }
    topic = mqtt.pop("topic", '"checkpoint/v1/site-a/watchlist"')
    lines = "".join(f"{k} = {v}\n" for k, v in mqtt.items() if v)
    path = tmp / "unit.toml"
    path.write_text(
        f'[unit]\nid = "unit-1"\nsite = "site-a"\n\n[[cameras]]\nid = "gate"\nurl = "{clip}"\n\n'
        f'[watchlist]\nroot_key = "hq-root.pub"\nstore = "wl.db"\ntopic = {topic}\n\n[mqtt]\n{lines}\n'
        f'[mqtt.tls]\nca_file = "{site.creds / "broker" / "ca.pem"}"\n\n[outbox]\npath = "outbox.sqlite"\n'
    )
    return path


def test_probe_on_the_site_broker_fails_each_wrong_setup_with_its_reason(
    site: Site, tmp_path: Path, face_clip: Path
) -> None:
    """Issue 19, item 5: a wrong watchlist password, a watchlist topic the ACL never serves, an account
    the ACL does not let publish hits, and no signing_key each said `2 of 2 worked` before."""

    def probe(**change: str) -> Any:
        return CliRunner().invoke(
            main, ["check-config", "--probe", str(_site_config(tmp_path, site, face_clip, **change))]
        )

    out = probe()
    assert out.exit_code == 0, out.output
    assert "signing: OK" in out.output
    assert "checkpoint/v1/site-a/unit-1/hits accepted" in out.output, out.output
    assert (
        "watchlist checkpoint/v1/site-a/watchlist: OK: read as site-a/unit-1/watchlist: full list version 1"
        in out.output
    )
    assert "probe: 4 of 4 worked" in out.output

    (tmp_path / "wrong.pw").write_text("not-the-password\n")
    out = probe(watchlist_password_file=f'"{tmp_path / "wrong.pw"}"')
    assert (
        out.exit_code == 1
        and "watchlist checkpoint/v1/site-a/watchlist: FAILED: as site-a/unit-1/watchlist:" in out.output
    )
    assert "refused the connection: Not authorized" in out.output, out.output

    out = probe(topic='"checkpoint/site-a/watchlist"')
    assert out.exit_code == 1, out.output
    assert "FAILED: no manifest on checkpoint/site-a/watchlist/full/manifest" in out.output, out.output
    assert "does not let site-a/unit-1/watchlist read it" in out.output

    out = probe(username='"site-b/unit-2"', password_file=f'"{site.creds / "unit-2" / "mqtt.pw"}"')
    assert out.exit_code == 1, out.output
    assert (
        "broker: FAILED: " in out.output
        and "refused a message on checkpoint/v1/site-a/unit-1/hits: Not authorized" in out.output
    )
    assert 'set [mqtt] username = "site-a/unit-1"' in out.output

    out = probe(signing_key="")
    assert out.exit_code == 1, out.output
    assert "warning: [mqtt] has no signing_key" in out.output
    assert (
        "signing: FAILED: [mqtt] has no signing_key" in out.output
        and "probe: 3 of 4 worked; failed: signing" in out.output
    )


def test_probe_leaves_a_running_unit_alone(site: Site, tmp_path: Path, face_clip: Path) -> None:
    """The broker binds a client id to its account, so a probe as the unit's account would cut a
    running unit off: it says so instead (the unit holds its outbox's lock)."""
    conf = _site_config(tmp_path, site, face_clip)
    fd = os.open(tmp_path / "outbox.sqlite.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        out = CliRunner().invoke(main, ["check-config", "--probe", str(conf)])
    finally:
        os.close(fd)
    assert out.exit_code == 1, out.output
    assert "broker: FAILED: not probed: the unit is running" in out.output and "stop it first" in out.output
