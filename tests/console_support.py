"""What the console's browser tests share: the accounts and their passwords, the receiver on a plain
broker, a unit key the receiver holds, a whole site (broker, receiver, console, one signing unit),
sending a hit through it, and logging in through the login page."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
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


@contextmanager
def console_site(tmp: Path, name: str, status: Callable[[], dict[str, Any]]) -> Iterator[SimpleNamespace]:
    """Mosquitto, a store with ana, ben and sam, a receiver holding unit-1's key (so its list version
    enters the audit chain), the console over HTTP with the demo's register and enrolment photos, and
    unit-1 of site-a reporting signed hits with `status` as its heartbeat; all stopped at the end."""
    from central.console import ConsoleSettings, create_app
    from central.register_view import RegisterView
    from central.webserver import BackgroundServer
    from edge.outbox import OutboxConfig
    from edge.reporter import MqttConfig, MqttReporter
    from testing.broker import FAST, MosquittoBroker, find_mosquitto
    from testing.console_demo import seed_demo
    from tests.services import missing_service

    if find_mosquitto() is None:
        missing_service("needs the mosquitto broker binary (apt-get install -y mosquitto mosquitto-clients)")
    broker = MosquittoBroker(tmp / "broker").start()
    demo = seed_demo(tmp / "demo")  # its register (case-2019-0007 removed in 42) and enrolment photos
    store = HitStore(tmp / "hits.sqlite")
    add_users(store, "ana", "ben", "sam")
    key = signing_unit(tmp)
    rx = start_receiver(broker, store, f"rx-{name}", reconnect_max_delay_s=0.5, unit_keys=tmp / "unit-keys")
    app = create_app(store, register=RegisterView(demo.register, demo.photos), settings=ConsoleSettings(poll_s=0.25))
    server = BackgroundServer(app).start()
    reporter = MqttReporter(
        MqttConfig(host=broker.host, port=broker.port, site="site-a", signing_key=key, **FAST),
        OutboxConfig(path=tmp / "outbox.sqlite"),
        "unit-1",
        status,
    )
    try:
        yield SimpleNamespace(broker=broker, store=store, rx=rx, url=server.url, reporter=reporter, tmp=tmp, demo=demo)
    finally:
        reporter.close()
        server.stop()
        rx.close()
        store.close()
        broker.kill()


def send(site: SimpleNamespace, **fields: Any) -> str:
    """A hit with a face crop (`fields` over make_hit's) through the site's unit, once it is stored; its id."""
    from testing.hits import face_jpeg, make_hit

    hit = make_hit(crop=face_jpeg(), **fields)
    site.reporter.submit(hit)
    wait_for(lambda: site.store.hit(hit.id) is not None, what=f"hit {hit.id} stored")
    return hit.id


def login(page: Any, url: str, user: str) -> None:
    page.goto(url + "/hits")
    assert "/login" in page.url, "no page without a session"
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    page.click("button[type=submit]")
    page.wait_for_url("**/hits")
