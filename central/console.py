"""The operators' web console: live hits, a hit with its decision panel, the fleet, the audit chain.

Starlette with server-rendered Jinja2 templates; one small script (static/console.js) refreshes
the live parts when the server-sent event stream at /events says something changed. The stream
polls the store, so the console sees hits whichever receiver (or process) stored them.

Security: no page without a session (a random token in an HttpOnly, SameSite=Strict cookie,
Secure over TLS; the store keeps only its SHA-256); every POST carries the session's CSRF token
(the login form a token of its own, double-submitted in a cookie); logins are rate-limited per
(name, address) and per address, and names no account can have are refused before they are looked
up or audited; everything a unit or HQ sent is escaped, and control characters are shown as escapes.

`Console` is its page groups, one module each: `console_login` (login, logout), `console_hits`
(sightings, a hit and its decision, crops and context frames, a sighting's case report), `console_admin` (fleet, quarantine, audit, exports),
all over `console_core` (settings, rendering, sessions, forms); `console_text` writes values for
people. This module adds the event stream, the security headers and the routes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from central.console_admin import AdminPages
from central.console_core import ConsoleSettings
from central.console_hits import HitPages
from central.console_login import LoginPages
from central.register_view import RegisterView
from central.store import HitStore

HERE = Path(__file__).resolve().parent


class Console(LoginPages, HitPages, AdminPages):
    """The console: every page group over one store, register and settings; the event stream that
    tells open pages when something changed."""

    async def events(self, request: Request) -> Response:
        sess = await anyio.to_thread.run_sync(lambda: self.require(request, page=False))
        return StreamingResponse(self._event_stream(request, sess), media_type="text/event-stream")

    async def _event_stream(self, request: Request, sess: dict[str, Any]) -> AsyncIterator[str]:
        last_hits, last_units = await anyio.to_thread.run_sync(self.store.change_marker)
        last_units_sent = last_session = time.monotonic()
        last_desk = await anyio.to_thread.run_sync(self.desk)
        # An open page keeps its session alive (up to the session's absolute limit): the stream
        # touches it well within the idle timeout, so the first hit after a quiet hour refreshes the
        # list instead of turning the page into the login form.
        touch_every = max(self.settings.poll_s, min(30.0, self.settings.session_idle_s / 4))
        # ... and looks again the moment the session's absolute limit passes, to send the page away.
        expires = float(sess["expires_at"])
        yield "retry: 1000\n\n"
        yield f"event: desk\ndata: {json.dumps(last_desk)}\n\n"
        while not await request.is_disconnected():
            await asyncio.sleep(self.settings.poll_s)
            if time.monotonic() - last_session >= touch_every or time.time() >= expires:
                last_session = time.monotonic()
                alive = await anyio.to_thread.run_sync(
                    self.store.session, sess["token_hash"], self.settings.session_idle_s
                )
                if alive is None:
                    # Ended (its absolute limit, logout, password change): the page goes to the login.
                    yield "event: ended\ndata: {}\n\n"
                    return
            hits, units = await anyio.to_thread.run_sync(self.store.change_marker)
            desk = await anyio.to_thread.run_sync(self.desk)
            if hits != last_hits or desk["overdue"] != last_desk["overdue"]:
                # A sighting turning overdue changes its row: the list refreshes as for a new hit.
                last_hits = hits
                yield f"event: hits\ndata: {json.dumps({'at': time.time()})}\n\n"
            if desk != last_desk:
                last_desk = desk
                yield f"event: desk\ndata: {json.dumps(desk)}\n\n"
            # Health turns stale with time alone, so the fleet is refreshed now and then as well.
            if units != last_units or time.monotonic() - last_units_sent > 10:
                last_units, last_units_sent = units, time.monotonic()
                yield f"event: units\ndata: {json.dumps({'at': time.time()})}\n\n"


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):
        raise exc
    if exc.status_code in (301, 302, 303, 307) and exc.headers:
        return Response(status_code=exc.status_code, headers=exc.headers)
    body = f"<!doctype html><title>{exc.status_code}</title><p>{Markup.escape(exc.detail)}</p>"
    return HTMLResponse(body, status_code=exc.status_code, headers=exc.headers)


_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
        b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class _SecurityHeaders:
    """Adds the security headers to every response, and answers a request whose address holds a
    NUL (%00) with 400 before it reaches a page."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                # A page that states its own policy (the case report) keeps it; two would both apply.
                own = {name.lower() for name, _ in headers} & {b"content-security-policy"}
                headers += [h for h in _SECURITY_HEADERS if h[0] not in own]
                if not scope["path"].startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        if b"%00" in scope.get("query_string", b""):
            # No id, filter or name holds a NUL, and PostgreSQL refuses one in any text it is asked
            # to compare (a 500); the SQLite store would just find nothing.
            bad = HTMLResponse("<!doctype html><title>400</title><p>a NUL character (%00) in the address</p>", 400)
            return await bad(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def create_app(
    store: HitStore, *, register: RegisterView | None = None, settings: ConsoleSettings | None = None
) -> Any:
    """The console as an ASGI app on `store` (the caller owns and closes the store)."""
    console = Console(store, register, settings or ConsoleSettings())
    routes = [
        Route("/", console.home),
        Route("/login", console.login_page, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/hits", console.hits_page),
        Route("/hits/rows", console.hits_rows),
        Route("/hits/export", console.hits_export, methods=["POST"]),
        Route("/hit", console.hit_page),
        Route("/hit/panel", console.hit_panel),
        Route("/hit/crop", console.crop),
        Route("/hit/context", console.context),
        Route("/hit/thumb", console.thumb),
        Route("/hit/decide", console.decide, methods=["POST"]),
        Route("/person/photo", console.photo),
        Route("/sighting/report", console.report),
        Route("/fleet", console.fleet_page),
        Route("/fleet/rows", console.fleet_rows),
        Route("/quarantine", console.quarantine_page),
        Route("/audit", console.audit_page),
        Route("/audit/export", console.audit_export, methods=["POST"]),
        Route("/events", console.events),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.console = console
    return _SecurityHeaders(app)
