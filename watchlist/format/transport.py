"""How a bundle travels over MQTT: the topics under a site's prefix and the manifest that announces it.

Topics under the site's prefix (``[watchlist] topic`` on the unit)::

    <prefix>/full/manifest             retained JSON: the latest full bundle (see Manifest)
    <prefix>/full/<version>/<i>        retained raw chunk i of that bundle
    <prefix>/delta/manifest            the latest delta, same layout
    <prefix>/delta/<version>/<i>
    <prefix>/keyset                    retained: the current key set (rotation, revocation)

Chunks go first and the manifest last, so a unit that sees a manifest finds its chunks; the
previous version's chunks are then cleared (an empty retained message deletes one). A delta is
always followed by the full bundle of the same version on the full slot (watchlist.hq.publish),
so a unit that missed a delta catches up from it. The manifest is not trusted by units beyond
deciding what to download: the bundle's signature decides.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
MAX_CHUNKS = 100_000
SLOTS = ("full", "delta")


def manifest_topic(prefix: str, slot: str) -> str:
    return f"{prefix}/{slot}/manifest"


def chunk_topic(prefix: str, slot: str, version: int, index: int | str) -> str:
    return f"{prefix}/{slot}/{version}/{index}"


def keyset_topic(prefix: str) -> str:
    return f"{prefix}/keyset"


@dataclass(frozen=True)
class Manifest:
    """Announces a bundle on a slot: what it is, how big, and how it is cut."""

    kind: str
    version: int
    base_version: int | None
    size: int
    sha256: str
    chunk_bytes: int
    chunks: int
    published_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse an (untrusted) manifest; ValueError names what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest of {len(data)} bytes is too large")
        try:
            d = json.loads(data)
            m = cls(
                kind=str(d["kind"]),
                version=int(d["version"]),
                base_version=None if d["base_version"] is None else int(d["base_version"]),
                size=int(d["size"]),
                sha256=str(d["sha256"]),
                chunk_bytes=int(d["chunk_bytes"]),
                chunks=int(d["chunks"]),
                published_at=float(d["published_at"]),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"manifest is not valid: {exc}") from None
        if m.kind not in SLOTS or m.version < 1 or m.size < 1 or m.chunk_bytes < 1 or len(m.sha256) != 64:
            raise ValueError("manifest fields out of range")
        if m.chunks != math.ceil(m.size / m.chunk_bytes) or m.chunks > MAX_CHUNKS:
            raise ValueError(f"manifest says {m.chunks} chunks for {m.size} bytes in chunks of {m.chunk_bytes}")
        return m

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)
