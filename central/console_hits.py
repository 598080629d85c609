"""The console's sightings and hits: the live list with its filters, a hit's page with the decision
panel (the two-person rule: central/review.py), crops, context frames, thumbnails and HQ's photos of the person.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any
from urllib.parse import urlencode

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from central import case_report, review
from central.console_core import ConsoleCore
from central.console_text import qs, visible
from central.register_view import PHOTO_TYPES
from central.review import REVIEW_STATES
from central.store import HitFilter, StoreError
from central.store_sightings import SIGHTING_GAP_S


class HitPages(ConsoleCore):
    """/hits, /hits/rows, /hit, /hit/panel, /hit/decide, /hit/crop, /hit/context, /hit/thumb, /person/photo,
    /sighting/report."""

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
        return review.case_closed(
            self.register, person_id, site, self.store.publications() if publications is None else publications
        )

    def _sighting_rows(self, flt: HitFilter) -> list[dict[str, Any]]:
        rows = self.store.sightings(limit=self.settings.hits_per_page, where=flt)
        people = self.register.people({r["person_id"] for r in rows})
        cameras, zones = self.store.unit_labels()
        late = time.time() - self.settings.overdue_after_s
        # Read once per page or poll, not once per pending row.
        publications = self.store.publications() if any(r["review_state"] == "pending" for r in rows) else {}
        for r in rows:
            r["person"] = people.get(r["person_id"])
            r["camera_name"] = cameras.get((r["site"], r["unit_id"], r["best_camera_id"]))
            r["zone"] = zones.get((r["site"], r["unit_id"]))
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
        # This hit's unit alone: the page and its live panel must not judge the whole fleet per poll.
        where = (hit["site"], hit["unit_id"])
        unit = next(iter(self.store.units(unit=where)), None)
        person = self.register.person(hit["person_id"])
        reviews = self.store.reviews(hit["id"])
        confirmed_by = {r["username"] for r in reviews if r["decision"] == "confirm"}
        sighting = self.store.sighting(hit["sighting_id"])
        if sighting is None:  # purged between the two reads: every stored hit is in a sighting
            raise HTTPException(404, "no such hit")
        closed = self._closed(hit["person_id"], hit["site"]) if sighting["review_state"] == "pending" else None
        cameras, zones = self.store.unit_labels(where)
        camera = cameras.get((*where, hit["camera_id"]))
        zone = zones.get(where)
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
            zone=zone,
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
        return RedirectResponse("/hit?id=" + qs(hit_id), 303)

    def report(self, request: Request) -> Response:
        """A sighting's printable case report (central/case_report.py; `id` a sighting's id or one of
        its hits'), for any logged-in user: entered in the audit chain as `view_report` once per
        opening; the crops, frames and photos inside it are not entered one by one."""
        sess = self.require(request)
        try:
            report = case_report.build(
                self.store, self.register, request.query_params.get("id", ""), actor=sess["username"], via="console"
            )
        except case_report.NoSuchSighting:
            raise HTTPException(404, "no such sighting") from None
        response = self.render(request, "report.html", session=sess, r=report, css=case_report.css())
        # Its images are data: URIs and its style inline (so a saved copy stands alone): allowed here only.
        response.headers["content-security-policy"] = case_report.console_csp()
        return response

    def crop(self, request: Request) -> Response:
        """A hit's crop as opened on its hit page: entered in the audit chain once per session and hit."""
        return self._jpeg(request, audited=True)

    def thumb(self, request: Request) -> Response:
        """A crop as a thumbnail in the sighting list and the sighting's strip: not audited (the list
        refreshes with every hit; an entry per thumbnail buried the decisions), the crop opened on the
        hit page is."""
        return self._jpeg(request, audited=False)

    def context(self, request: Request) -> Response:
        """A hit's context frame (the whole scene, with bystanders), opened on its hit page only: entered
        in the audit chain as `view_context` once per session and hit, like the crop."""
        return self._jpeg(request, audited=True, what="context")

    def _jpeg(self, request: Request, *, audited: bool, what: str = "crop") -> Response:
        sess = self.require(request, page=False)
        hit_id = request.query_params.get("id", "")
        jpeg = self.store.crop(hit_id) if what == "crop" else self.store.context_frame(hit_id)
        if jpeg is None:
            raise HTTPException(404, f"no {what} for this hit")
        key = (sess["token_hash"], what, hit_id)
        if audited and key not in self._crop_views:
            # One entry per session and hit: a reload of the hit page is the same view.
            self.store.audit(sess["username"], f"view_{what}", hit_id, {})
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
