"""The console's fleet, quarantine and audit pages, and the supervisors' exports (the audit chain,
the hits as JSON lines or CSV), each entered in the audit chain.
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from central.audit import Head
from central.console_core import ConsoleCore
from central.fleet import read_fleet

QUARANTINE_ROWS = 200  # the newest quarantined messages the quarantine page lists


class AdminPages(ConsoleCore):
    """/fleet, /fleet/rows, /quarantine, /audit, /audit/export, /hits/export."""

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
