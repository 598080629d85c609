"""Run the console's ASGI app under uvicorn, in the foreground (`serve`) or in a thread (tests,
screenshots, the demo)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    """The console's web server could not start."""


def check_trusted_proxies(proxies: Sequence[str]) -> list[str]:
    """The proxy addresses or networks (`10.0.0.5`, `10.0.0.0/24`, `::1`) as uvicorn takes them;
    ServerError naming any that is not one."""
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ServerError(
                f"--trusted-proxy {proxy!r} is not an IP address or network: name the proxy in front of "
                "the console (e.g. 127.0.0.1 or 10.0.0.0/24)"
            ) from None
    return list(proxies)


def make_server(
    app: Any,
    host: str,
    port: int,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    trusted_proxies: Sequence[str] = (),
    log_level: str = "warning",
) -> Any:
    """A uvicorn server for `app`; TLS when a certificate and key are given. X-Forwarded-For and
    X-Forwarded-Proto are believed only from `trusted_proxies` (addresses or networks); with none,
    the client is always the peer of the connection."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ServerError("give both --tls-cert and --tls-key (or neither)")
    trusted = check_trusted_proxies(trusted_proxies)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        # uvicorn believes forwarded headers from 127.0.0.1 unless told otherwise: anyone on the
        # console's host could then claim any client address and slip past the login limit.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted,
        # Event streams stay open; they must not hold a shutdown for long.
        timeout_graceful_shutdown=1,
        access_log=False,
        server_header=False,
    )
    return uvicorn.Server(config)


class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port: `url`, `stop()`."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"{'https' if tls_cert else 'http'}://{host}:{port}"
        self.server = make_server(app, host, port, tls_cert=tls_cert, tls_key=tls_key, trusted_proxies=trusted_proxies)
        self.thread = threading.Thread(target=self.server.run, name="console-http", daemon=True)

    def start(self, timeout: float = 15.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServerError(f"the console did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
