"""sd_notify messages reach a real unix datagram socket, as systemd would receive them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.notify import Notifier


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_watchdog_stopping(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(environ={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("2 cameras\nup")
    assert received(sock) == {"READY": "1", "STATUS": "2 cameras up"}
    assert n.status("analysing 10.0 fps")
    assert received(sock) == {"STATUS": "analysing 10.0 fps"}
    assert n.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}
    assert n.stopping("bye")
    assert received(sock) == {"STOPPING": "1", "STATUS": "bye"}
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"checkpoint-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        n = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert received(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_without_systemd_nothing_is_sent() -> None:
    n = Notifier(environ={})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and n.watchdog_interval is None


def test_missing_socket_is_reported_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert not n.ready()
    assert not n.watchdog()
    assert sum("cannot send systemd notification" in r.message for r in caplog.records) == 1


def test_watchdog_interval_is_half_the_timeout_for_this_process_only() -> None:
    mine = Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == pytest.approx(15.0)
    other = Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    assert Notifier(environ={"WATCHDOG_USEC": "junk"}).watchdog_interval is None


REPO = Path(__file__).resolve().parents[1]
UNIT_FILE = REPO / "systemd" / "checkpoint-edge.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_file_is_a_hardened_notify_service() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and int(s["WatchdogSec"][0]) >= 10 and s["Restart"] == ["on-failure"]
    assert "video" in s["SupplementaryGroups"][0].split()
    assert s.get("User") or s.get("DynamicUser") == ["yes"]
    for key, value in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "checkpoint"),
        ("KillSignal", "SIGTERM"),
    ]:
        assert s.get(key) == [value], key
    start = s["ExecStart"][0].split()
    assert start[0].endswith("/edge") and start[1:3] == ["run", "--config"]
    check = s["ExecStartPre"][0].split()
    assert check[1:] == ["check-config", start[3]], "the config checked before start is the one run"
    # A config error (exit 2 from edge run) must not make systemd restart in a loop.
    assert "2" in s["RestartPreventExitStatus"][0].split()


def test_unit_file_passes_systemd_analyze() -> None:
    import shutil
    import subprocess

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("needs systemd-analyze (package systemd)")
    out = subprocess.run([tool, "verify", str(UNIT_FILE)], capture_output=True, text=True, timeout=60)
    problems = [
        x
        for x in (out.stdout + out.stderr).splitlines()
        if x.strip() and "is not executable" not in x and "No such file" not in x
    ]
    assert not problems, problems
