"""Exports of the hit store: hits oldest first with their sighting's decisions, as JSON lines (crops
as base64 if asked) or CSV safe to open in a spreadsheet; each export is entered in the audit chain.
"""

from __future__ import annotations

import base64
import csv
import json
from typing import IO, Any

from central.store_audit import AuditStore, iso_time
from central.store_reads import ReadStore
from central.store_sightings import SightingStore

EXPORT_CSV_COLUMNS = (
    "id",
    "sighting_id",
    "site",
    "unit_id",
    "camera_id",
    "person_id",
    "captured_at",
    "received_at",
    "score",
    "threshold",
    "margin",
    "model_id",
    "watchlist_version",
    "signature",
    "review_state",
    "decisions",
)
_TIME_FIELDS = ("captured_at", "queued_at", "received_at", "reviewed_at", "at")


def _iso_times(row: dict[str, Any]) -> dict[str, Any]:
    return {k: iso_time(v) if k in _TIME_FIELDS else v for k, v in row.items()}


def _csv_cell(value: Any) -> Any:
    # Ids and reasons come from units and operators: a cell starting with = + - @ would run as a
    # formula in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


class ExportStore(ReadStore, SightingStore, AuditStore):
    """Exports (`central.store.HitStore` is one): the hits read, their sighting's decisions, the audit entry."""

    def export_jsonl(
        self, fh: IO[str], *, since: float | None = None, with_crops: bool = False, actor: str | None = None
    ) -> int:
        """Write hits oldest first, one JSON object per line, with their sighting's decisions; times
        as ISO 8601 UTC (`captured_at`, `queued_at`, `received_at`, `reviewed_at`, a review's `at`);
        crops (and context frames) as base64 if asked. The export is entered in the audit chain as `actor`'s. Returns the
        count."""
        n = 0
        for row in self.hits(limit=None, since=since, newest_first=False):
            row = _iso_times(row)
            row["reviews"] = [_iso_times(r) for r in self.reviews(row["id"])]
            if with_crops:
                crop = self.crop(row["id"])
                row["crop_jpeg_b64"] = base64.b64encode(crop).decode("ascii") if crop else None
                context = self.context_frame(row["id"]) if row["has_context"] else None
                row["context_jpeg_b64"] = base64.b64encode(context).decode("ascii") if context else None
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
            n += 1
        if actor:
            self.audit(actor, "export", None, {"what": "hits", "count": n, "since": since, "with_crops": with_crops})
        return n

    def export_csv(self, fh: IO[str], *, since: float | None = None, actor: str | None = None) -> int:
        """Write hits oldest first as CSV (a header, then one row per hit; EXPORT_CSV_COLUMNS), times as
        ISO 8601 UTC, the sighting's decisions in one cell (`who decision at: reason; ...`). Cells a
        spreadsheet would run as a formula (=, +, -, @ first) are quoted with a leading '. The export is
        entered in the audit chain as `actor`'s. Returns the count."""
        out = csv.writer(fh)
        out.writerow(EXPORT_CSV_COLUMNS)
        n = 0
        for row in self.hits(limit=None, since=since, newest_first=False):
            row = _iso_times(row)
            row["decisions"] = "; ".join(
                f"{r['username']} {r['decision']} {r['at']}" + (f": {r['reason']}" if r["reason"] else "")
                for r in (_iso_times(r) for r in self.reviews(row["id"]))
            )
            out.writerow([_csv_cell(row.get(c)) for c in EXPORT_CSV_COLUMNS])
            n += 1
        if actor:
            self.audit(actor, "export", None, {"what": "hits", "format": "csv", "count": n, "since": since})
        return n
