"""What every page of the console stands on: its settings, the store and HQ's register, rendering
(with the header's live desk line), sessions (who is logged in, what a page requires) and POSTed
forms checked against the session's CSRF token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse

from central import accounts
from central.console_text import environment, qs
from central.fleet import EXPIRY_WARNING_S
from central.register_view import RegisterView
from central.store import HitStore

SESSION_COOKIE = "cp_session"
LOGIN_COOKIE = "cp_login"
URGENT_PRIORITY = 7  # HQ's priorities run 0-9; from 7 a new sighting sounds the urgent alert (as p7-p9 show red)


@dataclass
class ConsoleSettings:
    """How the console behaves: session lifetime and idle timeout, cookie security, how often the
    event stream looks for changes, how long before expiry a unit's watchlist is flagged."""

    session_ttl_s: float = 12 * 3600.0
    session_idle_s: float = 3600.0
    secure_cookies: bool | None = None  # None: Secure when the request came over TLS
    poll_s: float = 0.5
    expiry_warning_s: float = EXPIRY_WARNING_S
    hits_per_page: int = 100
    # A sighting pending longer than this since its first hit arrived is marked and counted as
    # overdue: the desk's escalation (Genetec and XProtect escalate an unacknowledged alarm likewise).
    overdue_after_s: float = 300.0
    # An operator whose console page was open within this long is on duty (an open page keeps its
    # session's last_seen fresh at least every 30 s).
    on_duty_s: float = 120.0


class ConsoleCore:
    """The console's state: the store, the register view, sessions' helpers and the rate limit. The
    page groups (central/console_*.py) extend it; `central.console.Console` is all of them."""

    def __init__(self, store: HitStore, register: RegisterView | None, settings: ConsoleSettings) -> None:
        self.store = store
        self.register = register or RegisterView(None)
        self.settings = settings
        self.env = environment()
        self.limiter = accounts.LoginLimiter()
        self._crop_views: set[tuple[str, str, str]] = set()  # (session, crop or context, hit) viewed

    # --- rendering and sessions -----------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        if context.get("session") and "desk" not in context:
            # The header's live desk line: pending and overdue sightings, who is on duty.
            context["desk"] = self.desk()
            context["on_duty"] = self.store.on_duty(self.settings.on_duty_s)
        html = self.env.get_template(name).render(request=request, **context)
        return HTMLResponse(html, status_code=status)

    def desk(self) -> dict[str, Any]:
        """What waits (central.store.HitStore.desk), with the newest pending sighting's priority (from
        HQ's register) so the page can sound louder for an urgent case."""
        desk = self.store.desk(self.settings.overdue_after_s)
        person = self.register.people({desk["newest_person"]}) if desk["newest_person"] else {}
        priority = person[desk["newest_person"]].priority if desk["newest_person"] in person else None
        desk["urgent"] = priority is not None and priority >= URGENT_PRIORITY
        del desk["newest_person"]  # never sent to the page: the stream carries counts and an id only
        return desk

    def secure(self, request: Request) -> bool:
        if self.settings.secure_cookies is not None:
            return self.settings.secure_cookies
        return request.url.scheme == "https"

    def session(self, request: Request) -> dict[str, Any] | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        return self.store.session(accounts.token_hash(token), self.settings.session_idle_s)

    def require(self, request: Request, *, page: bool = True, role: str | None = None) -> dict[str, Any]:
        """The session, or a redirect to the login page (pages) / 401 (fragments, images, events)."""
        sess = self.session(request)
        if sess is None:
            if page:
                # The whole address, query too: a hit or report link opened after the session ended
                # leads back to that hit after the login, not to a page without its id.
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                raise HTTPException(303, headers={"Location": "/login?next=" + qs(here)})
            raise HTTPException(401, "log in first")
        if role is not None and sess["role"] != role:
            raise HTTPException(403, f"this page is for {role}s")
        return sess

    async def form(self, request: Request, sess: dict[str, Any]) -> dict[str, str]:
        """The POSTed form, after checking its CSRF token against the session's."""
        form = await request.form()
        token = str(form.get("csrf", ""))
        if not token or not hmac.compare_digest(token, sess["csrf"]):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        values = {k: str(v) for k, v in form.items()}
        if any("\x00" in v for v in values.values()):
            # PostgreSQL refuses a NUL in text; the SQLite store would keep it. Neither is wanted.
            raise HTTPException(400, "a NUL character cannot be stored: remove it and send again")
        return values
