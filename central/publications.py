"""HQ's watchlist publications as the centre sees them: which version HQ last announced per site.

HQ publishes each site's list under ``checkpoint/v1/<site>/watchlist/`` with a retained manifest
per slot (``full/manifest``, ``delta/manifest``; watchlist/format/transport.py has the layout). The
receiver subscribes to the manifests alone (never to the chunks) and records the newest version per
site (`HitStore.set_publication`), so the fleet page can show a unit running an older list.

The manifest is read here rather than with watchlist.format, which the centre does not import
(docs/architecture.md); only the two fields the centre needs are taken. A manifest is not signed
(the bundle is), and only HQ's account may write there; it is still checked like anything else
that comes over the broker.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from wire.errors import ProtocolError
from wire.topics import TOPIC_ROOT

MANIFEST_SUBSCRIPTION = f"{TOPIC_ROOT}/+/watchlist/+/manifest"
"""What the receiver subscribes to (its broker account needs read there)."""
MAX_MANIFEST_BYTES = 64 * 1024
MAX_VERSION = 2**63 - 1
_SLOTS = ("full", "delta")
_TOPIC = re.compile(re.escape(TOPIC_ROOT) + r"/([^/]+)/watchlist/([^/]+)/manifest")


def manifest_site(topic: str) -> str | None:
    """The site of a manifest topic, or None when `topic` is not one."""
    m = _TOPIC.fullmatch(topic)
    return m.group(1) if m else None


def read_manifest(topic: str, payload: bytes) -> tuple[int, float | None] | None:
    """The version a manifest announces and HQ's time of publication (None if it has none that
    makes sense); None for an empty payload (a cleared retained message). ProtocolError naming the
    problem for anything else that is not a manifest of the slot its topic names."""
    if not payload:
        return None
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ProtocolError(f"watchlist manifest of {len(payload)} bytes is over the limit of {MAX_MANIFEST_BYTES}")
    try:
        body: Any = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"watchlist manifest is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("watchlist manifest must be a JSON object")
    slot = topic.rsplit("/", 2)[-2]
    if slot not in _SLOTS or body.get("kind") != slot:
        raise ProtocolError(f"watchlist manifest on the {slot!r} slot must say kind {slot!r}")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_VERSION:
        raise ProtocolError("watchlist manifest 'version' must be a whole number from 1")
    published = body.get("published_at")
    if isinstance(published, (int, float)) and not isinstance(published, bool) and math.isfinite(published):
        return version, float(published) if published > 0 else None
    return version, None
