"""The console over real HTTP (uvicorn on a loopback port, httpx as the client): no page without a
session, no POST without the CSRF token, cookie flags with and without TLS, the login rate limit,
roles, escaping, and the checkpoint-receiver commands around accounts and reviews."""

from __future__ import annotations

import csv
import html
import re
import ssl

import httpx
import pytest
from click.testing import CliRunner

from central import accounts
from central.cli import main as cli
from central.console import ConsoleSettings, create_app
from central.register_view import RegisterView
from central.store import HitStore
from central.webserver import BackgroundServer
from testing.console_demo import DEMO_PERSONS, DEMO_USERS, seed_demo
from testing.hits import face_jpeg, make_hit
from wire import records

PAGES = ["/", "/hits", "/hit?id=x", "/fleet", "/audit"]
FRAGMENTS = ["/hits/rows", "/hit/panel?id=x", "/hit/crop?id=x", "/person/photo?person=x&n=0", "/fleet/rows", "/events"]
POSTS = ["/logout", "/hit/decide", "/audit/export", "/hits/export"]


@pytest.fixture
def demo(tmp_path):
    data = seed_demo(tmp_path / "demo")
    store = HitStore(data.db)
    app = create_app(store, register=RegisterView(data.register, data.photos))
    server = BackgroundServer(app).start()
    yield server.url, store, data
    server.stop()
    store.close()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def login(client: httpx.Client, user: str, password: str) -> httpx.Response:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"csrf": token, "username": user, "password": password})


def password(user: str) -> str:
    return next(p for u, _, p in DEMO_USERS if u == user)


def test_nothing_without_a_session(demo):
    url, _, _ = demo
    with httpx.Client(base_url=url) as c:
        for path in PAGES:
            r = c.get(path)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
        for path in FRAGMENTS:
            assert c.get(path).status_code == 401, path
        for path in POSTS:
            assert c.post(path, data={"csrf": "x"}).status_code in (303, 401), path
        r = c.get("/login")
        assert r.status_code == 200 and "Log in" in r.text


def test_every_post_needs_the_csrf_token(demo):
    url, store, _ = demo
    hit_id = store.hits(review_state="pending")[0]["id"]
    with httpx.Client(base_url=url) as c:
        # The login form has its own token, double-submitted in a cookie.
        r = c.post("/login", data={"username": "sam", "password": password("sam")})
        assert r.status_code == 403
        assert login(c, "sam", password("sam")).status_code == 303
        token = csrf_of(c.get("/hits").text)
        for path in POSTS:
            for data in ({"id": hit_id, "decision": "confirm"}, {"id": hit_id, "decision": "confirm", "csrf": "bad"}):
                assert c.post(path, data=data).status_code == 403, path
        assert store.reviews(hit_id) == [] or all(r["username"] != "sam" for r in store.reviews(hit_id))
        r = c.post("/hit/decide", data={"id": hit_id, "decision": "confirm", "csrf": token})
        assert r.status_code == 303
        assert store.reviews(hit_id)[-1]["username"] == "sam"
        r = c.post("/audit/export", data={"csrf": token})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        assert store.audit_entries(limit=1)[0]["action"] == "export"
        assert c.post("/logout", data={"csrf": token}).status_code == 303
        assert c.get("/hits").status_code == 303, "the session ended"


def test_session_cookie_flags_and_security_headers(demo, tls_files):
    url, store, _ = demo
    with httpx.Client(base_url=url) as c:
        r = login(c, "ana", password("ana"))
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
        page = c.get("/hits")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
        assert c.get("/audit").status_code == 403, "the audit page is for supervisors"
    # Over TLS the cookie is Secure.
    server = BackgroundServer(create_app(store), tls_cert=tls_files.server_cert, tls_key=tls_files.server_key).start()
    try:
        with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=str(tls_files.ca))) as c:
            assert "Secure" in login(c, "ana", password("ana")).headers["set-cookie"]
    finally:
        server.stop()


def test_login_is_rate_limited_and_next_stays_on_site(demo):
    url, store, _ = demo
    with httpx.Client(base_url=url) as c:
        token = csrf_of(c.get("/login").text)
        r = c.post(
            "/login", data={"csrf": token, "username": "sam", "password": password("sam"), "next": "//evil.example/"}
        )
        assert r.status_code == 303 and r.headers["location"] == "/hits"
    with httpx.Client(base_url=url) as c:
        token = csrf_of(c.get("/login").text)
        r = c.post(
            "/login",
            data={"csrf": token, "username": "sam", "password": password("sam"), "next": "/x\r\nSet-Cookie: a=b"},
        )
        assert (
            r.status_code == 303 and r.headers["location"] == "/hits" and "a=b" not in r.headers.get("set-cookie", "")
        )
    # A hit's link opened without a session comes back to that hit, with its id, after the login.
    with httpx.Client(base_url=url) as c:
        r = c.get("/hit?id=c0ffee06&x=1")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fhit%3Fid%3Dc0ffee06%26x%3D1"
        page = c.get(r.headers["location"]).text
        token = csrf_of(page)
        nxt = re.search(r'name="next" value="([^"]+)"', page).group(1)
        r = c.post(
            "/login", data={"csrf": token, "username": "sam", "password": password("sam"), "next": html.unescape(nxt)}
        )
        assert r.status_code == 303 and r.headers["location"] == "/hit?id=c0ffee06&x=1"
    with httpx.Client(base_url=url) as c:
        for _ in range(5):
            assert login(c, "ben", "wrong-password").status_code == 401
        r = login(c, "ben", password("ben"))
        assert r.status_code == 429 and "too many failed logins" in r.text
    failed = [e for e in store.audit_entries(limit=None) if e["action"] == "login" and '"ok":false' in e["detail"]]
    assert len(failed) == 5


def test_text_from_units_is_escaped(demo):
    url, store, _ = demo
    hostile = "<script>alert(1)</script>\"'&\x1b[31m"
    hit = make_hit(crop=face_jpeg())
    fields, crop = records.decode_hit(
        records.hit_payload(records.hit_record(hit, "site-a"), crop=hit.crop_jpeg, crop_dropped=None)
    )
    # The wire refuses control characters in ids; a store written by an older receiver may hold
    # them anyway, so the pages must escape whatever the store holds.
    store.add_hit({**fields, "person_id": hostile, "camera_id": hostile}, crop)
    with httpx.Client(base_url=url) as c:
        login(c, "ana", password("ana"))
        for path in ("/hits", f"/hit?id={hit.id}", "/hits/rows"):
            html = c.get(path).text
            assert "<script>alert" not in html and "\x1b" not in html, path
            assert "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&#39;&amp;\\x1b[31m" in html, path


def test_cli_review_uses_the_two_person_rule_and_short_ids(tmp_path):
    db = str(tmp_path / "hits.sqlite")
    store = HitStore(db)
    for user in ("ana", "ben"):
        store.add_user(user, "operator", accounts.hash_password(f"{user}-password-1"), actor="test")
    # Two persons: hits of one person at one unit close in time would be one sighting, decided once.
    for hit_id, person in (("aa11" + "0" * 28, "person-7"), ("aa22" + "0" * 28, "person-8")):
        fields, crop = records.decode_hit(
            records.hit_payload(records.hit_record(make_hit(id=hit_id, person_id=person), "site-a"), None, None)
        )
        store.add_hit(fields, crop)
    store.close()
    runner = CliRunner()

    def review(user: str, *args: str, password: str | None = None):
        env = {"CHECKPOINT_OPERATOR_PASSWORD": password or f"{user}-password-1"}
        return runner.invoke(cli, ["review", "--db", db, *args, "--user", user], env=env)

    res = review("ana", "aa11", "confirm", password="wrong-password")
    assert res.exit_code == 1 and "wrong password for ana" in res.output
    res = review("ana", "aa11", "confirm")
    assert res.exit_code == 0 and "pending (a second operator must confirm it)" in res.output
    res = review("ana", "aa11", "confirm")
    assert res.exit_code == 1 and "second, different operator" in res.output
    res = review("mallory", "aa11", "confirm")
    assert res.exit_code == 1 and "wrong password for mallory" in res.output
    res = review("ben", "aa11", "confirm")
    assert res.exit_code == 0 and f"hit aa11{'0' * 28}: confirmed" in res.output
    res = review("ben", "aa", "reject", "--reason", "x")
    assert res.exit_code == 1 and "several hit ids" in res.output
    res = review("ben", "aa22", "reject")
    assert res.exit_code == 1 and "needs a reason" in res.output
    res = review("ben", "aa22", "reject", "--reason", "another man")
    assert res.exit_code == 0 and "rejected" in res.output
    res = runner.invoke(cli, ["hits", "--db", db, "--state", "confirmed"])
    assert "aa11" in res.output and "aa22" not in res.output


def test_cli_review_refuses_a_closed_case_as_the_console_does(tmp_path):
    data = seed_demo(tmp_path / "demo")  # its register: HQ removed DEMO_PERSONS[3] in version 42
    db = str(tmp_path / "hits.sqlite")
    store = HitStore(db)
    store.add_user("ana", "operator", accounts.hash_password("ana-password-1"), actor="test")
    removed = make_hit(id="cc11" + "0" * 28, person_id=DEMO_PERSONS[3][0])
    listed = make_hit(id="dd11" + "0" * 28, person_id=DEMO_PERSONS[0][0])
    for hit in (removed, listed):
        store.add_hit(*records.decode_hit(records.hit_payload(records.hit_record(hit, "site-a"), None, None)))
    store.close()
    runner = CliRunner()
    env = {"CHECKPOINT_OPERATOR_PASSWORD": "ana-password-1"}

    def review(*args: str):
        return runner.invoke(cli, ["review", "--db", db, *args, "--user", "ana"], env=env)

    res = review("--register", str(data.register), "cc11", "confirm")
    why = RegisterView(data.register).case_closed(removed.person_id)
    assert why is not None and re.fullmatch(
        r"HQ removed this person from the watchlist in version 42 on \d{4}-\d\d-\d\d \(UTC\)", why
    )
    said = f"case closed: {why}; a closed case cannot be confirmed"
    assert res.exit_code == 1 and said in res.output, res.output
    # The console refuses it in the same words (its 409 page shows the store's sentence).
    console = HitStore(db)
    try:
        from central.review import ReviewRefused, case_closed

        closed = case_closed(RegisterView(data.register), removed.person_id, "site-a", console.publications())
        with pytest.raises(ReviewRefused) as refused:
            console.decide(removed.id, "ana", "confirm", closed=closed)
        assert str(refused.value) == said
        assert console.reviews(removed.id) == []
    finally:
        console.close()
    # The register from centre.toml's [console] table does the same; a listed person is confirmed.
    (tmp_path / "centre.toml").write_text(f'[console]\nregister = "{data.register}"\n')
    res = review("--config", str(tmp_path / "centre.toml"), "cc11", "confirm")
    assert res.exit_code == 1 and said in res.output
    res = review("--config", str(tmp_path / "centre.toml"), "dd11", "confirm")
    assert res.exit_code == 0 and "pending" in res.output and "note:" not in res.output
    # Rejecting a closed case stays possible (it closes the sighting); without a register it is said
    # that the question was not asked.
    res = review("cc11", "reject", "--reason", "closed at HQ")
    assert res.exit_code == 0 and "rejected" in res.output


def test_cli_user_commands(tmp_path):
    db = str(tmp_path / "hits.sqlite")
    pw = tmp_path / "pw"
    pw.write_text("a-long-password\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["user", "add", "--db", db, "--role", "supervisor", "--password-file", str(pw), "carol"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["user", "add", "--db", db, "carol"], input="short\nshort\n")
    assert res.exit_code == 1 and "at least 10 characters" in res.output
    res = runner.invoke(cli, ["user", "add", "--db", db, "--password-file", str(pw), "carol"])
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(cli, ["user", "passwd", "--db", db, "carol"], input="another-password\nanother-password\n")
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["user", "disable", "--db", db, "carol"])
    assert res.exit_code == 0
    res = runner.invoke(cli, ["user", "list", "--db", db])
    assert "carol" in res.output and "supervisor" in res.output and "disabled" in res.output
    store = HitStore(db)
    try:
        assert not accounts.check_login(store.user("carol"), "another-password"), "disabled"
        actions = [e["action"] for e in store.audit_entries(limit=None, newest_first=False)]
        assert actions == ["user_add", "user_passwd", "user_disable"]
    finally:
        store.close()
    res = runner.invoke(cli, ["audit", "verify", "--db", db])
    assert res.exit_code == 0 and "3 entries" in res.output
    commands = [["serve"], ["purge"], ["user", "add"], ["user", "disable"], ["user", "passwd"], ["user", "unlock"]]
    for command in (*commands, ["audit", "verify"], ["audit", "head"]):
        assert "Example:" in runner.invoke(cli, [*command, "--help"]).output


def test_the_console_on_a_postgresql_store(postgres_url):
    store = HitStore(postgres_url)
    for user in ("ana", "ben"):
        store.add_user(user, "operator", accounts.hash_password(f"{user}-password-1"), actor="test")
    hit = make_hit(crop=face_jpeg(), person_id="case-1")
    fields, crop = records.decode_hit(records.hit_payload(records.hit_record(hit, "site-a"), hit.crop_jpeg, None))
    store.add_hit(fields, crop)
    server = BackgroundServer(create_app(store, settings=ConsoleSettings(poll_s=0.1))).start()
    try:
        for user in ("ana", "ben"):
            with httpx.Client(base_url=server.url) as c:
                login(c, user, f"{user}-password-1")
                assert hit.id in c.get("/hits/rows").text
                assert c.get("/hit/crop", params={"id": hit.id}).content == hit.crop_jpeg
                token = csrf_of(c.get("/hit", params={"id": hit.id}).text)
                assert (
                    c.post("/hit/decide", data={"id": hit.id, "decision": "confirm", "csrf": token}).status_code == 303
                )
        assert store.hit(hit.id)["review_state"] == "confirmed"
        assert store.verify_audit().ok
    finally:
        server.stop()
        store.close()


def test_cli_export_csv_with_iso_times(tmp_path):
    db = str(tmp_path / "hits.sqlite")
    store = HitStore(db)
    # A hostile person id that a spreadsheet would run as a formula.
    hit = make_hit(person_id='=HYPERLINK("x")', captured_at=1_700_000_000.25)
    fields, crop = records.decode_hit(records.hit_payload(records.hit_record(hit, "site-a"), None, None))
    store.add_hit(fields, crop, received_at=1_700_000_001.0)
    store.close()
    out = tmp_path / "hits.csv"
    res = CliRunner().invoke(cli, ["export", "--db", db, "--csv", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert rows[0]["captured_at"] == "2023-11-14T22:13:20.250Z" and rows[0]["received_at"] == "2023-11-14T22:13:21.000Z"
    assert rows[0]["person_id"] == '\'=HYPERLINK("x")' and rows[0]["sighting_id"] == hit.id
    res = CliRunner().invoke(cli, ["export", "--db", db, "--csv", str(out), "--with-crops"])
    assert res.exit_code == 2 and "--with-crops goes with --jsonl" in res.output
