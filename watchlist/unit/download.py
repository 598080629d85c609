"""What the unit's watchlist subscriber knows about downloads: the bundle being assembled from
its chunks, the announcements it gave up and the digests it will not fetch again, and from these
why the unit is behind the newest version announced."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from watchlist.format.transport import SLOTS, Manifest, chunk_topic

FAILED_KEPT = 64  # refused bundle digests remembered; older ones may be fetched (and refused) once more


@dataclass
class Assembly:
    """A bundle being downloaded. Chunks are kept as they arrive: the (unsigned) manifest's size is
    never allocated up front, so a manifest alone cannot make the unit reserve memory."""

    slot: str
    manifest: Manifest
    chunks: dict[int, bytes] = field(default_factory=dict)
    # When the last chunk came (or the download started, or the link came back): a download that
    # makes no progress for download_stall_s is given up.
    progress_at: float = field(default_factory=time.monotonic)

    @property
    def topic(self) -> str:
        return chunk_topic("", self.slot, self.manifest.version, "+")

    @property
    def have(self) -> int:
        return len(self.chunks)

    def assembled(self) -> bytes:
        data = b"".join(self.chunks[i] for i in range(self.manifest.chunks))
        self.chunks.clear()
        return data


@dataclass(frozen=True)
class GivenUp:
    """An announcement the unit stopped trying to download, and why (for the log and status)."""

    manifest: Manifest
    why: str
    retry_on_reconnect: bool = False


class FailedDigests:
    """The digests of bundles refused (or announced wrongly), newest `limit` of them: not fetched again."""

    def __init__(self, limit: int = FAILED_KEPT) -> None:
        self.limit = limit
        self._digests: OrderedDict[str, None] = OrderedDict()

    def add(self, digest: str) -> None:
        self._digests[digest] = None
        self._digests.move_to_end(digest)
        while len(self._digests) > self.limit:
            self._digests.popitem(last=False)

    def __contains__(self, digest: object) -> bool:
        return digest in self._digests

    def __len__(self) -> int:
        return len(self._digests)


def bundle_to_fetch(
    applied: int, manifests: dict[str, Manifest], given_up: dict[str, GivenUp], failed: FailedDigests
) -> Manifest | None:
    """The announced bundle that moves a unit holding `applied` forward: the delta on the applied
    version, unless a newer full bundle is announced (a stuck or stale delta must not hold the unit
    back from it); else a full bundle newer than the applied version. None: nothing to fetch (an
    announcement refused before or given up is not fetched again)."""

    def worth(m: Manifest) -> bool:
        g = given_up.get(m.kind)
        return m.sha256 not in failed and (g is None or g.manifest != m)

    delta, full = manifests.get("delta"), manifests.get("full")
    if not (delta and delta.base_version == applied and delta.version > applied and worth(delta)):
        delta = None
    if not (full and full.version > applied and worth(full)):
        full = None
    return delta if delta is not None and (full is None or delta.version >= full.version) else full


def why_behind(
    applied: int,
    assembly: Assembly | None,
    manifests: dict[str, Manifest],
    given_up: dict[str, GivenUp],
    failed: FailedDigests,
) -> tuple[str, bool]:
    """Why the unit holds `applied` while a newer version is announced (each slot's story), and
    whether it is stuck (False: a download is under way)."""
    if assembly is not None:
        return f"downloading the {assembly.slot} bundle version {assembly.manifest.version}", False
    parts = []
    for slot in SLOTS:
        m, g = manifests.get(slot), given_up.get(slot)
        if m is None:
            parts.append(f"no {slot} bundle is announced")
        elif g is not None and g.manifest == m:
            parts.append(f"the {slot} bundle version {m.version} {g.why}")
        elif m.sha256 in failed:
            parts.append(f"the {slot} bundle version {m.version} was refused before")
        elif m.version <= applied:
            parts.append(f"the {slot} bundle announced is version {m.version}, not newer")
        elif slot == "delta" and m.base_version != applied:
            parts.append(f"the delta version {m.version} applies to version {m.base_version}, not to this one")
    return "; ".join(parts), True
