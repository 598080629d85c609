"""The verdicts the receiver answers each hit's unit with, on ``checkpoint/v1/<site>/<unit>/verdicts``:
'stored', 'duplicate' or 'refused' with the quarantine's reason, one message per unit and batch (split
at `wire.records.MAX_VERDICTS`), addressed by the topic a hit came on, never by its payload.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from central.admission import Incoming
from wire import records, topics
from wire.errors import ProtocolError

# A hit's id where its payload cannot be decoded (not JSON, oversized and cut to its prefix): the unit
# writes "id" third, so the prefix the rejects table keeps holds it. Only ever used to address a
# verdict to the unit of the topic the message came on, which ignores ids it does not hold.
_ID_IN_PAYLOAD = re.compile(rb'"id"\s*:\s*"([^"\\]{1,128})"')


def hit_id_of(payload: bytes) -> str | None:
    """The id a hit message claims, if one can be read from it (decoded or not), else None."""
    try:
        body = json.loads(payload)
        found = body.get("id") if isinstance(body, dict) else None
    except (ValueError, RecursionError):
        m = _ID_IN_PAYLOAD.search(payload)
        found = m.group(1).decode("utf-8", "replace") if m else None
    return found if isinstance(found, str) and records.id_problem(found) is None else None


@dataclass(frozen=True)
class VerdictMessage:
    """One verdicts message: where it goes, what it says, and how many verdicts it carries."""

    topic: str
    payload: bytes
    count: int


def verdict_messages(
    stored: Sequence[tuple[dict[str, Any], bytes | None, float]],
    new: Sequence[bool],
    refused: Sequence[tuple[Incoming, str, str]],
) -> tuple[list[VerdictMessage], int]:
    """A batch's verdicts as messages, one per unit (split at MAX_VERDICTS): each hit `stored` is
    'stored' or, when not `new`, 'duplicate'; each message `refused` (with its reason and error) is
    'refused' to the unit of its topic. Also returns how many verdicts have no unit to go to (a
    refused message whose hit id or topic cannot be read)."""
    by_unit: dict[tuple[str, str], list[records.Verdict]] = {}
    unaddressed = 0
    for (fields, _, _), is_new in zip(stored, new):
        verdict = records.Verdict(fields["id"], "stored" if is_new else "duplicate")
        by_unit.setdefault((fields["site"], fields["unit_id"]), []).append(verdict)
    for m, reason, error in refused:
        hit_id = hit_id_of(m.payload)
        try:
            site, unit_id, _ = topics.parse_topic(m.topic)
        except ProtocolError:
            site = unit_id = ""
        if hit_id is None or not site:
            # Nobody to tell: the unit sends it again when its verdict is overdue, and it is
            # quarantined again (its rejects show it).
            unaddressed += 1
            continue
        by_unit.setdefault((site, unit_id), []).append(records.Verdict(hit_id, "refused", reason, error))
    messages = []
    for (site, unit_id), verdicts in by_unit.items():
        try:
            topic = topics.verdict_topic(site, unit_id)
        except ProtocolError:
            unaddressed += len(verdicts)
            continue
        for i in range(0, len(verdicts), records.MAX_VERDICTS):
            part = verdicts[i : i + records.MAX_VERDICTS]
            messages.append(VerdictMessage(topic, records.verdict_payload(site, unit_id, part), len(part)))
    return messages, unaddressed
