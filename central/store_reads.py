"""What the console and the commands read from the hit store: hits and their crops, the filters'
values, cameras' names, the change marker the console polls, quarantined messages, the units (as the
fleet shows them) and HQ's publications.
"""

from __future__ import annotations

import json
import time
from typing import Any

from central import review
from central.fleet import EXPIRY_WARNING_S, HealthSettings, unit_row
from central.store_core import HitFilter, StoreCore, StoreError
from wire.timezones import is_zone


class ReadStore(StoreCore):
    """Reads for pages and commands (`central.store.HitStore` is one)."""

    def hits(
        self,
        *,
        limit: int | None = 50,
        since: float | None = None,
        review_state: str | None = None,
        newest_first: bool = True,
        where: HitFilter | None = None,
    ) -> list[dict[str, Any]]:
        """Stored hits (without crops), newest first unless asked otherwise."""
        if review_state is not None and review_state not in review.REVIEW_STATES:
            raise StoreError(f"review state must be one of {', '.join(review.REVIEW_STATES)}, got {review_state!r}")
        flt = where or HitFilter()
        if since is not None or review_state is not None:
            flt = HitFilter(**{**flt.__dict__, "since": since, "review_state": review_state})
        clause, args = flt.where()
        order = "received_at DESC, id DESC" if newest_first else "received_at, id"
        sql = f"SELECT * FROM hits{clause} ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [self._hit_row(r) for r in self._read(sql, args)]

    def hit(self, hit_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM hits WHERE id = ?", (hit_id,))
        return self._hit_row(rows[0]) if rows else None

    def resolve_hit_id(self, prefix: str) -> str:
        """The full id of the one hit whose id is `prefix` or starts with it."""
        if not prefix:
            raise StoreError("give a hit id (or the first characters of one)")
        if self._read("SELECT id FROM hits WHERE id = ?", (prefix,)):
            return prefix
        rows = self._read("SELECT id FROM hits WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 3", (len(prefix), prefix))
        if not rows:
            raise StoreError(f"no hit whose id starts with {prefix!r} in {self.location}")
        if len(rows) > 1:
            raise StoreError(
                f"{prefix!r} is the start of several hit ids ({', '.join(r['id'] for r in rows[:2])}, ...): "
                "give more characters"
            )
        return str(rows[0]["id"])

    def crop(self, hit_id: str) -> bytes | None:
        """The face crop JPEG of a hit, or None if it came without one."""
        rows = self._read("SELECT jpeg FROM crops WHERE hit_id = ?", (hit_id,))
        return bytes(rows[0]["jpeg"]) if rows else None

    def context_frame(self, hit_id: str) -> bytes | None:
        """The context frame JPEG of a hit (the whole scene, downscaled), or None if it came without one."""
        rows = self._read("SELECT jpeg FROM context_frames WHERE hit_id = ?", (hit_id,))
        return bytes(rows[0]["jpeg"]) if rows else None

    def count_hits(self, review_state: str | None = None) -> int:
        """How many hits are stored (in this review state, if given)."""
        if review_state is None:
            return int(self._read("SELECT COUNT(*) AS n FROM hits")[0]["n"])
        return int(self._read("SELECT COUNT(*) AS n FROM hits WHERE review_state = ?", (review_state,))[0]["n"])

    def _unit_statuses(self, unit: tuple[str, str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """(site, unit, the `unit` object of its latest heartbeat) of every unit that sent one, or of
        `unit` (site, unit id) alone."""
        out = []
        sql = "SELECT site, unit_id, heartbeat FROM units WHERE heartbeat IS NOT NULL"
        rows = self._read(sql + " AND site = ? AND unit_id = ?", unit) if unit is not None else self._read(sql)
        for row in rows:
            try:
                body = json.loads(row["heartbeat"])
            except ValueError:
                continue
            unit = body.get("unit") if isinstance(body, dict) else None
            if isinstance(unit, dict):
                out.append((row["site"], row["unit_id"], unit))
        return out

    def unit_labels(
        self, unit: tuple[str, str] | None = None
    ) -> tuple[dict[tuple[str, str, str], str], dict[tuple[str, str], str]]:
        """`camera_names` and `unit_zones` from one read of the heartbeats (of `unit` alone, if given):
        a page needs both, and each heartbeat is parsed once."""
        names: dict[tuple[str, str, str], str] = {}
        zones: dict[tuple[str, str], str] = {}
        for site, unit_id, status in self._unit_statuses(unit):
            if is_zone(status.get("timezone")):
                zones[(site, unit_id)] = status["timezone"]
            cameras = status.get("cameras")
            for cam in cameras[:64] if isinstance(cameras, list) else []:
                if not isinstance(cam, dict) or not isinstance(cam.get("id"), str):
                    continue
                parts = [cam.get(k) for k in ("name", "location")]
                label = " · ".join(p.strip()[:80] for p in parts if isinstance(p, str) and p.strip())
                if label:
                    names[(site, unit_id, cam["id"])] = label
        return names, zones

    def camera_names(self) -> dict[tuple[str, str, str], str]:
        """Each camera's name and place as its unit's latest heartbeat gives them ((site, unit, camera
        id) -> "name · location"), each cut to 80 characters; cameras with neither are left out."""
        return self.unit_labels()[0]

    def unit_zones(self) -> dict[tuple[str, str], str]:
        """Each unit's IANA time zone as its latest heartbeat states it (``unit.timezone``), (site, unit)
        -> zone; units that state none, or something that is no zone, are left out (the receiver
        already drops and counts those: `Receiver.stats()['timezones_ignored']`)."""
        return self.unit_labels()[1]

    def distinct(self, column: str) -> list[str]:
        """The values seen in a hit column that the list filters on (person, camera, unit)."""
        if column not in ("person_id", "camera_id", "site", "unit_id"):
            raise StoreError(f"cannot list distinct values of {column!r}")
        return [r["v"] for r in self._read(f"SELECT DISTINCT {column} AS v FROM hits ORDER BY v LIMIT 500")]

    def change_marker(self) -> tuple[Any, ...]:
        """A value that changes when hits arrive, decisions are taken or units report: consoles poll
        it to push live updates, whichever process wrote the change."""
        h = self._read("SELECT COUNT(*) AS n, MAX(received_at) AS t FROM hits")[0]
        r = self._read("SELECT MAX(id) AS n FROM reviews")[0]
        u = self._read("SELECT MAX(state_at) AS s, MAX(last_heartbeat_at) AS b, MAX(last_seen) AS l FROM units")[0]
        return (h["n"], h["t"], r["n"]), (u["s"], u["b"], u["l"])

    def rejects(self) -> list[dict[str, Any]]:
        """The quarantined messages, oldest first: topic, reason, error, payload prefix, payload_bytes."""
        rows = self._read("SELECT * FROM rejects ORDER BY id")
        for r in rows:
            r["payload"] = bytes(r["payload"]) if r["payload"] is not None else None
        return rows

    def count_rejects(self) -> int:
        """How many quarantined messages the rejects table holds."""
        return int(self._read("SELECT COUNT(*) AS n FROM rejects")[0]["n"])

    def latest_rejects(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest `limit` quarantined messages, newest first, without their payloads: id,
        received_at, topic, reason, error, payload_bytes (for the console's quarantine page)."""
        return self._read(
            "SELECT id, received_at, topic, reason, error, payload_bytes FROM rejects ORDER BY id DESC LIMIT ?",
            (int(limit),),
        )

    def units(
        self,
        now: float | None = None,
        expiry_warning_s: float = EXPIRY_WARNING_S,
        settings: HealthSettings | None = None,
        published: dict[str, dict[str, Any]] | None = None,
        unit: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Every unit heard from (or `unit`, (site, unit id), alone), by site and unit, as the fleet
        shows it (central/fleet.py `unit_row`: `health`, `watchlist_state` with `expiry_warning_s`,
        `level` and `reasons`), against HQ's latest list for the unit's site: `published`,
        `publications()` when already read."""
        now = time.time() if now is None else now
        settings = settings or HealthSettings(expiry_warning_s=expiry_warning_s)
        published = self.publications() if published is None else published
        sql = "SELECT * FROM units"
        rows = (
            self._read(sql + " WHERE site = ? AND unit_id = ?", unit)
            if unit
            else self._read(sql + " ORDER BY site, unit_id")
        )
        return [unit_row(row, now, published.get(row["site"]), settings, expiry_warning_s) for row in rows]

    def publications(self) -> dict[str, dict[str, Any]]:
        """HQ's latest watchlist per site, as recorded by `set_publication`: version, published_at
        (HQ's clock), seen_at (when the centre first saw it), topic."""
        return {r["site"]: r for r in self._read("SELECT * FROM watchlist_published")}
