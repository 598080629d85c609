"""What the outbox holds, counted in memory beside its file, and which rows the transport has."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    """The outbox's figures and the rows handed to the transport, guarded by the outbox's lock. A
    figure changes only once the transaction it mirrors committed."""

    rows: int  # every hit held: pending, awaiting a verdict and quarantined
    size: int  # bytes of hit data held (records and crops), what max_bytes bounds
    quarantined: int  # hits the centre refused, kept with their reason
    # Awaiting a verdict: when it is overdue (monotonic) and how often it was sent again.
    awaiting: dict[int, tuple[float, int]]
    last_refusal: str  # the latest refused hit and its reason ("" when none is kept)
    verdict_seen: bool  # a verdict ever came to this outbox's file: from now on verdicts are expected
    inflight: set[int] = field(default_factory=set)  # handed out by take, not yet acknowledged
    acked: set[int] = field(default_factory=set)  # acknowledged, their state change (or delete) not yet committed
    resending: set[int] = field(default_factory=set)  # awaiting rows handed out again by take

    @property
    def unsent(self) -> int:
        """Hits the broker has not acknowledged yet."""
        return self.rows - len(self.awaiting) - self.quarantined

    def busy(self) -> set[int]:
        """Rows the transport holds or that were sent: never dropped, never handed out again."""
        return self.inflight | self.acked

    def forget(self, seq: int) -> None:
        """A row that left the awaiting state by its verdict: neither in flight nor overdue any more."""
        self.awaiting.pop(seq, None)
        self.inflight.discard(seq)
        self.acked.discard(seq)
        self.resending.discard(seq)
