"""What the console's browser tests share: the accounts and their passwords, the receiver on a plain
broker, a unit key the receiver holds, and logging in through the login page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from central import accounts
from central.receiver import Receiver, ReceiverConfig
from central.store import HitStore
from testing.broker import wait_for
from wire.signing import generate_unit_key, public_key_line, write_unit_key

PASSWORDS = {"ana": "ana-password-1", "ben": "ben-password-1", "sam": "sam-password-1"}
ROLES = {"ana": "operator", "ben": "operator", "sam": "supervisor"}


def add_users(store: HitStore, *names: str) -> None:
    """The accounts `names` (of PASSWORDS), each with its role in ROLES."""
    for name in names:
        store.add_user(name, ROLES[name], accounts.hash_password(PASSWORDS[name]), actor="test")


def signing_unit(tmp: Path) -> Path:
    """unit-1 of site-a signs with tmp/unit-1.key, whose public half is in tmp/unit-keys; the key's path."""
    signer = generate_unit_key()
    key = write_unit_key(signer, tmp / "unit-1.key")
    (tmp / "unit-keys").write_text(public_key_line("site-a", "unit-1", signer.public_raw) + "\n")
    return key


def start_receiver(broker: Any, store: HitStore, client_id: str, **kw: Any) -> Receiver:
    """A receiver on `broker` (no accounts) into `store`, started and subscribed."""
    rx = Receiver(
        ReceiverConfig(host=broker.host, port=broker.port, client_id=client_id, reconnect_min_delay_s=0.1, **kw),
        store,
    )
    rx.start()
    wait_for(rx.subscribed.is_set, what="receiver subscribed")
    return rx


def login(page: Any, url: str, user: str) -> None:
    page.goto(url + "/hits")
    assert "/login" in page.url, "no page without a session"
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    page.click("button[type=submit]")
    page.wait_for_url("**/hits")
