"""Hostile logins and the audit chain's tail, on SQLite and on a real PostgreSQL cluster, over real
HTTP: user names that are too long or carry control characters, forwarded headers from clients
that are not trusted proxies, lockouts per (name, address) and a supervisor lifting one, the
limiter's memory, purges in the audit chain, the chain's head pinning its tail, and the command
line escaping direction overrides."""

from __future__ import annotations

import re
import sqlite3
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner

from central import accounts
from central.cli import main as cli
from central.console import create_app
from central.store import HitStore
from central.webserver import BackgroundServer
from testing.hits import make_hit
from wire import records

PASSWORDS = {"ana": "ana-password-1", "sam": "sam-password-1"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hits.sqlite"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url):
    s = HitStore(store_url)
    s.add_user("ana", "operator", accounts.hash_password(PASSWORDS["ana"]), actor="test")
    s.add_user("sam", "supervisor", accounts.hash_password(PASSWORDS["sam"]), actor="test")
    yield s
    s.close()


@pytest.fixture
def console(store, store_url):
    server = BackgroundServer(create_app(store)).start()
    yield SimpleNamespace(url=server.url, store=store, db=store_url)
    server.stop()


def raw_sql(store, sql: str, args=()) -> None:
    """Change the database behind the store's back, as someone with database access could."""
    if store.dialect == "sqlite":
        conn = sqlite3.connect(store.path)
        with conn:
            conn.execute(sql, args)
        conn.close()
    else:
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), args)


def login(client: httpx.Client, user: str, password: str, **kw) -> httpx.Response:
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    return client.post("/login", data={"csrf": token, "username": user, "password": password}, **kw)


def logins(store) -> list[dict]:
    return [e for e in store.audit_entries(limit=None, newest_first=False) if e["action"] == "login"]


def test_hostile_user_names_get_the_normal_failure_and_stay_out_of_the_audit_chain(console, tmp_path):
    names = ["x" * 1_000_000, "ana\x00", "\x00", "ana\u202e", "a\nb", " ana"]
    with httpx.Client(base_url=console.url) as c:
        for name in names:
            r = login(c, name, PASSWORDS["ana"])
            assert r.status_code == 401 and "wrong user name or password" in r.text, repr(name[:8])
    entries = logins(console.store)
    assert len(entries) == len(names)
    assert all(e["actor"] == "?" and '"ok":false' in e["detail"] for e in entries)
    assert max(len(e["detail"]) for e in entries) < 200, "the refused name is described, not stored"
    assert "longer than 64 characters" in entries[0]["detail"] and "U+0000" in entries[1]["detail"]
    assert console.store.verify_audit().ok
    res = CliRunner().invoke(cli, ["review", "--db", console.db, "x", "confirm", "--user", "ana\x00"])
    assert res.exit_code == 2 and "U+0000" in res.output
    pw = tmp_path / "pw"
    pw.write_text("a-long-password")
    for name, says in (("x" * 65, "longer than 64"), ("ana\u202e", "U+202E")):
        res = CliRunner().invoke(cli, ["user", "add", "--db", console.db, "--password-file", str(pw), name])
        assert res.exit_code == 1 and says in res.output and name not in res.output
    with httpx.Client(base_url=console.url) as c:
        login(c, "ana", PASSWORDS["ana"])
        for path in ("/hits?person=%00", "/hits/rows?camera=a%00", "/hit?id=%00", "/hit/crop?id=%00"):
            assert c.get(path).status_code in (400, 404), path
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/hits").text).group(1)
        r = c.post("/hit/decide", data={"id": "x\x00", "decision": "reject", "reason": "a", "csrf": token})
        assert r.status_code == 400 and "NUL" in r.text


def test_forwarded_headers_count_only_from_a_configured_proxy(store):
    server = BackgroundServer(create_app(store)).start()
    try:
        with httpx.Client(base_url=server.url) as c:
            # Each try claims another client address; none is believed, so all count against 127.0.0.1.
            for i in range(accounts.ADDRESS_ATTEMPTS):
                r = login(c, f"guess-{i}", "wrong-password", headers={"X-Forwarded-For": f"203.0.113.{i}"})
                assert r.status_code == 401
            r = login(c, "ana", PASSWORDS["ana"], headers={"X-Forwarded-For": "198.51.100.1"})
            assert r.status_code == 429
        assert {e["detail"] for e in logins(store)} == {'{"address":"127.0.0.1","ok":false}'}
    finally:
        server.stop()
    # Behind a proxy named as trusted, the address it forwards is the client's.
    server = BackgroundServer(create_app(store), trusted_proxies=["127.0.0.1"]).start()
    try:
        with httpx.Client(base_url=server.url) as c:
            r = login(c, "ana", PASSWORDS["ana"], headers={"X-Forwarded-For": "198.51.100.7"})
            assert r.status_code == 303
        assert logins(store)[-1]["detail"] == '{"address":"198.51.100.7","ok":true}'
    finally:
        server.stop()


def test_a_lockout_holds_one_name_from_one_address_and_a_supervisor_lifts_it(console):
    elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=console.url, transport=elsewhere) as attacker:
        for _ in range(accounts.PAIR_ATTEMPTS):
            assert login(attacker, "ana", "wrong-password").status_code == 401
        assert login(attacker, "ana", PASSWORDS["ana"]).status_code == 429
    with httpx.Client(base_url=console.url) as c:
        assert login(c, "ana", PASSWORDS["ana"]).status_code == 303, "ana's own address is not locked"
    with httpx.Client(base_url=console.url) as c:
        for _ in range(accounts.PAIR_ATTEMPTS):
            assert login(c, "ana", "wrong-password").status_code == 401
        assert login(c, "ana", PASSWORDS["ana"]).status_code == 429
        res = CliRunner().invoke(cli, ["user", "unlock", "--db", console.db, "ana"])
        assert res.exit_code == 0, res.output
        assert login(c, "ana", PASSWORDS["ana"]).status_code == 303
    unlock = next(e for e in console.store.audit_entries(limit=None) if e["action"] == "user_unlock")
    assert unlock["subject"] == "ana" and unlock["actor"].startswith("cli:")
    res = CliRunner().invoke(cli, ["user", "unlock", "--db", console.db, "nobody"])
    assert res.exit_code == 1 and "no user 'nobody'" in res.output


def test_the_login_limiter_forgets_old_failures_and_stays_bounded():
    now = [1000.0]
    limiter = accounts.LoginLimiter(clock=lambda: now[0], max_entries=100)
    for i in range(1000):
        assert limiter.retry_after(f"name-{i}", "192.0.2.1") == 0
    assert len(limiter) == 0, "asking keeps nothing"
    for i in range(1000):
        limiter.failed(f"name-{i}", f"10.0.{i // 200}.{i % 200}")
    assert len(limiter) <= 100
    for _ in range(accounts.PAIR_ATTEMPTS):
        limiter.failed("ana", "192.0.2.9")
    assert limiter.retry_after("ana", "192.0.2.9") == pytest.approx(300)
    assert limiter.retry_after("ana", "192.0.2.8") == 0
    assert limiter.retry_after("ana", "192.0.2.9", generation=1.5) == 0, "the account changed since"
    now[0] += 301
    assert limiter.retry_after("ana", "192.0.2.9") == 0
    limiter.failed("ben", "192.0.2.7")
    assert len(limiter) == 2, "expired entries are dropped"


def test_purge_is_entered_in_the_audit_chain(store, store_url):
    fields, crop = records.decode_hit(records.hit_payload(records.hit_record(make_hit(), "site-a"), None, None))
    store.add_hit(fields, crop, received_at=1000.0)
    store.add_reject("checkpoint/v1/s/u/hits", b"junk", "not JSON", received_at=1000.0)
    before = store.verify_audit().entries
    assert store.purge(86400) == 1
    entry = store.audit_entries(limit=1)[0]
    assert (entry["action"], entry["actor"]) == ("purge", "receiver")
    assert '"hits":1' in entry["detail"] and '"rejects":1' in entry["detail"]
    assert store.purge(86400) == 0
    assert store.verify_audit().entries == before + 1, "a purge that deletes nothing is not entered"
    store.add_hit({**fields, "id": "b" * 32}, crop, received_at=1000.0)
    res = CliRunner().invoke(cli, ["purge", "--db", store_url, "--older-than-days", "30"])
    assert res.exit_code == 0 and "deleted 1 hits" in res.output
    entry = store.audit_entries(limit=1)[0]
    assert (
        entry["action"] == "purge" and entry["actor"].startswith("cli:") and '"older_than_days":30' in entry["detail"]
    )
    assert store.verify_audit().ok


def test_the_head_noted_elsewhere_shows_a_truncated_or_rewritten_tail(console):
    store, db = console.store, console.db
    with httpx.Client(base_url=console.url) as supervisor:
        login(supervisor, "sam", PASSWORDS["sam"])
        for n in range(3):
            store.audit("sam", "view_crop", f"hit-{n}")
        runner = CliRunner()
        res = runner.invoke(cli, ["audit", "head", "--db", db])
        head = res.output.strip()
        last = store.audit_entries(limit=1)[0]
        assert res.exit_code == 0 and head == f"{last['seq']}:{last['hash']}" == "6:" + last["hash"]
        assert head in supervisor.get("/audit").text, "the audit page shows the head in full"
    store.audit("sam", "view_crop", "hit-9")
    res = runner.invoke(cli, ["audit", "verify", "--db", db, "--expect-head", head])
    assert res.exit_code == 0, "a chain that grew since still holds the head"
    raw_sql(store, "DELETE FROM audit WHERE seq >= ?", (5,))
    assert runner.invoke(cli, ["audit", "verify", "--db", db]).exit_code == 0, "without the head it cannot tell"
    res = runner.invoke(cli, ["audit", "verify", "--db", db, "--expect-head", head])
    assert res.exit_code == 1 and "4 entries" in res.output and "6 when the head was noted" in res.output
    # An attacker who appends anew past the old length still does not meet the head.
    for n in range(3):
        store.audit("sam", "view_crop", f"forged-{n}")
    res = runner.invoke(cli, ["audit", "verify", "--db", db, "--expect-head", head])
    assert res.exit_code == 1 and "entry 6 is not the one noted" in res.output
    res = runner.invoke(cli, ["audit", "verify", "--db", db, "--expect-head", "6:nothex"])
    assert res.exit_code == 2 and "COUNT:HASH" in res.output


def test_the_hits_command_escapes_direction_overrides(tmp_path):
    db = str(tmp_path / "hits.sqlite")
    store = HitStore(db)
    fields, crop = records.decode_hit(records.hit_payload(records.hit_record(make_hit(), "site-a"), None, None))
    # The wire refuses control characters but not U+202E; a store may hold them from older receivers.
    store.add_hit({**fields, "person_id": "case-1\u202e1-esac", "camera_id": "gate\u2066\x1b[2J"}, crop)
    store.close()
    res = CliRunner().invoke(cli, ["hits", "--db", db])
    assert res.exit_code == 0
    assert "\u202e" not in res.output and "\u2066" not in res.output and "\x1b" not in res.output
    assert "person=case-1\\u202e1-esac" in res.output and "camera=gate\\u2066\\x1b[2J" in res.output
