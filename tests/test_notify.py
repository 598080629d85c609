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
