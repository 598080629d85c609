"""The two-person rule: how operators' decisions close a sighting.

A sighting (and every hit in it) stays `pending` until two different operators have confirmed it
(`confirmed`), or one operator rejects it with a reason (`rejected`). A decided sighting takes no
further decisions, a case HQ has closed (the person was removed from the list) cannot be confirmed,
and only an active registered operator decides. The rule lives here alone, over plain facts; the
store (`central/store_sightings.py`, `SightingStore.decide`) reads those facts and records each
decision in one transaction, as a row in `reviews` and an entry in the audit chain.
"""

from __future__ import annotations

from typing import Any, Protocol

from central.store_core import StoreError

REVIEW_STATES = ("pending", "confirmed", "rejected")
DECISIONS = ("confirm", "reject")


class ReviewRefused(StoreError):
    """A decision the two-person rule does not allow; the message says why."""


def check_decision(decision: str, reason: str | None, closed: str | None) -> str | None:
    """The reason given with `decision`, trimmed (None when empty), checked before anything is read:
    ReviewRefused for an unknown decision, a rejection without a reason, or a confirmation of a case
    `closed` at HQ (`closed` says why it is)."""
    if decision not in DECISIONS:
        raise ReviewRefused(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    reason = (reason or "").strip() or None
    if decision == "reject" and not reason:
        raise ReviewRefused("a rejection needs a reason (say why this is not the person)")
    if decision == "confirm" and closed:
        raise ReviewRefused(f"case closed: {closed}; a closed case cannot be confirmed")
    return reason


class ClosedCases(Protocol):
    """What tells a closed case (central.register_view.RegisterView)."""

    def case_closed(self, person_id: str, published: int | None = None) -> str | None: ...


def case_closed(
    register: ClosedCases, person_id: str, site: str, publications: dict[str, dict[str, Any]]
) -> str | None:
    """Why `person_id`'s case is closed at HQ, or None: judged against the list HQ last published for
    `site` (`publications`, HitStore.publications), else the register's newest release. The console
    and `checkpoint-receiver review` ask this one question, so both refuse with the same words."""
    published = publications.get(site)
    return register.case_closed(person_id, published["version"] if published else None)


def check_operator(username: str, active: bool) -> None:
    """ReviewRefused unless `username` is a registered user whose account is active."""
    if not active:
        raise ReviewRefused(f"no active user {username!r}: decisions are taken by registered operators only")


def outcome(hit_id: str, state: str, decision: str, username: str, confirmers: set[str]) -> str:
    """The sighting's state after `username`'s `decision` (taken on its hit `hit_id`), given its
    `state` now and who has confirmed it so far: ReviewRefused when it is already decided, or when
    `username` confirms it a second time (the second confirmation must be another operator's)."""
    if state != "pending":
        raise ReviewRefused(f"hit {hit_id} is already {state}; a closed sighting takes no further decisions")
    if decision == "confirm" and username in confirmers:
        raise ReviewRefused(
            f"{username} has already confirmed hit {hit_id}: a second, different operator must confirm it"
        )
    if decision == "reject":
        return "rejected"
    return "confirmed" if confirmers else "pending"
