"""The console's login and logout: the login form (with a CSRF token of its own, double-submitted in a
cookie), rate-limited logins, the session cookie, and the way home.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from central import accounts
from central.console_core import LOGIN_COOKIE, SESSION_COOKIE, ConsoleCore


class LoginPages(ConsoleCore):
    """/login, /logout and /."""

    def login_page(self, request: Request) -> Response:
        if self.session(request) is not None:
            return RedirectResponse("/hits", 303)
        return self._login_form(request)

    def _login_form(self, request: Request, error: str | None = None, status: int = 200) -> Response:
        token = secrets.token_urlsafe(24)
        waiting = None
        old = request.cookies.get(SESSION_COOKIE)
        if old and self.store.session_owner(accounts.token_hash(old)):
            # Only a browser whose session just ended learns how many sightings wait, not anyone who
            # can reach the login page.
            waiting = self.store.desk(self.settings.overdue_after_s)
        resp = self.render(
            request, "login.html", status, csrf=token, error=error, next=safe_next(request), waiting=waiting
        )
        resp.set_cookie(
            LOGIN_COOKIE, token, max_age=1800, httponly=True, samesite="strict", secure=self.secure(request), path="/"
        )
        return resp

    async def login(self, request: Request) -> Response:
        form = await request.form()
        token, cookie = str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "")
        if not token or not cookie or not hmac.compare_digest(token, cookie):
            raise HTTPException(403, "missing or wrong CSRF token: reload the login page and try again")
        username, password = str(form.get("username", "")), str(form.get("password", ""))
        # The peer, or with `serve --trusted-proxy` the client a trusted proxy forwarded for.
        address = request.client.host if request.client else "?"
        # A name no account can have (1 MB, a NUL, a direction override) is neither looked up (a NUL
        # breaks PostgreSQL) nor entered in the audit chain; why it was refused is, and the answer is
        # the usual failure, so the form tells nothing more.
        refused = accounts.username_problem(username)
        name = None if refused else username
        user = None if refused else await anyio.to_thread.run_sync(self.store.user, username)
        generation = user["changed_at"] if user else None
        wait = self.limiter.retry_after(name, address, generation)
        if wait > 0:
            return self._login_form(request, f"too many failed logins: try again in {wait:.0f} s", 429)
        ok = await anyio.to_thread.run_sync(accounts.check_login, user, password)
        detail: dict[str, Any] = {"address": address, "ok": ok}
        if refused:
            detail["name_refused"] = refused
        await anyio.to_thread.run_sync(self.store.audit, name or "?", "login", None, detail)
        if not ok:
            self.limiter.failed(name, address, generation)
            return self._login_form(request, "wrong user name or password, or the account is disabled", 401)
        self.limiter.succeeded(username, address)
        session_token, digest = accounts.new_token()
        await anyio.to_thread.run_sync(
            self.store.create_session, digest, username, secrets.token_urlsafe(24), self.settings.session_ttl_s
        )
        resp = RedirectResponse(safe_next(request, form.get("next")), 303)
        resp.set_cookie(
            SESSION_COOKIE,
            session_token,
            # The cookie outlives the session by an hour (the store refuses it from the session's end):
            # the login page it then lands on can tell its owner how many sightings wait.
            max_age=int(self.settings.session_ttl_s) + 3600,
            httponly=True,
            samesite="strict",
            secure=self.secure(request),
            path="/",
        )
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    async def logout(self, request: Request) -> Response:
        sess = await anyio.to_thread.run_sync(lambda: self.require(request))
        await self.form(request, sess)
        await anyio.to_thread.run_sync(self.store.end_session, sess["token_hash"])
        await anyio.to_thread.run_sync(self.store.audit, sess["username"], "logout", None, {})
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    def home(self, request: Request) -> Response:
        self.require(request)
        return RedirectResponse("/hits", 303)


def safe_next(request: Request, value: Any = None) -> str:
    target = str(value if value is not None else request.query_params.get("next", "/hits"))
    # Only paths on this site: no scheme, no host, no protocol-relative //, nothing that could end
    # the Location header.
    if not target.startswith("/") or target.startswith("//") or "\\" in target or not target.isprintable():
        return "/hits"
    return target
