"""Sightings in the hit store: hits of one person at one unit close together in time, grouped as they
are stored (`group_sightings`), read as the operators' list, and decided as one under the two-person
rule (`central/review.py` says what a decision may do; `SightingStore.decide` records it).
"""

from __future__ import annotations

import time
from typing import Any

from central import review
from central.store_core import HitFilter, Runner, StoreCore, StoreError, chunks

SIGHTING_GAP_S = 300.0
"""A hit joins a sighting of the same person at the same unit when it was captured within this long
of the sighting's span: one person lingering in view gave 19 hits in 13 minutes, a few tens of
seconds apart, and each asked two operators. Five minutes chains those and a tracker losing and
finding the face again, while someone passing the same unit an hour later is asked about again."""
SIGHTING_TRACK_S = 1800.0
"""A hit on the camera and track of a sighting's latest hit continues it up to this long after it:
the tracker held the face the whole time (track ids restart with the unit, hence a limit)."""


def group_sightings(q: Runner, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put each newly stored hit into a sighting (SIGHTING_GAP_S, SIGHTING_TRACK_S), oldest capture
    first: the open sighting of its person at its unit that it falls into, or a new one named by
    the hit. A hit joining a decided sighting takes its decision; a rejection covers only the
    faces the operator saw, so a hit scoring above the best of them starts a new sighting. A hit
    that continues two or more pending sightings joins them into one (`_merge`); one that
    continues a pending and a decided sighting joins the pending one, so it is asked about, and the
    decided one stays as decided. Returns the merges, for the audit chain: the sighting kept, those
    merged into it, the hit that joined them and the hits the sighting holds now. The caller holds
    the audit lock (receivers sharing a database group one at a time)."""
    if not rows:
        return []
    keys = {(r["site"], r["unit_id"], r["person_id"]) for r in rows}
    low = min(r["captured_at"] for r in rows) - max(SIGHTING_GAP_S, SIGHTING_TRACK_S)
    high = max(r["captured_at"] for r in rows) + SIGHTING_GAP_S
    known: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key in keys:
        known[key] = q(
            "SELECT * FROM sightings WHERE site = ? AND unit_id = ? AND person_id = ? AND last_at >= ? "
            "AND first_at <= ?",
            (*key, low, high),
        )
    new_ids: set[str] = set()
    changed: dict[str, dict[str, Any]] = {}
    merged_into: dict[str, str] = {}  # a sighting merged away -> the one that holds its hits now
    merges: list[dict[str, Any]] = []
    placed: list[tuple[str, str]] = []  # hit id, sighting id
    for row in sorted(rows, key=lambda r: (r["captured_at"], r["id"])):
        found = known[(row["site"], row["unit_id"], row["person_id"])]
        joins = [s for s in found if _continues(s, row)]
        # Never silently into a decided sighting while a pending one would take the hit: asked about
        # there, it cannot be confirmed or rejected by a decision taken on other faces.
        pending = [s for s in joins if s["review_state"] == "pending"]
        joins = pending or joins
        if len(pending) > 1:
            kept = _merge(q, pending, new_ids)
            if kept is not None:
                for gone in pending:
                    if gone is not kept:
                        found.remove(gone)
                        changed.pop(gone["id"], None)
                        merged_into[gone["id"]] = kept["id"]
                merges.append(
                    {
                        "kept": kept["id"],
                        "merged": sorted(s["id"] for s in pending if s is not kept),
                        "hit": row["id"],
                    }
                )
                joins = [kept]
        if joins:
            sighting = min(joins, key=lambda s: abs(s["last_at"] - row["captured_at"]))
            _add(sighting, row)
        else:
            sighting = {
                "id": row["id"],
                "site": row["site"],
                "unit_id": row["unit_id"],
                "person_id": row["person_id"],
                "first_at": row["captured_at"],
                "last_at": row["captured_at"],
                "created_at": row["received_at"],
                "last_received_at": row["received_at"],
                "hits": 1,
                "best_hit_id": row["id"],
                "best_score": row.get("score"),
                "last_camera_id": row["camera_id"],
                "last_track_id": row.get("track_id"),
                "review_state": "pending",
                "decided_at": None,
                "decided_score": None,
            }
            found.append(sighting)
            new_ids.add(sighting["id"])
        changed[sighting["id"]] = sighting
        placed.append((row["id"], sighting["id"]))
    for merge in merges:
        while merge["kept"] in merged_into:  # merged again by a later hit of the batch
            merge["kept"] = merged_into[merge["kept"]]
    by_id = {s["id"]: s for s in changed.values()}
    for sid, s in changed.items():
        if sid in new_ids:
            cols = list(s)
            q(f"INSERT INTO sightings({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", [s[c] for c in cols])
        else:
            q(
                "UPDATE sightings SET first_at = ?, last_at = ?, created_at = ?, last_received_at = ?, hits = ?, "
                "best_hit_id = ?, best_score = ?, last_camera_id = ?, last_track_id = ? WHERE id = ?",
                (
                    s["first_at"],
                    s["last_at"],
                    s["created_at"],
                    s["last_received_at"],
                    s["hits"],
                    s["best_hit_id"],
                    s["best_score"],
                    s["last_camera_id"],
                    s["last_track_id"],
                    sid,
                ),
            )
    final = []
    for hid, sid in placed:
        while sid in merged_into:
            sid = merged_into[sid]
        final.append((hid, sid, by_id[sid]["review_state"]))
    for chunk in chunks(final, 300):
        sighting_case = " ".join(["WHEN ? THEN ?"] * len(chunk))
        state_case = " ".join(["WHEN ? THEN ?"] * len(chunk))
        q(
            f"UPDATE hits SET sighting_id = CASE id {sighting_case} END, "
            f"review_state = CASE id {state_case} END WHERE id IN ({','.join('?' * len(chunk))})",
            [v for hid, sid, _ in chunk for v in (hid, sid)]
            + [v for hid, _, state in chunk for v in (hid, state)]
            + [hid for hid, _, _ in chunk],
        )
    for merge in merges:
        merge["hits"] = int(by_id[merge["kept"]]["hits"])
    return merges


def _add(sighting: dict[str, Any], row: dict[str, Any]) -> None:
    """Count the hit `row` into `sighting` (its span, latest camera and track, best hit)."""
    sighting["hits"] += 1
    sighting["first_at"] = min(sighting["first_at"], row["captured_at"])
    sighting["last_received_at"] = max(sighting["last_received_at"], row["received_at"])
    if row["captured_at"] >= sighting["last_at"]:
        sighting["last_at"] = row["captured_at"]
        sighting["last_camera_id"], sighting["last_track_id"] = row["camera_id"], row.get("track_id")
    if (row.get("score") or 0) > (sighting["best_score"] or 0):
        sighting["best_hit_id"], sighting["best_score"] = row["id"], row.get("score")


def _merge(q: Runner, pending: list[dict[str, Any]], new_ids: set[str]) -> dict[str, Any] | None:
    """Join pending sightings of one person at one unit into the oldest (first to arrive), which
    keeps its id; its counts, span and best hit are those of them all, and the others' hits and
    confirmations move to it. None, and nothing changed, when their confirmations come from two or
    more different operators: joined, the sighting would hold two confirmations that no operator
    gave on it as a whole (each saw only a part), so they stay apart and each is decided on its own."""
    stored = [s["id"] for s in pending if s["id"] not in new_ids]
    confirmers: set[str] = set()
    if stored:
        marks = ",".join("?" * len(stored))
        confirmers = {
            r["username"]
            for r in q(f"SELECT username FROM reviews WHERE sighting_id IN ({marks}) AND decision = 'confirm'", stored)
        }
    if len(confirmers) > 1:
        return None
    kept = min(pending, key=lambda s: (s["created_at"], s["first_at"], s["id"]))
    for other in pending:
        if other is kept:
            continue
        kept["hits"] += other["hits"]
        kept["first_at"] = min(kept["first_at"], other["first_at"])
        kept["created_at"] = min(kept["created_at"], other["created_at"])
        kept["last_received_at"] = max(kept["last_received_at"], other["last_received_at"])
        if other["last_at"] > kept["last_at"]:
            kept["last_at"] = other["last_at"]
            kept["last_camera_id"], kept["last_track_id"] = other["last_camera_id"], other["last_track_id"]
        if (other["best_score"] or 0) > (kept["best_score"] or 0):
            kept["best_hit_id"], kept["best_score"] = other["best_hit_id"], other["best_score"]
        if other["id"] in new_ids:
            new_ids.discard(other["id"])  # made by this batch: never written, its hits are re-placed
            continue
        q("UPDATE hits SET sighting_id = ? WHERE sighting_id = ?", (kept["id"], other["id"]))
        q("UPDATE reviews SET sighting_id = ? WHERE sighting_id = ?", (kept["id"], other["id"]))
        q("DELETE FROM sightings WHERE id = ?", (other["id"],))
    return kept


def _continues(sighting: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether the hit `row` belongs to `sighting` (same person and unit already): captured within
    SIGHTING_GAP_S of its span, or on its latest hit's camera and track within SIGHTING_TRACK_S."""
    if sighting["review_state"] == "rejected" and (row.get("score") or 0) > (sighting["decided_score"] or 0):
        return False
    at = row["captured_at"]
    if sighting["first_at"] - SIGHTING_GAP_S <= at <= sighting["last_at"] + SIGHTING_GAP_S:
        return True
    same_track = row.get("track_id") is not None and (row["camera_id"], row["track_id"]) == (
        sighting["last_camera_id"],
        sighting["last_track_id"],
    )
    return same_track and sighting["last_at"] <= at <= sighting["last_at"] + SIGHTING_TRACK_S


class SightingStore(StoreCore):
    """Sightings and their decisions (`central.store.HitStore` is one)."""

    def decide(
        self, hit_id: str, username: str, decision: str, reason: str | None = None, *, closed: str | None = None
    ) -> str:
        """Record one operator's decision on the sighting of a hit and return its state after it.

        What a decision may do is the two-person rule's (central/review.py: two different operators
        confirm, one rejection with a reason closes, a decided sighting takes no more, ReviewRefused
        otherwise). Every step is a new row in `reviews` and an entry in the audit chain. `closed`:
        why the case is closed at HQ (the person was removed from the list), which refuses a
        confirmation.
        """
        reason = review.check_decision(decision, reason, closed)
        with self._tx() as q:
            user = q("SELECT active FROM users WHERE username = ?", (username,))
            review.check_operator(username, bool(user and user[0]["active"]))
            hit = q("SELECT sighting_id FROM hits WHERE id = ?", (hit_id,))
            if not hit:
                raise StoreError(f"no hit with id {hit_id!r} in {self.location}")
            sid = hit[0]["sighting_id"]
            sighting = q(f"SELECT review_state, hits, best_score FROM sightings WHERE id = ?{self.for_update}", (sid,))
            confirmers = {
                r["username"]
                for r in q("SELECT username FROM reviews WHERE sighting_id = ? AND decision = 'confirm'", (sid,))
            }
            new_state = review.outcome(hit_id, sighting[0]["review_state"], decision, username, confirmers)
            now = time.time()
            q(
                "INSERT INTO reviews(hit_id, sighting_id, username, decision, reason, at) VALUES (?,?,?,?,?,?)",
                (hit_id, sid, username, decision, reason, now),
            )
            if new_state != "pending":
                q(
                    "UPDATE sightings SET review_state = ?, decided_at = ?, decided_score = best_score WHERE id = ?",
                    (new_state, now, sid),
                )
                q(
                    "UPDATE hits SET review_state = ?, reviewed_by = ?, reviewed_at = ?, review_note = ? "
                    "WHERE sighting_id = ?",
                    (new_state, username, now, reason, sid),
                )
            detail = {"decision": decision, "reason": reason, "state": new_state, "sighting": sid}
            detail["hits"] = int(sighting[0]["hits"])
            self._audit(q, username, "decision", hit_id, detail)
        return new_state

    def reviews(self, hit_id: str) -> list[dict[str, Any]]:
        """Every decision on a hit's sighting, oldest first (with the hit each was taken on)."""
        return self._read(
            "SELECT r.hit_id, r.username, r.decision, r.reason, r.at FROM reviews r "
            "JOIN hits h ON h.sighting_id = r.sighting_id WHERE h.id = ? ORDER BY r.id",
            (hit_id,),
        )

    def sightings(self, *, limit: int | None = 100, where: HitFilter | None = None) -> list[dict[str, Any]]:
        """Sightings with the latest activity first, each with its best hit's camera, crop flag,
        threshold and margin (`best_*`). `where` narrows to sightings holding a matching hit; its
        review state is the sighting's."""
        flt = where or HitFilter()
        hit_clause, args = HitFilter(**{**flt.__dict__, "review_state": None}).where()
        conds = []
        if hit_clause:
            conds.append(f"s.id IN (SELECT sighting_id FROM hits{hit_clause})")
        if flt.review_state is not None:
            conds.append("s.review_state = ?")
            args.append(flt.review_state)
        sql = (
            "SELECT s.*, h.camera_id AS best_camera_id, h.has_crop AS best_has_crop, h.threshold AS best_threshold, "
            "h.margin AS best_margin, h.captured_at AS best_captured_at FROM sightings s "
            "JOIN hits h ON h.id = s.best_hit_id" + (" WHERE " + " AND ".join(conds) if conds else "")
        )
        sql += " ORDER BY s.last_received_at DESC, s.id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        rows = self._read(sql, args)
        for r in rows:
            r["best_has_crop"] = bool(r["best_has_crop"])
        return rows

    def sighting(self, sighting_id: str) -> dict[str, Any] | None:
        """One sighting's row, or None."""
        rows = self._read("SELECT * FROM sightings WHERE id = ?", (sighting_id,))
        return rows[0] if rows else None

    def sighting_hits(self, sighting_id: str) -> list[dict[str, Any]]:
        """The hits of a sighting, in capture order."""
        rows = self._read("SELECT * FROM hits WHERE sighting_id = ? ORDER BY captured_at, id", (sighting_id,))
        return [self._hit_row(r) for r in rows]

    def sighting_audit(self, sighting_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The audit entries about a sighting, oldest first: those whose subject is the sighting (a
        merge into it, a case report opened) or one of its hits (decisions, crops and frames opened);
        the first `limit` when given."""
        sql = (
            "SELECT * FROM audit WHERE subject = ? OR subject IN (SELECT id FROM hits WHERE sighting_id = ?) "
            "ORDER BY seq"
        )
        args: list[Any] = [sighting_id, sighting_id]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return self._read(sql, args)

    def desk(self, overdue_after_s: float, now: float | None = None) -> dict[str, Any]:
        """What waits for the operators: `pending` sightings, how many of them have waited longer than
        `overdue_after_s` since their first hit arrived (`overdue`), and the newest pending one's id,
        first arrival and person (`newest`, `newest_at`, `newest_person`)."""
        now = time.time() if now is None else now
        row = self._read(
            "SELECT COUNT(*) AS n, SUM(CASE WHEN created_at < ? THEN 1 ELSE 0 END) AS late, MAX(created_at) AS newest "
            "FROM sightings WHERE review_state = 'pending'",
            (now - overdue_after_s,),
        )[0]
        newest = self._read(
            "SELECT id, person_id FROM sightings WHERE review_state = 'pending' ORDER BY created_at DESC, id DESC LIMIT 1"
        )
        return {
            "pending": int(row["n"] or 0),
            "overdue": int(row["late"] or 0),
            "newest": newest[0]["id"] if newest else None,
            "newest_at": row["newest"],
            "newest_person": newest[0]["person_id"] if newest else None,
        }
