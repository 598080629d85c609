"""Operators' and supervisors' passwords, session tokens and the login rate limit."""

from __future__ import annotations

import hashlib
import itertools
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIN_PASSWORD_LENGTH = 10
MAX_USERNAME_CHARS = 64
PAIR_ATTEMPTS = 5
"""Failed logins for one user name from one address before that pair must wait."""
ADDRESS_ATTEMPTS = 20
"""Failed logins from one address, whatever the names, before that address must wait."""
LOCKOUT_WINDOW_S = 300.0
MAX_LIMITER_ENTRIES = 10_000
"""(name, address) pairs and addresses the limiter remembers; the least recent are forgotten first."""

# Control characters (C0, DEL, C1), the line and paragraph separators, lone surrogates (no UTF-8
# form: PostgreSQL and the audit chain's JSON refuse them) and the direction marks and overrides
# that make a name read differently from what it is.
_REFUSED_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


class AccountError(ValueError):
    """A password or login that cannot be accepted, with what to do."""


def username_problem(name: str) -> str | None:
    """Why `name` cannot be a user name (empty, longer than MAX_USERNAME_CHARS, a control,
    separator or direction character, spaces around it), or None when it can. Checked before a
    name typed at the login is looked up or entered in the audit chain."""
    if not name:
        return "empty"
    if len(name) > MAX_USERNAME_CHARS:
        return f"longer than {MAX_USERNAME_CHARS} characters ({len(name)})"
    bad = _REFUSED_IN_NAMES.search(name)
    if bad:
        return f"holds the character U+{ord(bad.group()):04X} at position {bad.start()}"
    if name != name.strip():
        return "has spaces around it"
    return None


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


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    generation: Any = None


class LoginLimiter:
    """At most `pair_attempts` failed logins for one user name from one address, and
    `address_attempts` from one address whatever the names, in `window_s`; more are refused without
    checking the password until the window has passed.

    A name is never locked for everyone: someone guessing from elsewhere only locks their own
    (name, address) pair. Failures recorded under an older `generation` of the account (its
    `changed_at`, moved by `user unlock` or a new password) no longer count. Only failures are
    remembered, expired ones are dropped, and at most `max_entries` pairs and addresses are kept
    (the least recently failing forgotten first), so guessing names cannot grow it without bound.
    """

    def __init__(
        self,
        pair_attempts: int = PAIR_ATTEMPTS,
        address_attempts: int = ADDRESS_ATTEMPTS,
        window_s: float = LOCKOUT_WINDOW_S,
        *,
        max_entries: int = MAX_LIMITER_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pair_attempts = pair_attempts
        self.address_attempts = address_attempts
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        # (name, address) for a pair, (None, address) for the address as a whole; in order of the
        # latest failure, so the first entries are the ones to forget.
        self._entries: dict[tuple[str | None, str], _Failures] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many pairs and addresses it holds failures for."""
        return len(self._entries)

    def _keys(self, name: str | None, address: str) -> list[tuple[tuple[str | None, str], int]]:
        keys: list[tuple[tuple[str | None, str], int]] = [((None, address), self.address_attempts)]
        if name is not None:
            keys.append(((name, address), self.pair_attempts))
        return keys

    def _current(self, key: tuple[str | None, str], generation: Any) -> _Failures | None:
        failures = self._entries.get(key)
        if failures is not None and key[0] is not None and failures.generation != generation:
            return None
        return failures

    def retry_after(self, name: str | None, address: str, generation: Any = None) -> float:
        """Seconds until a login for `name` (None: a name refused unread) from `address` may be
        tried; 0 when it may now. `generation`: the account's changed_at (None if no such account)."""
        now = self._clock()
        waits = []
        with self._lock:
            for key, limit in self._keys(name, address):
                failures = self._current(key, generation)
                if failures is not None and len(failures.times) >= limit:
                    waits.append(self.window_s - (now - failures.times[-limit]))
        return max([w for w in waits if w > 0], default=0.0)

    def failed(self, name: str | None, address: str, generation: Any = None) -> None:
        """Count a failed login for `name` (None: a refused name, counted for the address only)."""
        now = self._clock()
        with self._lock:
            for key, _ in self._keys(name, address):
                failures = self._current(key, generation) or _Failures(generation=generation)
                self._entries.pop(key, None)
                failures.times.append(now)
                while now - failures.times[0] >= self.window_s:
                    failures.times.popleft()
                self._entries[key] = failures
            if len(self._entries) > self.max_entries or now >= self._next_sweep:
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        expired = [k for k, f in self._entries.items() if now - f.times[-1] >= self.window_s]
        for key in expired:
            del self._entries[key]
        if len(self._entries) > self.max_entries:
            # Down to 90%, so that a flood of new names does not sweep the whole table at every failure.
            excess = len(self._entries) - self.max_entries * 9 // 10
            for key in list(itertools.islice(self._entries, excess)):
                del self._entries[key]
        self._next_sweep = now + self.window_s

    def succeeded(self, name: str, address: str) -> None:
        """Forget the failures of this name from this address (the address's own count stays)."""
        with self._lock:
            self._entries.pop((name, address), None)
