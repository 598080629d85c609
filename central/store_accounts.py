"""Operators' accounts and console sessions in the hit store: add, change and disable users (each
change entered in the audit chain), sessions by their token's hash, who is on duty.
"""

from __future__ import annotations

import time
from typing import Any

from central import accounts
from central.store_core import StoreCore, StoreError

ROLES = ("operator", "supervisor")


class AccountStore(StoreCore):
    """Accounts and sessions (`central.store.HitStore` is one)."""

    def add_user(self, username: str, role: str, password_hash: str, *, actor: str) -> None:
        """Register an operator or supervisor (the password already hashed)."""
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        problem = accounts.username_problem(username)
        if problem:
            raise StoreError(
                f"this user name cannot be used: {problem} (at most {accounts.MAX_USERNAME_CHARS} characters, "
                "no control or direction characters, no spaces around)"
            )
        with self._tx() as q:
            q(
                "INSERT INTO users(username, role, password_hash, active, created_at) VALUES (?,?,?,1,?) "
                "ON CONFLICT (username) DO NOTHING",
                (username, role, password_hash, time.time()),
            )
            if q.rowcount != 1:
                raise StoreError(f"user {username!r} already exists (use `checkpoint-receiver user passwd`)")
            self._audit(q, actor, "user_add", username, {"role": role})

    def set_password(self, username: str, password_hash: str, *, actor: str) -> None:
        """Replace a user's password hash and end their sessions."""
        self._change_user(username, "password_hash = ?, changed_at = ?", (password_hash,), actor, "user_passwd")

    def disable_user(self, username: str, *, actor: str) -> None:
        """Stop a user from logging in or deciding, and end their sessions."""
        self._change_user(username, "active = 0, changed_at = ?", (), actor, "user_disable")

    def unlock_user(self, username: str, *, actor: str) -> None:
        """End the login lockouts of a user: moving `changed_at` makes consoles forget the failed
        logins they counted for the name (their sessions stay)."""
        self._change_user(username, "changed_at = ?", (), actor, "user_unlock", end_sessions=False)

    def _change_user(
        self, username: str, sets: str, args: tuple, actor: str, action: str, *, end_sessions: bool = True
    ) -> None:
        with self._tx() as q:
            q(f"UPDATE users SET {sets} WHERE username = ?", (*args, time.time(), username))
            if q.rowcount != 1:
                raise StoreError(f"no user {username!r} (see `checkpoint-receiver user add`)")
            if end_sessions:
                q("DELETE FROM sessions WHERE username = ?", (username,))
            self._audit(q, actor, action, username, {})

    def user(self, username: str) -> dict[str, Any] | None:
        rows = self._read(
            "SELECT username, role, password_hash, active, changed_at FROM users WHERE username = ?", (username,)
        )
        return rows[0] if rows else None

    def users(self) -> list[dict[str, Any]]:
        return self._read("SELECT username, role, active, created_at, changed_at FROM users ORDER BY username")

    def create_session(self, token_hash: str, username: str, csrf: str, ttl_s: float) -> None:
        now = time.time()
        with self._tx() as q:
            q(
                "INSERT INTO sessions(token_hash, username, csrf, created_at, last_seen, expires_at) "
                "VALUES (?,?,?,?,?,?)",
                (token_hash, username, csrf, now, now, now + ttl_s),
            )

    def session(self, token_hash: str, idle_s: float) -> dict[str, Any] | None:
        """The live session with this token hash (joined with its active user), or None; touches it."""
        now = time.time()
        rows = self._read(
            "SELECT s.token_hash, s.username, s.csrf, s.last_seen, s.expires_at, u.role FROM sessions s "
            "JOIN users u ON u.username = s.username WHERE s.token_hash = ? AND u.active = 1",
            (token_hash,),
        )
        if not rows or rows[0]["expires_at"] < now or now - rows[0]["last_seen"] > idle_s:
            return None
        # Written at most every 30 s (every quarter of a shorter idle timeout): an open console page
        # touches its session through its event stream, which must land well within the timeout.
        if now - rows[0]["last_seen"] > min(30.0, idle_s / 4):
            with self._tx() as q:
                q("UPDATE sessions SET last_seen = ? WHERE token_hash = ?", (now, token_hash))
        return rows[0]

    def session_owner(self, token_hash: str) -> str | None:
        """Whose session this token was, live or ended by time (ended by logout, a new password or
        a disabled account, it is gone), or None."""
        rows = self._read(
            "SELECT s.username FROM sessions s JOIN users u ON u.username = s.username "
            "WHERE s.token_hash = ? AND u.active = 1",
            (token_hash,),
        )
        return rows[0]["username"] if rows else None

    def on_duty(self, within_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Who is on duty: users with a live session seen within `within_s` (an open console page keeps
        it fresh), each once, by name: username, role, since (their earliest such session's start)."""
        now = time.time() if now is None else now
        return self._read(
            "SELECT s.username, u.role, MIN(s.created_at) AS since FROM sessions s "
            "JOIN users u ON u.username = s.username WHERE u.active = 1 AND s.last_seen >= ? AND s.expires_at > ? "
            "GROUP BY s.username, u.role ORDER BY s.username",
            (now - within_s, now),
        )

    def end_session(self, token_hash: str) -> None:
        with self._tx() as q:
            q("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))
