"""The audit chain in the hit store: append, read, verify against a noted head, export as JSON lines.
The chain's hashing is `central/audit.py`; an audited write elsewhere in the store appends through
`StoreCore._audit`, in the write's own transaction.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import IO, Any

from central import audit as audit_chain
from central.store_core import StoreCore


def iso_time(ts: float | None) -> str | None:
    """A time as ISO 8601 UTC with milliseconds (2025-03-01T12:00:00.250Z); None stays None, and a
    time no calendar holds is given as its number."""
    if ts is None:
        return None
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(ts)


class AuditStore(StoreCore):
    """The audit chain's reads and appends (`central.store.HitStore` is one)."""

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
