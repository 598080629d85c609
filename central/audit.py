"""The audit chain: each entry carries the SHA-256 of its content and of the entry before it.

An entry edited in the database no longer matches its hash; a deleted entry leaves a gap in the
sequence numbers and breaks the next entry's link. Entries cut from the end, or a tail rewritten
consistently, leave a chain that checks out: that is what the head is for. `checkpoint-receiver
audit head` prints it as COUNT:HASH; written down elsewhere (a ticket, a paper log) and given back
to `audit verify --expect-head`, it pins everything up to it, and a chain that has fewer entries
now, or another entry at that number, fails.
"""

from __future__ import annotations

import hashlib
import json
import re
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


class AuditError(ValueError):
    """A head given on the command line that cannot be read."""


@dataclass(frozen=True)
class Head:
    """The chain's newest entry as noted elsewhere: how many entries (its number) and its hash."""

    count: int
    hash: str

    def __str__(self) -> str:
        return f"{self.count}:{self.hash}"


_HEAD = re.compile(r"(\d+):([0-9a-f]{64})")


def parse_head(text: str) -> Head:
    """A head written as COUNT:HASH (what `audit head` prints)."""
    m = _HEAD.fullmatch(text.strip().lower())
    if m is None:
        raise AuditError(
            f"cannot read the head {text[:80]!r}: write COUNT:HASH as `checkpoint-receiver audit head` prints it "
            "(an entry count, a colon, 64 hex digits)"
        )
    return Head(int(m.group(1)), m.group(2))


@dataclass(frozen=True)
class Verdict:
    """The result of checking a chain: `ok`, how many entries were checked, the head hash, and the
    first problem found (None when ok)."""

    ok: bool
    entries: int
    head: str
    problem: str | None = None


def verify(rows: Iterable[dict[str, Any]], expect: Head | None = None) -> Verdict:
    """Check that entries (oldest first) are numbered 1, 2, 3..., each linked to the one before and
    each matching its own hash; and, given `expect` (a head noted earlier), that the chain still
    reaches it and entry `expect.count` is the one noted, so a cut or rewritten tail shows."""
    prev, expected, n = GENESIS, 1, 0
    noted = GENESIS if expect is not None and expect.count == 0 else None
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
        if expect is not None and n == expect.count:
            noted = prev
    if expect is not None:
        if n < expect.count:
            return Verdict(
                False,
                n,
                prev,
                f"the chain has {n} entries but had {expect.count} when the head was noted: "
                f"entries {n + 1}..{expect.count} were cut off (truncated?)",
            )
        if noted != expect.hash:
            return Verdict(
                False, n, prev, f"entry {expect.count} is not the one noted in the head (the tail rewritten?)"
            )
    return Verdict(True, n, prev)
