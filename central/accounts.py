"""Operators' and supervisors' passwords, session tokens and the login rate limit."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque

MIN_PASSWORD_LENGTH = 10


class AccountError(ValueError):
    """A password or login that cannot be accepted, with what to do."""


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def hash_password(password: str) -> str:
    """Argon2id hash of a password of at least MIN_PASSWORD_LENGTH characters."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher().hash(password)


def check_password(password_hash: str, password: str) -> bool:
    """True if `password` matches the stored argon2 hash."""
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return bool(_hasher().verify(password_hash, password))
    except (VerificationError, InvalidHashError):
        return False


# Checked against when the user does not exist, so a login takes as long either way.
_DUMMY_HASH = None


def check_login(user: dict | None, password: str) -> bool:
    """True if `user` (a store row or None) is active and the password is theirs."""
    global _DUMMY_HASH
    if user is None or not user.get("active"):
        if _DUMMY_HASH is None:
            _DUMMY_HASH = _hasher().hash(secrets.token_hex(8))
        check_password(_DUMMY_HASH, password)
        return False
    return check_password(user["password_hash"], password)


def new_token() -> tuple[str, str]:
    """A session token for the cookie and its SHA-256, which is all the store keeps."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LoginLimiter:
    """At most `attempts` failed logins per user name and per client address in `window_s`; more
    are refused without checking the password until the window has passed."""

    def __init__(self, attempts: int = 5, window_s: float = 300.0) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until a login for this user from this address may be tried; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            waits = [
                self.window_s - (now - q[0])
                for q in (self._recent(f"u:{username}", now), self._recent(f"a:{address}", now))
                if len(q) >= self.attempts
            ]
        return max(waits, default=0.0)

    def failed(self, username: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"u:{username}", f"a:{address}"):
                self._recent(key, now).append(now)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(f"u:{username}", None)
