"""The audit chain: each entry carries the SHA-256 of its content and of the entry before it.

An entry edited in the database no longer matches its hash; a deleted entry leaves a gap in the
sequence numbers and breaks the next entry's link. Only an attacker who rewrites the whole tail of
the chain goes unnoticed, which is why `checkpoint-receiver audit verify` prints the head hash:
written down elsewhere (a ticket, a paper log), it pins everything before it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
COLUMNS = ("seq", "at", "actor", "action", "subject", "detail", "prev_hash", "hash")


def entry_hash(seq: int, at: float, actor: str, action: str, subject: str | None, detail: str, prev: str) -> str:
    """SHA-256 over the entry's fields and the previous entry's hash, as canonical JSON."""
    body = json.dumps([int(seq), float(at), actor, action, subject, detail, prev], separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def make_entry(
    seq: int, at: float, actor: str, action: str, subject: str | None, detail: dict[str, Any], prev: str
) -> dict[str, Any]:
    """A new entry, linked to `prev` (the hash of the entry before it, or GENESIS)."""
    text = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {
        "seq": seq,
        "at": at,
        "actor": actor,
        "action": action,
        "subject": subject,
        "detail": text,
        "prev_hash": prev,
        "hash": entry_hash(seq, at, actor, action, subject, text, prev),
    }


@dataclass(frozen=True)
class Verdict:
    """The result of checking a chain: `ok`, how many entries were checked, the head hash, and the
    first problem found (None when ok)."""

    ok: bool
    entries: int
    head: str
    problem: str | None = None


def verify(rows: Iterable[dict[str, Any]]) -> Verdict:
    """Check that entries (oldest first) are numbered 1, 2, 3..., each linked to the one before and
    each matching its own hash."""
    prev, expected, n = GENESIS, 1, 0
    for row in rows:
        seq = int(row["seq"])
        if seq != expected:
            what = f"entries {expected}..{seq - 1} are missing (deleted?)" if seq > expected else "out of order"
            return Verdict(False, n, prev, f"entry {seq}: {what}")
        if row["prev_hash"] != prev:
            return Verdict(False, n, prev, f"entry {seq}: its link to entry {seq - 1} does not match (edited?)")
        digest = entry_hash(seq, row["at"], row["actor"], row["action"], row["subject"], row["detail"], prev)
        if digest != row["hash"]:
            return Verdict(False, n, prev, f"entry {seq}: its content does not match its hash (edited?)")
        prev, expected, n = row["hash"], expected + 1, n + 1
    return Verdict(True, n, prev)
