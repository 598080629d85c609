"""systemd service notifications (sd_notify): READY, STATUS, WATCHDOG, STOPPING.

The protocol is one datagram of ``KEY=value`` lines to the unix socket named by
``$NOTIFY_SOCKET``; writing it directly needs no library. Outside systemd the
variable is unset and every call does nothing, so the daemon runs the same way
from a shell.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the service manager, if there is one."""

    def __init__(self, socket_path: str | None = None, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace (Linux), spelled with a NUL byte.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        self._watchdog_usec = _watchdog_usec(env)
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``$NOTIFY_SOCKET`` was set)."""
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG pings the manager expects (half its timeout), or None if it expects none."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1e6 / 2.0

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in one message; return True if it was sent."""
        if not self.enabled or not fields:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # Notifications are advisory; a broken socket must not stop the unit. Say so once.
            if not self._failed:
                log.warning("cannot send systemd notification to %r: %s", self._address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell the manager start-up finished (Type=notify services are 'activating' until then)."""
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = _one_line(status)
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        """Tell the manager the service is alive (resets the WatchdogSec timer)."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell the manager a clean shutdown started."""
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = _one_line(status)
        return self.notify(**fields)

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _watchdog_usec(env: os._Environ[str] | dict[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    # The manager may set the variables for a parent process; they are ours only if the pid matches.
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    return usec if usec > 0 else None
