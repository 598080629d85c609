"""`checkpoint-receiver serve` as operators start it, and the console demo (`python -m testing.demo --console`) in one command, and the console with
the receiver in one process, fed by a real Mosquitto."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from central.cli import main as cli
from central.store import HitStore
from testing.broker import free_port, wait_for
from testing.hits import make_hit
from wire import records

ROOT = Path(__file__).resolve().parents[1]


def start_serve(*args: str, command: tuple[str, ...] = ("-m", "central.cli", "serve")) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *command, "--http-port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    while True:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"serve exited: {''.join(lines)}")
        lines.append(line)
        if "console on" in line:
            return proc, f"http://127.0.0.1:{port}", "".join(lines)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return err


def login(c: httpx.Client, user: str, password: str) -> None:
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"csrf": token, "username": user, "password": password})
    assert r.status_code == 303, r.text


def test_serve_demo_in_one_command():
    proc, url, banner = start_serve("--console", command=("-m", "testing.demo"))
    try:
        password = re.search(r"ana\s+operator\s+password: (\S+)", banner).group(1)
        with httpx.Client(base_url=url) as c:
            assert c.get("/hits").status_code == 303
            login(c, "ana", password)
            page = c.get("/hits").text
            assert "Mila Novak" in page and "case-2024-0173" in page
            assert "expiring" in c.get("/fleet").text
    finally:
        stop(proc)


def test_serve_runs_the_receiver_and_the_console_in_one_process(mosquitto, tmp_path):
    db = tmp_path / "hits.sqlite"
    pw = tmp_path / "pw"
    pw.write_text("ops-password-1")
    assert CliRunner().invoke(cli, ["user", "add", "--db", str(db), "--password-file", str(pw), "ops"]).exit_code == 0
    proc, url, _ = start_serve(
        "--db", str(db), "--host", mosquitto.host, "--port", str(mosquitto.port), "--client-id", "serve-rx"
    )
    try:
        wait_for(lambda: "serve-rx 1 checkpoint/v1/+/+/heartbeat" in mosquitto.log_text(), what="serve subscribed")
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=mqtt.MQTTv5)
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        hit = make_hit(person_id="person-77")
        payload = records.hit_payload(records.hit_record(hit, "site-a"), None, None)
        pub.publish("checkpoint/v1/site-a/unit-1/hits", payload, qos=1).wait_for_publish(5)
        pub.loop_stop()
        with httpx.Client(base_url=url) as c:
            login(c, "ops", "ops-password-1")
            wait_for(lambda: hit.id in c.get("/hits/rows").text, what="the hit on the console")
    finally:
        err = stop(proc)
    assert "1 new hits" in err


@pytest.mark.parametrize(
    "args, says",
    [
        (["--tls-cert", __file__], "--tls-key"),
        (["--register", "/nonexistent.sqlite"], "does not exist"),
        (["--trusted-proxy", "proxy.example.org"], "not an IP address or network"),
    ],
)
def test_serve_refuses_bad_options(args, says, tmp_path):
    db = tmp_path / "x.sqlite"
    res = CliRunner().invoke(cli, ["serve", "--no-receiver", "--db", str(db), *args])
    assert res.exit_code == 2 and says in res.output
    assert not db.exists(), "nothing created before the options are checked"


def test_serve_believes_forwarded_addresses_only_from_the_trusted_proxy(tmp_path):
    db = tmp_path / "hits.sqlite"
    pw = tmp_path / "pw"
    pw.write_text("ops-password-1")
    assert CliRunner().invoke(cli, ["user", "add", "--db", str(db), "--password-file", str(pw), "ops"]).exit_code == 0
    proc, url, _ = start_serve("--no-receiver", "--db", str(db), "--trusted-proxy", "127.0.0.0/8")
    try:
        with httpx.Client(base_url=url, headers={"X-Forwarded-For": "198.51.100.7"}) as c:
            login(c, "ops", "ops-password-1")
    finally:
        stop(proc)
    store = HitStore(db)
    try:
        entry = store.audit_entries(limit=1)[0]
    finally:
        store.close()
    assert entry["action"] == "login" and entry["detail"] == '{"address":"198.51.100.7","ok":true}'
