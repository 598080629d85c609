"""The errors of the watchlist tools; each message says what is wrong and what to do."""

from __future__ import annotations


class WatchlistError(Exception):
    """Base of the errors raised by `sync`."""


class BundleRejected(WatchlistError):
    """A bundle (or key set) failed verification; the unit keeps the list it has.

    `reason` is a short stable code for logs, status and tests (see `REASONS`); the message
    explains it for a person.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


REASONS = {
    "oversized": "larger than the unit's limit (max_bundle_bytes); nothing was parsed",
    "not_a_bundle": "does not start with the bundle or key-set magic bytes",
    "truncated": "the section lengths do not add up to the size received",
    "bad_keyset_signature": "the key set is not signed by the root key this unit pins",
    "keyset_rollback": "a stand-alone key set older than the one the unit holds",
    "unknown_key": "signed by a key the current key set does not list",
    "revoked_key": "signed by a key the current key set revokes",
    "bad_signature": "the signature does not match the bytes (tampered, or signed by another key)",
    "malformed": "signed, but its header does not follow the format (or cannot be parsed at all)",
    "out_of_range": "signed, but a number in it is beyond the format's limits (version, times, dimension, counts)",
    "wrong_dimension": "embeddings of another size than the unit's engine produces",
    "bad_embedding": "a template is not a unit-length vector of finite numbers",
    "bad_threshold": "a threshold outside the range calibrated for the model",
    "wrong_model": "embeddings of another model than the unit's",
    "rollback": "not newer than the version the unit holds",
    "wrong_base": "a delta against another version than the one the unit holds",
    "expired": "past its expiry time",
    "no_canary": "a list without the canary person, on a unit whose canary is on ([canary] in its config)",
}


class BundleFileError(WatchlistError):
    """A bundle file cannot be opened or read (missing, permissions, a read error)."""


class KeyFileError(WatchlistError):
    """A key file is missing, unreadable, or not the kind of key expected."""


class StoreError(WatchlistError):
    """The unit's watchlist store cannot be opened or is not a watchlist store."""


class RegisterError(WatchlistError):
    """HQ's register (enrolled persons, released versions) refused an operation."""


class EnrolmentError(WatchlistError):
    """An enrolment manifest or folder cannot be read."""


class PublishError(WatchlistError):
    """A bundle could not be published to the broker."""
