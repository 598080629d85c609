"""Run the console's ASGI app under uvicorn, in the foreground (`serve`) or in a thread (tests,
screenshots, the demo)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    """The console's web server could not start."""


def make_server(
    app: Any,
    host: str,
    port: int,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    log_level: str = "warning",
) -> Any:
    """A uvicorn server for `app`; TLS when a certificate and key are given."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ServerError("give both --tls-cert and --tls-key (or neither)")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
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
    ) -> None:
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"{'https' if tls_cert else 'http'}://{host}:{port}"
        self.server = make_server(app, host, port, tls_cert=tls_cert, tls_key=tls_key)
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
