"""The operators' web console: live hits, a hit with its decision panel, the fleet, the audit chain.

Starlette with server-rendered Jinja2 templates; one small script (static/console.js) refreshes
the live parts when the server-sent event stream at /events says something changed. The stream
polls the store, so the console sees hits whichever receiver (or process) stored them.

Security: no page without a session (a random token in an HttpOnly, SameSite=Strict cookie,
Secure over TLS; the store keeps only its SHA-256); every POST carries the session's CSRF token
(the login form a token of its own, double-submitted in a cookie); logins are rate-limited per
(name, address) and per address, and names no account can have are refused before they are looked
up or audited; everything a unit or HQ sent is escaped, and control characters are shown as escapes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import io
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import anyio
import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from central import accounts
from central.audit import Head
from central.fleet import EXPIRY_WARNING_S, read_fleet
from central.register_view import PHOTO_TYPES, RegisterView
from central.review import REVIEW_STATES
from central.store import HitFilter, HitStore, StoreError
from central.store_sightings import SIGHTING_GAP_S

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "cp_session"
LOGIN_COOKIE = "cp_login"
QUARANTINE_ROWS = 200  # the newest quarantined messages the quarantine page lists
URGENT_PRIORITY = 7  # HQ's priorities run 0-9; from 7 a new sighting sounds the urgent alert (as p7-p9 show red)
# Control characters, DEL and C1, and the bidirectional overrides that can make text read backwards.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


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


def visible(value: Any) -> str:
    """Text with control and direction-override characters shown as escapes (\\x1b, \\u202e)."""
    text = "" if value is None else str(value)
    return _INVISIBLE.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text
    )


def utc(ts: float | None) -> str:
    if not ts:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError, TypeError):
        # A stored time no calendar holds (1e300) is shown as such, not a failed page.
        return f"(bad time {visible(ts)[:24]})"


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    s = max(0.0, (time.time() if now is None else now) - ts)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} days ago"


def until(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    s = ts - (time.time() if now is None else now)
    if s <= 0:
        return f"expired {ago(ts, now)}"
    return f"in {s / 3600:.1f} h" if s < 2 * 86400 else f"in {s / 86400:.1f} days"


def duration(seconds: float | None) -> str:
    """A span in words: 45 s, 13 min, 2.5 h."""
    s = max(0.0, float(seconds or 0))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def stranger_words(rate: float) -> str:
    """A hit's calibrated stranger rate (docs/protocol.md) in words, N to 2 significant figures:
    "About 1 in 12,000 faces of people not on the list score this high against someone on it"."""
    tail = "of people not on the list score this high against someone on it"
    if rate * 1.5 >= 1:
        return f"Nearly all faces {tail}"
    # Below this the figure is the calibration's extrapolation far past any measured stranger.
    if rate < 1e-12:
        return f"Fewer than 1 in {10**12:,} faces {tail}"
    return f"About 1 in {float(f'{1 / rate:.2g}'):,.0f} faces {tail}"


def waited(ts: float | None) -> str:
    """How long since `ts`, as a duration."""
    return duration(time.time() - ts) if ts else "-"


def when(ts: float | None) -> Markup:
    """A time as UTC text in a <time> element that console.js gives the browser's local time beside
    (the centre does not know each site's time zone)."""
    text = utc(ts)
    if text.startswith("(") or text == "-":
        return Markup.escape(text)
    iso = dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
    return Markup('<time class="when" datetime="{}">{} UTC</time>').format(iso, text)


def _qs(value: Any) -> str:
    return quote("" if value is None else str(value), safe="")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        visible=visible,
        utc=utc,
        ago=ago,
        until=until,
        q=_qs,
        duration=duration,
        waited=waited,
        when=when,
        stranger_words=stranger_words,
    )
    return env


class Console:
    """The console's state: the store, the register view, sessions' helpers and the rate limit."""

    def __init__(self, store: HitStore, register: RegisterView | None, settings: ConsoleSettings) -> None:
        self.store = store
        self.register = register or RegisterView(None)
        self.settings = settings
        self.env = _environment()
        self.limiter = accounts.LoginLimiter()
        self._crop_views: set[tuple[str, str]] = set()

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
                raise HTTPException(303, headers={"Location": "/login?next=" + _qs(request.url.path)})
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

    # --- pages ------------------------------------------------------------------------------

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
            request, "login.html", status, csrf=token, error=error, next=_safe_next(request), waiting=waiting
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
        resp = RedirectResponse(_safe_next(request, form.get("next")), 303)
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

    def _filter(self, request: Request) -> tuple[HitFilter, dict[str, str]]:
        p = request.query_params
        raw = {k: p.get(k, "").strip() for k in ("state", "person", "unit", "camera", "from", "to")}
        site = unit = None
        if raw["unit"]:
            site, _, unit = raw["unit"].partition("/") if "/" in raw["unit"] else (None, "", raw["unit"])
        state = raw["state"] if raw["state"] in REVIEW_STATES else None
        flt = HitFilter(
            review_state=state,
            person_id=raw["person"] or None,
            site=site or None,
            unit_id=unit or None,
            camera_id=raw["camera"] or None,
            since=_parse_time(raw["from"]),
            until=_parse_time(raw["to"]),
        )
        return flt, raw

    def _closed(self, person_id: str, site: str, publications: dict[str, dict[str, Any]] | None = None) -> str | None:
        """Why the person's case is closed (central.register_view.RegisterView.case_closed), against the
        list HQ last published for `site`; `publications` (HitStore.publications) when already read."""
        published = (self.store.publications() if publications is None else publications).get(site)
        return self.register.case_closed(person_id, published["version"] if published else None)

    def _sighting_rows(self, flt: HitFilter) -> list[dict[str, Any]]:
        rows = self.store.sightings(limit=self.settings.hits_per_page, where=flt)
        people = self.register.people({r["person_id"] for r in rows})
        cameras = self.store.camera_names()
        late = time.time() - self.settings.overdue_after_s
        # Read once per page or poll, not once per pending row.
        publications = self.store.publications() if any(r["review_state"] == "pending" for r in rows) else {}
        for r in rows:
            r["person"] = people.get(r["person_id"])
            r["camera_name"] = cameras.get((r["site"], r["unit_id"], r["best_camera_id"]))
            r["overdue"] = r["review_state"] == "pending" and r["created_at"] < late
            pending = r["review_state"] == "pending"
            r["closed"] = self._closed(r["person_id"], r["site"], publications) if pending else None
        return rows

    def _rows_context(self, request: Request) -> dict[str, Any]:
        flt, raw = self._filter(request)
        return dict(sightings=self._sighting_rows(flt), f=raw, overdue_after=self.settings.overdue_after_s)

    def hits_page(self, request: Request) -> Response:
        sess = self.require(request)
        return self.render(
            request, "hits.html", session=sess, states=REVIEW_STATES, gap=SIGHTING_GAP_S, **self._rows_context(request)
        )

    def hits_rows(self, request: Request) -> Response:
        self.require(request, page=False)
        return self.render(request, "_hit_rows.html", **self._rows_context(request))

    def _hit_context(self, request: Request, sess: dict[str, Any]) -> dict[str, Any]:
        hit_id = request.query_params.get("id", "")
        hit = self.store.hit(hit_id)
        if hit is None:
            raise HTTPException(404, "no such hit")
        unit = next((u for u in self.store.units() if (u["site"], u["unit_id"]) == (hit["site"], hit["unit_id"])), None)
        person = self.register.person(hit["person_id"])
        reviews = self.store.reviews(hit["id"])
        confirmed_by = {r["username"] for r in reviews if r["decision"] == "confirm"}
        sighting = self.store.sighting(hit["sighting_id"])
        closed = self._closed(hit["person_id"], hit["site"]) if sighting["review_state"] == "pending" else None
        camera = self.store.camera_names().get((hit["site"], hit["unit_id"], hit["camera_id"]))
        return dict(
            session=sess,
            hit=hit,
            unit=unit,
            person=person,
            reviews=reviews,
            confirmed_by=confirmed_by,
            sighting=sighting,
            others=[h for h in self.store.sighting_hits(sighting["id"]) if h["id"] != hit["id"]][:24],
            closed=closed,
            camera_name=camera,
        )

    def hit_page(self, request: Request) -> Response:
        sess = self.require(request)
        return self.render(request, "hit.html", error=None, **self._hit_context(request, sess))

    def hit_panel(self, request: Request) -> Response:
        sess = self.require(request, page=False)
        return self.render(request, "_decision.html", error=None, **self._hit_context(request, sess))

    async def decide(self, request: Request) -> Response:
        sess = await anyio.to_thread.run_sync(lambda: self.require(request))
        form = await self.form(request, sess)
        hit_id, decision = form.get("id", ""), form.get("decision", "")
        try:
            hit = await anyio.to_thread.run_sync(self.store.hit, hit_id)
            closed = await anyio.to_thread.run_sync(self._closed, hit["person_id"], hit["site"]) if hit else None
            await anyio.to_thread.run_sync(
                lambda: self.store.decide(hit_id, sess["username"], decision, form.get("reason"), closed=closed)
            )
        except StoreError as e:
            ctx = await anyio.to_thread.run_sync(self._hit_context, _with_query(request, hit_id), sess)
            return self.render(request, "hit.html", 409, error=str(e), **ctx)
        return RedirectResponse("/hit?id=" + _qs(hit_id), 303)

    def crop(self, request: Request) -> Response:
        """A hit's crop as opened on its hit page: entered in the audit chain once per session and hit."""
        return self._jpeg(request, audited=True)

    def thumb(self, request: Request) -> Response:
        """A crop as a thumbnail in the sighting list and the sighting's strip: not audited (the list
        refreshes with every hit; an entry per thumbnail buried the decisions), the crop opened on the
        hit page is."""
        return self._jpeg(request, audited=False)

    def _jpeg(self, request: Request, *, audited: bool) -> Response:
        sess = self.require(request, page=False)
        hit_id = request.query_params.get("id", "")
        jpeg = self.store.crop(hit_id)
        if jpeg is None:
            raise HTTPException(404, "no crop for this hit")
        key = (sess["token_hash"], hit_id)
        if audited and key not in self._crop_views:
            # One entry per session and hit: a reload of the hit page is the same view.
            self.store.audit(sess["username"], "view_crop", hit_id, {})
            if len(self._crop_views) > 100_000:
                self._crop_views.clear()
            self._crop_views.add(key)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})

    def photo(self, request: Request) -> Response:
        self.require(request, page=False)
        person = self.register.person(request.query_params.get("person", ""))
        try:
            path = person.photos[int(request.query_params.get("n", ""))] if person else None
        except (ValueError, IndexError):
            path = None
        if path is None:
            raise HTTPException(404, "no such photo")
        return Response(
            path.read_bytes(), media_type=PHOTO_TYPES[path.suffix.lower()], headers={"Cache-Control": "private"}
        )

    def fleet_page(self, request: Request) -> Response:
        sess = self.require(request)
        return self.render(request, "fleet.html", session=sess, quarantined=self.store.count_rejects(), **self._fleet())

    def fleet_rows(self, request: Request) -> Response:
        self.require(request, page=False)
        return self.render(request, "_fleet_rows.html", **self._fleet())

    def _fleet(self) -> dict[str, Any]:
        fleet = read_fleet(self.store, self.settings.expiry_warning_s)
        return {"units": fleet.units, "problems": fleet.problems}

    def quarantine_page(self, request: Request) -> Response:
        """Supervisors: the messages the receivers quarantined (refused hits among them), newest first,
        with the reason and the receiver's sentence; the units keep refused hits with the same reason."""
        sess = self.require(request, role="supervisor")
        return self.render(
            request,
            "quarantine.html",
            session=sess,
            rejects=self.store.latest_rejects(QUARANTINE_ROWS),
            total=self.store.count_rejects(),
            shown=QUARANTINE_ROWS,
        )

    def audit_page(self, request: Request) -> Response:
        sess = self.require(request, role="supervisor")
        verdict = self.store.verify_audit()
        head = Head(verdict.entries, verdict.head)
        return self.render(
            request, "audit.html", session=sess, entries=self.store.audit_entries(), verdict=verdict, head=head
        )

    async def audit_export(self, request: Request) -> Response:
        sess = await anyio.to_thread.run_sync(lambda: self.require(request, role="supervisor"))
        await self.form(request, sess)
        return await self._download(request, sess, "audit")

    async def hits_export(self, request: Request) -> Response:
        sess = await anyio.to_thread.run_sync(lambda: self.require(request, role="supervisor"))
        form = await self.form(request, sess)
        return await self._download(request, sess, "hits-csv" if form.get("format") == "csv" else "hits")

    async def _download(self, request: Request, sess: dict[str, Any], what: str) -> Response:
        buf = io.StringIO()
        actor = sess["username"]
        if what == "audit":
            await anyio.to_thread.run_sync(lambda: self.store.export_audit_jsonl(buf, actor=actor))
        elif what == "hits-csv":
            await anyio.to_thread.run_sync(lambda: self.store.export_csv(buf, actor=actor))
        else:
            await anyio.to_thread.run_sync(lambda: self.store.export_jsonl(buf, actor=actor))
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        if what == "hits-csv":
            name, ext, media = "hits", "csv", "text/csv"
        else:
            name, ext, media = what, "jsonl", "application/x-ndjson"
        return Response(
            buf.getvalue(),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="checkpoint-{name}-{stamp}.{ext}"'},
        )

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

    def home(self, request: Request) -> Response:
        self.require(request)
        return RedirectResponse("/hits", 303)


def _parse_time(text: str) -> float | None:
    if not text:
        return None
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            continue
    raise HTTPException(400, f"cannot read the time {visible(text)!r}: use YYYY-MM-DDTHH:MM (UTC)")


def _safe_next(request: Request, value: Any = None) -> str:
    target = str(value if value is not None else request.query_params.get("next", "/hits"))
    # Only paths on this site: no scheme, no host, no protocol-relative //.
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/hits"
    return target


def _with_query(request: Request, hit_id: str) -> Request:
    scope = dict(request.scope)
    scope["query_string"] = urlencode({"id": hit_id}).encode()
    return Request(scope)


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
                headers += _SECURITY_HEADERS
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
        Route("/hit/thumb", console.thumb),
        Route("/hit/decide", console.decide, methods=["POST"]),
        Route("/person/photo", console.photo),
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
