"""The operators' store: hits and their crops, units, reviews, accounts, sessions and the audit chain.

One small interface, `HitStore`, with two implementations chosen by URL (`open_store`):
SQLite (`sqlite:///path` or a plain path; the default, embedded) and PostgreSQL
(`postgresql://...`, for a centre where several receivers and consoles share one database).
The SQL lives here once, in the subset both speak; a backend only says how to connect, how to
run a transaction, and the few words that differ (`central/store_sqlite.py`,
`central/store_postgres.py`). The schema is versioned (`central/migrations.py`).

Everything here has a retention limit except the audit chain, which is the record of who did
what: `purge` removes hits, crops, reviews and rejects older than it.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import csv
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from central import accounts
from central import audit as audit_chain
from central.fleet import EXPIRY_WARNING_S, HealthSettings, heartbeat_facts, unit_row
from central.migrations import migrate
from wire.records import safe_text

REVIEW_STATES = ("pending", "confirmed", "rejected")
DECISIONS = ("confirm", "reject")
ROLES = ("operator", "supervisor")

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
)
SIGNATURE_VERDICTS = ("valid", "unsigned", "unknown_unit")
"""What a stored hit's `signature` column may say (hits with any other verdict are quarantined);
NULL for hits stored before signatures were checked."""
REJECT_PAYLOAD_BYTES = 4096
"""How much of a rejected message is kept: enough to see what it was, never a 20 MiB payload."""
MAX_REJECTS = 10_000
"""The rejects table keeps the newest this many rows (and none older than the hit retention)."""
REJECT_TEXT_CHARS = 1000
SIGHTING_GAP_S = 300.0
"""A hit joins a sighting of the same person at the same unit when it was captured within this long
of the sighting's span: one person lingering in view gave 19 hits in 13 minutes, a few tens of
seconds apart, and each asked two operators. Five minutes chains those and a tracker losing and
finding the face again, while someone passing the same unit an hour later is asked about again."""
SIGHTING_TRACK_S = 1800.0
"""A hit on the camera and track of a sighting's latest hit continues it up to this long after it:
the tracker held the face the whole time (track ids restart with the unit, hence a limit)."""


class StoreError(RuntimeError):
    """The store cannot be opened, or was asked for something it does not hold or allow."""


@dataclass(frozen=True)
class HitFilter:
    """What the hit list is narrowed to; None means any."""

    review_state: str | None = None
    person_id: str | None = None
    site: str | None = None
    unit_id: str | None = None
    camera_id: str | None = None
    since: float | None = None
    until: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for column in ("review_state", "person_id", "site", "unit_id", "camera_id"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if self.since is not None:
            clauses.append("received_at >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("received_at < ?")
            args.append(self.until)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class Runner(abc.ABC):
    """Runs statements inside one transaction: `q(sql, args)` returns the rows as dicts (none for
    writes) and leaves the count of rows written in `q.rowcount`."""

    rowcount = -1

    @abc.abstractmethod
    def __call__(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]: ...


def open_store(url: str | Path) -> HitStore:
    """The store at `url`: `postgresql://user@host:port/db`, `sqlite:///relative.sqlite`,
    `sqlite:////absolute.sqlite`, or a plain file path (SQLite)."""
    return HitStore(url)


def _backend(url: str | Path) -> type[HitStore]:
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from central.store_postgres import PostgresHitStore

        return PostgresHitStore
    if "://" in text and not text.startswith("sqlite://"):
        raise StoreError(
            f"unknown store URL {text!r}: use sqlite:///path/to/hits.sqlite or postgresql://user@host:port/dbname"
        )
    from central.store_sqlite import SqliteHitStore

    return SqliteHitStore


class HitStore(abc.ABC):
    """Hits (each stored once, by id), crops, units, two-person reviews, accounts and the audit chain.

    `HitStore(url)` opens the backend the URL names (see `open_store`). Safe to share between
    threads; several processes (receivers, consoles) may share one database.
    """

    #: SQL words that differ between backends.
    greatest = "max"
    for_update = ""
    #: Rows the rejects table keeps (the newest).
    max_rejects = MAX_REJECTS

    def __new__(cls, *args: Any, **kwargs: Any) -> HitStore:
        if cls is HitStore:
            cls = _backend(args[0] if args else kwargs["url"])
        return super().__new__(cls)

    def __init__(self, url: str | Path) -> None:
        self.location = str(url)
        self._lock = threading.RLock()
        self._connect()
        with self._tx() as q:
            self._lock_audit(q)
            self.schema_version = migrate(q, self.dialect)

    # --- what a backend provides ------------------------------------------------------------

    dialect: str = ""

    @abc.abstractmethod
    def _connect(self) -> None:
        """Open the connection (raise StoreError naming the location when it cannot)."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Runner]:
        """A transaction that holds the database's write lock."""

    @abc.abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one read outside a transaction; rows as dicts."""

    @abc.abstractmethod
    def _lock_audit(self, q: Runner) -> None:
        """Serialise appends to the audit chain (and migrations) across processes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""

    # --- helpers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Runner]:
        with self._lock, self._transaction() as q:
            yield q

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._query(sql, args)

    def _audit(self, q: Runner, actor: str, action: str, subject: str | None, detail: dict) -> None:
        self._lock_audit(q)
        last = q("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq = int(last[0]["seq"]) + 1 if last else 1
        prev = last[0]["hash"] if last else audit_chain.GENESIS
        entry = audit_chain.make_entry(seq, time.time(), actor, action, subject, detail, prev)
        q(
            "INSERT INTO audit(seq, at, actor, action, subject, detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
            [entry[c] for c in audit_chain.COLUMNS],
        )

    # --- writing (receiver) -------------------------------------------------------------------

    def add_hits(self, items: list[tuple[dict[str, Any], bytes | None, float]]) -> list[bool]:
        """Store decoded hits (fields, crop, received_at) in one transaction; for each, True if it
        was new, False if a hit with that id was already stored (a duplicate delivery)."""
        rows = []
        for fields, crop, received_at in items:
            row = dict(fields)
            row["received_at"] = received_at
            row["box"] = json.dumps(fields["box"])
            row["has_crop"] = 1 if crop else 0
            row["schema_version"] = fields.get("v")
            rows.append(row)
        inserted: set[str] = set()
        cols = ",".join(HIT_COLUMNS)
        one = "(" + ",".join("?" * len(HIT_COLUMNS)) + ")"
        with self._tx() as q:
            first_of_version = self._new_signed_versions(q, rows)
            # Multi-row statements: one round trip per chunk instead of three per hit (PostgreSQL).
            for chunk in _chunks(rows, 500):
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
            for chunk in _chunks(with_crop, 500):
                q(
                    "INSERT INTO crops(hit_id, jpeg, bytes) VALUES " + ",".join(["(?,?,?)"] * len(chunk)),
                    [v for item in chunk for v in item],
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
            self._group_sightings(q, [row for row, _ in first])
            for row in first_of_version:
                self._audit(
                    q,
                    f"unit:{row['site']}/{row['unit_id']}",
                    "watchlist_seen",
                    f"{row['site']}/{row['unit_id']}",
                    {"watchlist_version": row["watchlist_version"], "hit": row["id"]},
                )
        return new

    def _group_sightings(self, q: Runner, rows: list[dict[str, Any]]) -> None:
        """Put each newly stored hit into a sighting (SIGHTING_GAP_S, SIGHTING_TRACK_S), oldest capture
        first: the open sighting of its person at its unit that it falls into, or a new one named by
        the hit. A hit joining a decided sighting takes its decision; a rejection covers only the
        faces the operator saw, so a hit scoring above the best of them starts a new sighting."""
        if not rows:
            return
        # Receivers sharing a PostgreSQL store group under one lock, so one person's hits arriving at
        # two receivers at once cannot open two sightings.
        self._lock_audit(q)
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
        placed: list[tuple[str, str, str]] = []  # hit id, sighting id, review state
        for row in sorted(rows, key=lambda r: (r["captured_at"], r["id"])):
            found = known[(row["site"], row["unit_id"], row["person_id"])]
            joins = [s for s in found if _continues(s, row)]
            if joins:
                sighting = min(joins, key=lambda s: abs(s["last_at"] - row["captured_at"]))
                sighting["hits"] += 1
                sighting["first_at"] = min(sighting["first_at"], row["captured_at"])
                sighting["last_received_at"] = max(sighting["last_received_at"], row["received_at"])
                if row["captured_at"] >= sighting["last_at"]:
                    sighting["last_at"] = row["captured_at"]
                    sighting["last_camera_id"], sighting["last_track_id"] = row["camera_id"], row.get("track_id")
                if (row.get("score") or 0) > (sighting["best_score"] or 0):
                    sighting["best_hit_id"], sighting["best_score"] = row["id"], row.get("score")
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
            placed.append((row["id"], sighting["id"], sighting["review_state"]))
        for sid, s in changed.items():
            if sid in new_ids:
                cols = list(s)
                q(f"INSERT INTO sightings({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", [s[c] for c in cols])
            else:
                q(
                    "UPDATE sightings SET first_at = ?, last_at = ?, last_received_at = ?, hits = ?, best_hit_id = ?, "
                    "best_score = ?, last_camera_id = ?, last_track_id = ? WHERE id = ?",
                    (
                        s["first_at"],
                        s["last_at"],
                        s["last_received_at"],
                        s["hits"],
                        s["best_hit_id"],
                        s["best_score"],
                        s["last_camera_id"],
                        s["last_track_id"],
                        sid,
                    ),
                )
        for chunk in _chunks(placed, 300):
            sighting_case = " ".join(["WHEN ? THEN ?"] * len(chunk))
            state_case = " ".join(["WHEN ? THEN ?"] * len(chunk))
            q(
                f"UPDATE hits SET sighting_id = CASE id {sighting_case} END, "
                f"review_state = CASE id {state_case} END WHERE id IN ({','.join('?' * len(chunk))})",
                [v for hid, sid, _ in chunk for v in (hid, sid)]
                + [v for hid, _, state in chunk for v in (hid, state)]
                + [hid for hid, _, _ in chunk],
            )

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
            for chunk in _chunks(rows, 500):
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

    # --- two-person review --------------------------------------------------------------------

    def decide(
        self, hit_id: str, username: str, decision: str, reason: str | None = None, *, closed: str | None = None
    ) -> str:
        """Record one operator's decision on the sighting of a hit and return its state after it.

        A sighting (and every hit in it) becomes `confirmed` only when two different operators have
        confirmed it; one `reject` (with a reason) closes it as `rejected`. Every step is a new row
        in `reviews` and an entry in the audit chain; a closed sighting takes no further decisions.
        `closed`: why the case is closed at HQ (the person was removed from the list), which refuses
        a confirmation.
        """
        if decision not in DECISIONS:
            raise StoreError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        reason = (reason or "").strip() or None
        if decision == "reject" and not reason:
            raise StoreError("a rejection needs a reason (say why this is not the person)")
        if decision == "confirm" and closed:
            raise StoreError(f"case closed: {closed}; a closed case cannot be confirmed")
        with self._tx() as q:
            user = q("SELECT active FROM users WHERE username = ?", (username,))
            if not user or not user[0]["active"]:
                raise StoreError(f"no active user {username!r}: decisions are taken by registered operators only")
            hit = q("SELECT sighting_id FROM hits WHERE id = ?", (hit_id,))
            if not hit:
                raise StoreError(f"no hit with id {hit_id!r} in {self.location}")
            sid = hit[0]["sighting_id"]
            sighting = q(f"SELECT review_state, hits, best_score FROM sightings WHERE id = ?{self.for_update}", (sid,))
            state = sighting[0]["review_state"]
            if state != "pending":
                raise StoreError(f"hit {hit_id} is already {state}; a closed sighting takes no further decisions")
            confirmers = {
                r["username"]
                for r in q("SELECT username FROM reviews WHERE sighting_id = ? AND decision = 'confirm'", (sid,))
            }
            if decision == "confirm" and username in confirmers:
                raise StoreError(
                    f"{username} has already confirmed hit {hit_id}: a second, different operator must confirm it"
                )
            now = time.time()
            q(
                "INSERT INTO reviews(hit_id, sighting_id, username, decision, reason, at) VALUES (?,?,?,?,?,?)",
                (hit_id, sid, username, decision, reason, now),
            )
            new_state = "rejected" if decision == "reject" else "confirmed" if confirmers else "pending"
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

    # --- reading ------------------------------------------------------------------------------

    @staticmethod
    def _hit_row(row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        row["box"] = json.loads(row["box"]) if row.get("box") else None
        row["has_crop"] = bool(row.get("has_crop"))
        return row

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
        if review_state is not None and review_state not in REVIEW_STATES:
            raise StoreError(f"review state must be one of {', '.join(REVIEW_STATES)}, got {review_state!r}")
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

    def count_hits(self, review_state: str | None = None) -> int:
        """How many hits are stored (in this review state, if given)."""
        if review_state is None:
            return int(self._read("SELECT COUNT(*) AS n FROM hits")[0]["n"])
        return int(self._read("SELECT COUNT(*) AS n FROM hits WHERE review_state = ?", (review_state,))[0]["n"])

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

    def camera_names(self) -> dict[tuple[str, str, str], str]:
        """Each camera's name as its unit's latest heartbeat gives it ((site, unit, camera id) -> name),
        cut to 80 characters; cameras without one are left out."""
        names: dict[tuple[str, str, str], str] = {}
        for row in self._read("SELECT site, unit_id, heartbeat FROM units WHERE heartbeat IS NOT NULL"):
            try:
                body = json.loads(row["heartbeat"])
            except ValueError:
                continue
            unit = body.get("unit") if isinstance(body, dict) and isinstance(body.get("unit"), dict) else {}
            cameras = unit.get("cameras") if isinstance(unit.get("cameras"), list) else []
            for cam in cameras[:64]:
                if isinstance(cam, dict) and isinstance(cam.get("id"), str) and isinstance(cam.get("name"), str):
                    if cam["name"].strip():
                        names[(row["site"], row["unit_id"], cam["id"])] = cam["name"].strip()[:80]
        return names

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
    ) -> list[dict[str, Any]]:
        """Every unit heard from, by site and unit, as the fleet shows it (central/fleet.py `unit_row`:
        `health`, `watchlist_state` with `expiry_warning_s`, `level` and `reasons`), against HQ's latest
        list for the unit's site: `published`, `publications()` when already read."""
        now = time.time() if now is None else now
        settings = settings or HealthSettings(expiry_warning_s=expiry_warning_s)
        published = self.publications() if published is None else published
        return [
            unit_row(row, now, published.get(row["site"]), settings, expiry_warning_s)
            for row in self._read("SELECT * FROM units ORDER BY site, unit_id")
        ]

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

    def publications(self) -> dict[str, dict[str, Any]]:
        """HQ's latest watchlist per site, as recorded by `set_publication`: version, published_at
        (HQ's clock), seen_at (when the centre first saw it), topic."""
        return {r["site"]: r for r in self._read("SELECT * FROM watchlist_published")}

    def export_jsonl(
        self, fh: IO[str], *, since: float | None = None, with_crops: bool = False, actor: str | None = None
    ) -> int:
        """Write hits oldest first, one JSON object per line, with their sighting's decisions; times
        as ISO 8601 UTC (`captured_at`, `queued_at`, `received_at`, `reviewed_at`, a review's `at`);
        crops as base64 if asked. The export is entered in the audit chain as `actor`'s. Returns the
        count."""
        n = 0
        for row in self.hits(limit=None, since=since, newest_first=False):
            row = _iso_times(row)
            row["reviews"] = [_iso_times(r) for r in self.reviews(row["id"])]
            if with_crops:
                crop = self.crop(row["id"])
                row["crop_jpeg_b64"] = base64.b64encode(crop).decode("ascii") if crop else None
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

    def purge(self, older_than_s: float, now: float | None = None, *, actor: str = "receiver") -> int:
        """Delete hits (with crops and reviews) and rejects received more than `older_than_s` ago,
        and expired sessions; returns hits deleted. The audit chain is kept, and a purge that
        deleted hits or rejects is entered in it as `actor`'s (the receiver's hourly retention by
        default), with how many of each and the cut-off."""
        now = time.time() if now is None else now
        cutoff = now - older_than_s
        old = "SELECT id FROM hits WHERE received_at < ?"
        with self._tx() as q:
            q(f"DELETE FROM crops WHERE hit_id IN ({old})", (cutoff,))
            q(f"DELETE FROM reviews WHERE hit_id IN ({old})", (cutoff,))
            q("DELETE FROM hits WHERE received_at < ?", (cutoff,))
            n = q.rowcount
            # A sighting goes with its last hit; one that lost its best hit shows its best remaining one.
            q("DELETE FROM sightings WHERE NOT EXISTS (SELECT 1 FROM hits WHERE hits.sighting_id = sightings.id)")
            q(
                "UPDATE sightings SET best_hit_id = (SELECT id FROM hits WHERE hits.sighting_id = sightings.id "
                "ORDER BY score DESC, id LIMIT 1) WHERE NOT EXISTS (SELECT 1 FROM hits WHERE hits.id = sightings.best_hit_id)"
            )
            q("DELETE FROM rejects WHERE received_at < ?", (cutoff,))
            rejects = q.rowcount
            q("DELETE FROM sessions WHERE expires_at < ?", (now,))
            if n or rejects:
                detail = {"older_than_days": older_than_s / 86400, "cutoff": cutoff, "hits": n, "rejects": rejects}
                self._audit(q, actor, "purge", None, detail)
        return int(n)

    # --- accounts and sessions ----------------------------------------------------------------

    def add_user(self, username: str, role: str, password_hash: str, *, actor: str) -> None:
        """Register an operator or supervisor (the password already hashed)."""
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        problem = accounts.username_problem(username)
        if problem:
            raise StoreError(
                f"this user name cannot be used: {problem} (at most {accounts.MAX_USERNAME_CHARS} characters, "
                "no control or direction characters, no spaces around)"
            )
        with self._tx() as q:
            q(
                "INSERT INTO users(username, role, password_hash, active, created_at) VALUES (?,?,?,1,?) "
                "ON CONFLICT (username) DO NOTHING",
                (username, role, password_hash, time.time()),
            )
            if q.rowcount != 1:
                raise StoreError(f"user {username!r} already exists (use `checkpoint-receiver user passwd`)")
            self._audit(q, actor, "user_add", username, {"role": role})

    def set_password(self, username: str, password_hash: str, *, actor: str) -> None:
        """Replace a user's password hash and end their sessions."""
        self._change_user(username, "password_hash = ?, changed_at = ?", (password_hash,), actor, "user_passwd")

    def disable_user(self, username: str, *, actor: str) -> None:
        """Stop a user from logging in or deciding, and end their sessions."""
        self._change_user(username, "active = 0, changed_at = ?", (), actor, "user_disable")

    def unlock_user(self, username: str, *, actor: str) -> None:
        """End the login lockouts of a user: moving `changed_at` makes consoles forget the failed
        logins they counted for the name (their sessions stay)."""
        self._change_user(username, "changed_at = ?", (), actor, "user_unlock", end_sessions=False)

    def _change_user(
        self, username: str, sets: str, args: tuple, actor: str, action: str, *, end_sessions: bool = True
    ) -> None:
        with self._tx() as q:
            q(f"UPDATE users SET {sets} WHERE username = ?", (*args, time.time(), username))
            if q.rowcount != 1:
                raise StoreError(f"no user {username!r} (see `checkpoint-receiver user add`)")
            if end_sessions:
                q("DELETE FROM sessions WHERE username = ?", (username,))
            self._audit(q, actor, action, username, {})

    def user(self, username: str) -> dict[str, Any] | None:
        rows = self._read(
            "SELECT username, role, password_hash, active, changed_at FROM users WHERE username = ?", (username,)
        )
        return rows[0] if rows else None

    def users(self) -> list[dict[str, Any]]:
        return self._read("SELECT username, role, active, created_at, changed_at FROM users ORDER BY username")

    def create_session(self, token_hash: str, username: str, csrf: str, ttl_s: float) -> None:
        now = time.time()
        with self._tx() as q:
            q(
                "INSERT INTO sessions(token_hash, username, csrf, created_at, last_seen, expires_at) "
                "VALUES (?,?,?,?,?,?)",
                (token_hash, username, csrf, now, now, now + ttl_s),
            )

    def session(self, token_hash: str, idle_s: float) -> dict[str, Any] | None:
        """The live session with this token hash (joined with its active user), or None; touches it."""
        now = time.time()
        rows = self._read(
            "SELECT s.token_hash, s.username, s.csrf, s.last_seen, s.expires_at, u.role FROM sessions s "
            "JOIN users u ON u.username = s.username WHERE s.token_hash = ? AND u.active = 1",
            (token_hash,),
        )
        if not rows or rows[0]["expires_at"] < now or now - rows[0]["last_seen"] > idle_s:
            return None
        # Written at most every 30 s (every quarter of a shorter idle timeout): an open console page
        # touches its session through its event stream, which must land well within the timeout.
        if now - rows[0]["last_seen"] > min(30.0, idle_s / 4):
            with self._tx() as q:
                q("UPDATE sessions SET last_seen = ? WHERE token_hash = ?", (now, token_hash))
        return rows[0]

    def session_owner(self, token_hash: str) -> str | None:
        """Whose session this token was, live or ended by time (ended by logout, a new password or
        a disabled account, it is gone), or None."""
        rows = self._read(
            "SELECT s.username FROM sessions s JOIN users u ON u.username = s.username "
            "WHERE s.token_hash = ? AND u.active = 1",
            (token_hash,),
        )
        return rows[0]["username"] if rows else None

    def on_duty(self, within_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Who is on duty: users with a live session seen within `within_s` (an open console page keeps
        it fresh), each once, by name: username, role, since (their earliest such session's start)."""
        now = time.time() if now is None else now
        return self._read(
            "SELECT s.username, u.role, MIN(s.created_at) AS since FROM sessions s "
            "JOIN users u ON u.username = s.username WHERE u.active = 1 AND s.last_seen >= ? AND s.expires_at > ? "
            "GROUP BY s.username, u.role ORDER BY s.username",
            (now - within_s, now),
        )

    def end_session(self, token_hash: str) -> None:
        with self._tx() as q:
            q("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    # --- audit --------------------------------------------------------------------------------

    def audit(self, actor: str, action: str, subject: str | None = None, detail: dict | None = None) -> None:
        """Append an entry to the audit chain."""
        with self._tx() as q:
            self._audit(q, actor, action, subject, detail or {})

    def audit_entries(self, *, limit: int | None = 200, newest_first: bool = True) -> list[dict[str, Any]]:
        sql = f"SELECT * FROM audit ORDER BY seq {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self._read(sql)

    def iter_audit(self, chunk: int = 1000) -> Iterator[dict[str, Any]]:
        """Every audit entry, oldest first, read in chunks."""
        after = 0
        while True:
            rows = self._read("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, chunk))
            if not rows:
                return
            yield from rows
            after = rows[-1]["seq"]

    def verify_audit(self, expect: audit_chain.Head | None = None) -> audit_chain.Verdict:
        """Check every entry's hash and its link to the one before, and that the chain still holds
        the head `expect` noted earlier (so a cut or rewritten tail shows)."""
        return audit_chain.verify(self.iter_audit(), expect)

    def audit_head(self) -> audit_chain.Head:
        """The newest entry's number and hash (0 and GENESIS when the chain is empty), unchecked."""
        rows = self._read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        if not rows:
            return audit_chain.Head(0, audit_chain.GENESIS)
        return audit_chain.Head(int(rows[0]["seq"]), rows[0]["hash"])

    def export_audit_jsonl(self, fh: IO[str], *, actor: str | None = None) -> int:
        """Write the audit chain oldest first as JSON lines (with hashes, so a copy can be verified);
        the export itself is entered as `actor`'s afterwards. Returns the count written."""
        n = 0
        for row in self.iter_audit():
            # `at` stays as stored (the hash covers it); `at_utc` beside it is for people.
            row["at_utc"] = iso_time(row["at"])
            fh.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n")
            n += 1
        if actor:
            self.audit(actor, "export", None, {"what": "audit", "count": n})
        return n


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


def iso_time(ts: float | None) -> str | None:
    """A time as ISO 8601 UTC with milliseconds (2025-03-01T12:00:00.250Z); None stays None, and a
    time no calendar holds is given as its number."""
    if ts is None:
        return None
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def _iso_times(row: dict[str, Any]) -> dict[str, Any]:
    return {k: iso_time(v) if k in _TIME_FIELDS else v for k, v in row.items()}


def _csv_cell(value: Any) -> Any:
    # Ids and reasons come from units and operators: a cell starting with = + - @ would run as a
    # formula in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


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


def _chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
