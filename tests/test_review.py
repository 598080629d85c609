"""The two-person rule on its own (central/review.py), without a store: what a decision may do to a
sighting. tests/test_store.py checks the same through the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from central import review
from central.store import StoreError


def test_two_different_operators_confirm_and_one_rejection_closes() -> None:
    assert review.outcome("h1", "pending", "confirm", "ana", set()) == "pending"
    assert review.outcome("h1", "pending", "confirm", "ben", {"ana"}) == "confirmed"
    assert review.outcome("h1", "pending", "reject", "ben", set()) == "rejected"
    assert review.outcome("h1", "pending", "reject", "ana", {"ana"}) == "rejected"


def test_the_same_operator_cannot_confirm_twice() -> None:
    with pytest.raises(review.ReviewRefused, match="second, different operator"):
        review.outcome("h1", "pending", "confirm", "ana", {"ana"})


@pytest.mark.parametrize("state", ["confirmed", "rejected"])
def test_a_decided_sighting_takes_no_further_decisions(state: str) -> None:
    for decision in review.DECISIONS:
        with pytest.raises(review.ReviewRefused, match=f"hit h1 is already {state}"):
            review.outcome("h1", state, decision, "cara", set())


def test_a_decision_is_checked_before_anything_is_read() -> None:
    assert review.check_decision("confirm", "  ", None) is None
    assert review.check_decision("reject", "  older man  ", None) == "older man"
    with pytest.raises(review.ReviewRefused, match="decision must be one of confirm, reject"):
        review.check_decision("maybe", None, None)
    with pytest.raises(review.ReviewRefused, match="needs a reason"):
        review.check_decision("reject", " ", None)
    with pytest.raises(review.ReviewRefused, match="case closed: removed from the list"):
        review.check_decision("confirm", None, "removed from the list")
    # A closed case can still be rejected: that closes the sighting without an alert.
    assert review.check_decision("reject", "not him", "removed from the list") == "not him"


def test_only_an_active_operator_decides_and_refusals_are_store_errors() -> None:
    review.check_operator("ana", True)
    with pytest.raises(StoreError, match="no active user 'mallory'"):
        review.check_operator("mallory", False)
