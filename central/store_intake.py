"""What the receivers write into the hit store: hits (each once, by id, grouped into sightings as they
arrive), units' status, heartbeats and canaries, quarantined messages, and HQ's watchlist publications.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from central.fleet import heartbeat_facts
from central.store_core import Runner, StoreCore, chunks
from central.store_sightings import group_sightings
from wire.records import safe_text

HIT_COLUMNS = (
    "id",
    "site",
    "unit_id",
    "camera_id",
    "person_id",
    "captured_at",
    "queued_at",
    "received_at",
    "score",
    "threshold",
    "margin",
    "box",
    "model_id",
    "watchlist_version",
    "track_id",
    "has_crop",
    "crop_dropped",
    "schema_version",
    "signature",
    "stranger_rate",
    "has_context",
    "context_dropped",
)
SIGNATURE_VERDICTS = ("valid", "unsigned", "unknown_unit")
"""What a stored hit's `signature` column may say (hits with any other verdict are quarantined);
NULL for hits stored before signatures were checked."""
REJECT_PAYLOAD_BYTES = 4096
"""How much of a rejected message is kept: enough to see what it was, never a 20 MiB payload."""
REJECT_TEXT_CHARS = 1000


class IntakeStore(StoreCore):
    """The receivers' writes (`central.store.HitStore` is one)."""

    def add_hits(self, items: list[tuple[dict[str, Any], bytes | None, float]]) -> list[bool]:
        """Store decoded hits (fields, crop, received_at) in one transaction; for each, True if it
        was new, False if a hit with that id was already stored (a duplicate delivery). A hit's
        context frame, where it has one, is its fields' `context_jpeg` (wire.records.decode_hit)."""
        rows = []
        for fields, crop, received_at in items:
            row = dict(fields)
            row["received_at"] = received_at
            row["box"] = json.dumps(fields["box"])
            row["has_crop"] = 1 if crop else 0
            row["has_context"] = 1 if fields.get("context_jpeg") else 0
            row["schema_version"] = fields.get("v")
            rows.append(row)
        inserted: set[str] = set()
        cols = ",".join(HIT_COLUMNS)
        one = "(" + ",".join("?" * len(HIT_COLUMNS)) + ")"
        with self._tx() as q:
            first_of_version = self._new_signed_versions(q, rows)
            # Multi-row statements: one round trip per chunk instead of three per hit (PostgreSQL).
            for chunk in chunks(rows, 500):
                args = [row.get(c) for row in chunk for c in HIT_COLUMNS]
                values = ",".join([one] * len(chunk))
                got = q(f"INSERT INTO hits({cols}) VALUES {values} ON CONFLICT (id) DO NOTHING RETURNING id", args)
                inserted.update(r["id"] for r in got)
            new: list[bool] = []
            first: list[tuple[dict[str, Any], bytes | None]] = []
            for row, (_, crop, _) in zip(rows, items):
                is_new = row["id"] in inserted
                inserted.discard(row["id"])  # a second copy within the batch is a duplicate
                new.append(is_new)
                if is_new:
                    first.append((row, crop))
            with_crop = [(row["id"], crop, len(crop)) for row, crop in first if crop]
            for crops in chunks(with_crop, 500):
                q(
                    "INSERT INTO crops(hit_id, jpeg, bytes) VALUES " + ",".join(["(?,?,?)"] * len(crops)),
                    [v for item in crops for v in item],
                )
            with_context = [
                (row["id"], row["context_jpeg"], len(row["context_jpeg"])) for row, _ in first if row["has_context"]
            ]
            for frames in chunks(with_context, 100):
                q(
                    "INSERT INTO context_frames(hit_id, jpeg, bytes) VALUES " + ",".join(["(?,?,?)"] * len(frames)),
                    [v for item in frames for v in item],
                )
            per_unit: dict[tuple[str, str], tuple[int, float]] = {}
            for row, _ in first:
                key = (row["site"], row["unit_id"])
                n, seen = per_unit.get(key, (0, 0.0))
                per_unit[key] = (n + 1, max(seen, row["received_at"]))
            for (site, unit_id), (n, seen) in sorted(per_unit.items()):
                q(
                    "INSERT INTO units(site, unit_id, last_seen, hits) VALUES (?,?,?,?) "
                    "ON CONFLICT (site, unit_id) DO UPDATE SET hits = units.hits + excluded.hits, "
                    f"last_seen = {self.greatest}(coalesce(units.last_seen, 0), excluded.last_seen)",
                    (site, unit_id, seen, n),
                )
            if first:
                # Receivers sharing a PostgreSQL store group under one lock, so one person's hits arriving
                # at two receivers at once cannot open two sightings.
                self._lock_audit(q)
                for merge in group_sightings(q, [row for row, _ in first]):
                    # Operators see a sighting they may have opened vanish into another: the chain says why.
                    detail = {"merged": merge["merged"], "hit": merge["hit"], "hits": merge["hits"]}
                    self._audit(q, "receiver", "sighting_merged", merge["kept"], detail)
            for row in first_of_version:
                self._audit(
                    q,
                    f"unit:{row['site']}/{row['unit_id']}",
                    "watchlist_seen",
                    f"{row['site']}/{row['unit_id']}",
                    {"watchlist_version": row["watchlist_version"], "hit": row["id"]},
                )
        return new

    def _new_signed_versions(self, q: Runner, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The first row of each (unit, watchlist version) among `rows` that is validly signed while no
        stored validly signed hit of that unit carries that version: what goes into the audit chain as
        `watchlist_seen`. Only a signed record may write an audit entry (a heartbeat, unsigned, could
        be sent by anyone holding the unit's broker account). Called before `rows` are inserted."""
        first: dict[tuple[str, str, int], dict[str, Any]] = {}
        for row in rows:
            # Version 0 is a unit without a list (each restart until its list loads): nothing to record.
            if row.get("signature") == "valid" and (row.get("watchlist_version") or 0) > 0:
                first.setdefault((row["site"], row["unit_id"], row["watchlist_version"]), row)
        stored = (
            "SELECT 1 AS x FROM hits WHERE site = ? AND unit_id = ? AND watchlist_version = ? "
            "AND signature = 'valid' LIMIT 1"
        )
        new = {key: row for key, row in first.items() if not q(stored, key)}
        if new:
            # Look again under the audit lock: a receiver sharing this database may have stored such a
            # hit since, and it held that lock until it committed.
            self._lock_audit(q)
            new = {key: row for key, row in new.items() if not q(stored, key)}
        return list(new.values())

    def add_hit(self, fields: dict[str, Any], crop: bytes | None, received_at: float | None = None) -> bool:
        """Store one decoded hit; True if new."""
        return self.add_hits([(fields, crop, time.time() if received_at is None else received_at)])[0]

    def set_unit_status(
        self, site: str, unit_id: str, state: str, reason: str, at: float, seen_at: float, *, replay: bool = False
    ) -> bool:
        """Record a unit's status ('online'/'offline') as received at `seen_at` (the receiver's clock);
        `at` is what the unit's own clock said, kept for reference only. Statuses are ordered by
        receive time, never by the unit's clock: a status claiming a time ten years ahead does not keep
        a dead unit online when its Last Will arrives later. A `replay` (a retained message delivered
        again on subscribe) of the state already stored changes nothing, and a replay is no sign of
        life: it moves `last_seen` to the unit's own time at most, never to when it was replayed. True
        if applied."""
        same = " AND (units.state <> excluded.state OR coalesce(units.state_reason, '') <> excluded.state_reason)"
        with self._tx() as q:
            q(
                "INSERT INTO units(site, unit_id, state, state_reason, state_at, state_claimed_at, last_seen) "
                "VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT (site, unit_id) DO UPDATE SET state = excluded.state, "
                "state_reason = excluded.state_reason, state_at = excluded.state_at, "
                "state_claimed_at = excluded.state_claimed_at, "
                f"last_seen = {self.greatest}(coalesce(units.last_seen, 0), excluded.last_seen) "
                "WHERE coalesce(units.state_at, 0) <= excluded.state_at" + (same if replay else ""),
                (site, unit_id, state, reason, seen_at, at, min(at, seen_at) if replay else seen_at),
            )
            return q.rowcount == 1

    def set_heartbeat(self, site: str, unit_id: str, body: dict[str, Any], at: float) -> None:
        """Record a unit's latest heartbeat (older ones than stored are ignored)."""
        self.set_heartbeats([(site, unit_id, body, at)])

    def set_heartbeats(self, beats: Sequence[tuple[str, str, dict[str, Any], float]]) -> None:
        """Record heartbeats (site, unit_id, body, at) in one transaction: of several from one unit
        the newest counts, and one older than the unit's stored heartbeat is ignored. `at` orders them:
        the receive time, which the receiver caps a retained one's own time at, so a heartbeat stamped
        in the future cannot hold back the ones after it (nor can one stored in the future before
        heartbeats were ordered so). Heartbeats are not signed, so they only feed the fleet page and
        never the audit chain. Keeps since when the outbox has held hits without a break and how many
        it held then (`backlog_since`, `backlog_from`), for central/fleet.py."""
        newest: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        for site, unit_id, body, at in beats:
            kept = newest.get((site, unit_id))
            if kept is None or at >= kept[1]:
                newest[(site, unit_id)] = (body, at)
        rows = []
        for (site, unit_id), (body, at) in sorted(newest.items()):
            facts = heartbeat_facts(body)
            rows.append(
                (
                    site,
                    unit_id,
                    at,
                    at,
                    float(body.get("interval_s", 0)),
                    json.dumps(body),
                    facts["software_version"],
                    facts["watchlist_version"],
                    facts["watchlist_expires_at"],
                    at if facts["outbox_pending"] else None,
                    facts["outbox_pending"] or None,
                )
            )
        one = "(" + ",".join("?" * 11) + ")"
        future = time.time() + 60
        with self._tx() as q:
            # One multi-row statement per chunk (units are unique in it: PostgreSQL refuses to update
            # one row twice in a statement), so a batch of a thousand units costs one round trip.
            for chunk in chunks(rows, 500):
                q(
                    "INSERT INTO units(site, unit_id, last_seen, last_heartbeat_at, heartbeat_interval_s, heartbeat, "
                    "software_version, watchlist_version, watchlist_expires_at, backlog_since, backlog_from) VALUES "
                    + ",".join([one] * len(chunk))
                    + " ON CONFLICT (site, unit_id) DO UPDATE SET "
                    "last_heartbeat_at = excluded.last_heartbeat_at, "
                    "heartbeat_interval_s = excluded.heartbeat_interval_s, heartbeat = excluded.heartbeat, "
                    "software_version = excluded.software_version, watchlist_version = excluded.watchlist_version, "
                    "watchlist_expires_at = excluded.watchlist_expires_at, "
                    "backlog_since = CASE WHEN excluded.backlog_since IS NULL THEN NULL "
                    "ELSE coalesce(units.backlog_since, excluded.backlog_since) END, "
                    "backlog_from = CASE WHEN excluded.backlog_from IS NULL THEN NULL "
                    "ELSE coalesce(units.backlog_from, excluded.backlog_from) END, "
                    f"last_seen = {self.greatest}(coalesce(units.last_seen, 0), excluded.last_seen) "
                    "WHERE coalesce(units.last_heartbeat_at, 0) <= excluded.last_heartbeat_at "
                    "OR units.last_heartbeat_at > ?",
                    [v for row in chunk for v in row] + [future],
                )

    def record_canaries(self, canaries: Sequence[tuple[str, str, float]]) -> None:
        """Record units' canary hits (site, unit_id, received_at) in one transaction: a unit's
        `last_canary_at` only moves forward (a resent old canary does not make a late unit look well).
        A canary is never a hit: nothing goes into `hits` (docs/edge.md, The canary)."""
        rows = sorted({(site, unit_id): at for site, unit_id, at in sorted(canaries, key=lambda c: c[2])}.items())
        with self._tx() as q:
            for (site, unit_id), at in rows:
                q(
                    "INSERT INTO units(site, unit_id, last_canary_at) VALUES (?,?,?) ON CONFLICT (site, unit_id) "
                    f"DO UPDATE SET last_canary_at = {self.greatest}(coalesce(units.last_canary_at, 0), "
                    "excluded.last_canary_at)",
                    (site, unit_id, at),
                )

    def add_reject(
        self,
        topic: str,
        payload: bytes,
        error: str,
        received_at: float | None = None,
        reason: str = "protocol",
        payload_bytes: int | None = None,
    ) -> None:
        """Quarantine a message that was not stored, with why (`reason`: a short word such as
        'protocol', 'store', 'unsigned', 'bad_signature'; `error`: the full sentence), for someone to
        look at. Only the first REJECT_PAYLOAD_BYTES of the payload are kept (its full size beside
        them: `payload_bytes` when the caller kept only a prefix), topic and error are cut and
        escaped, and the table keeps the newest MAX_REJECTS rows."""
        with self._tx() as q:
            q(
                "INSERT INTO rejects(received_at, topic, reason, error, payload, payload_bytes) VALUES (?,?,?,?,?,?)",
                (
                    time.time() if received_at is None else received_at,
                    safe_text(topic, 512),
                    safe_text(reason, 64),
                    safe_text(error, REJECT_TEXT_CHARS),
                    bytes(payload[:REJECT_PAYLOAD_BYTES]),
                    len(payload) if payload_bytes is None else payload_bytes,
                ),
            )
            q("DELETE FROM rejects WHERE id <= (SELECT max(id) FROM rejects) - ?", (self.max_rejects,))

    def set_publication(self, site: str, version: int, published_at: float | None, seen_at: float, topic: str) -> bool:
        """Record a watchlist version HQ announced for `site` (its retained manifest on `topic`), seen
        at `seen_at`, if newer than the one recorded; True if it was."""
        with self._tx() as q:
            q(
                "INSERT INTO watchlist_published(site, version, published_at, seen_at, topic) VALUES (?,?,?,?,?) "
                "ON CONFLICT (site) DO UPDATE SET version = excluded.version, published_at = excluded.published_at, "
                "seen_at = excluded.seen_at, topic = excluded.topic "
                "WHERE watchlist_published.version < excluded.version",
                (site, version, published_at, seen_at, topic),
            )
            return q.rowcount == 1
