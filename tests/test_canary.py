"""The canary (issue 19, item 1): a real unit daemon with the real engine on the deployed site (TLS,
accounts, ACL, signed hits), a real receiver, HQ's own enrolment of the canary person from the pinned
picture. The canary passes end to end and shows at the centre without ever becoming a hit; a dead
camera does not stop it; a missing signing key, a list without the canary, a blocked ACL and wrong
embeddings each make it fail with the step named, and the fleet page shows the unit red with that
reason, in Chromium."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from central.health import evaluate
from central.receiver import Receiver
from central.store import HitStore
from testing.broker import HOST, wait_for
from testing.site import Site, make_site_credentials, start_deployed_broker
from wire.records import CANARY_PERSON_ID

DEAD_CAMERA = "rtsp://127.0.0.1:9/nothing-listens-here"


@pytest.fixture(scope="module")
def hq(tmp_path_factory: pytest.TempPathFactory, engine: Any) -> dict[str, Any]:
    """HQ as it works: keys, a register, the canary enrolled by `enrol_canary` from the pinned
    picture, one listed person beside it; a list with the canary and one built before it was enrolled."""
    from engines.cache import default_cache_dir
    from engines.canary_media import ensure_canary_picture, load_canary_picture
    from testing.media import lfw_face
    from watchlist.format.keys import generate_key, make_keyset, parse_keyset, save_public_key
    from watchlist.hq.build import canary_problem, choose_threshold, plan_bundle, release
    from watchlist.hq.enrol import PhotoEntry, enrol, enrol_canary
    from watchlist.hq.register import Register

    tmp = tmp_path_factory.mktemp("hq")
    root, signing = generate_key(), generate_key()
    keyset = parse_keyset(make_keyset(root, 1, [signing.public_key()], issued_at=int(time.time())), root.public_key())
    save_public_key(root.public_key(), tmp / "root.pub")
    import cv2

    cv2.imwrite(str(tmp / "listed.png"), np.ascontiguousarray(lfw_face(3)[:, ::-1]))
    register = Register(tmp / "register.db")
    report = enrol(register, engine, [PhotoEntry("case-1", tmp / "listed.png", age=30, where="listed")])
    assert report.persons == ["case-1"], report.rejected

    def build(name: str) -> Path:
        threshold = choose_threshold(register, engine.model_id).threshold
        bundle, digests, skipped = plan_bundle(register, model_id=engine.model_id, default_threshold=threshold)
        return release(register, bundle, digests, signing, keyset, out=tmp / name, skipped=skipped).path

    assert canary_problem(register, engine.model_id) is not None
    without = build("v1-without-canary.cpwl")
    photo = load_canary_picture(ensure_canary_picture(default_cache_dir()))
    assert enrol_canary(register, engine, photo) == 2
    assert enrol_canary(register, engine, photo) == 0  # again: nothing new
    assert canary_problem(register, engine.model_id) is None
    with_canary = build("v2-with-canary.cpwl")
    return {"root": tmp / "root.pub", "with": with_canary, "without": without}


@pytest.fixture
def site(tmp_path: Path, mosquitto_bin: str):
    creds = tmp_path / "creds"
    unit_keys = make_site_credentials(creds)
    broker = start_deployed_broker(tmp_path / "broker", creds)
    yield Site(broker, creds, unit_keys)
    broker.stop()


def unit_store(tmp: Path, hq: dict[str, Any], engine: Any, bundle: str) -> Path:
    from matching.matcher import Matcher
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    store = tmp / "unit-state" / "watchlist.db"
    wl = Watchlist(
        WatchlistConfig(root_key=hq["root"], store=store), Matcher(dim=engine.embedding_dim), engine.model_id
    )
    try:
        wl.offer_file(hq[bundle])
    finally:
        wl.close()
    return store


def unit_config(
    tmp: Path, site: Site, hq: dict[str, Any], store: Path, *, sign: bool = True, site_id: str = "site-a"
) -> Any:
    from edge.config import parse_config

    creds = site.creds
    key = f'signing_key = "{creds / "unit-1" / "signing.key"}"' if sign else ""
    return parse_config(
        f"""
[unit]
id = "unit-1"
site = "{site_id}"

[[cameras]]
id = "gate"
url = "{DEAD_CAMERA}"
open_timeout_s = 1
reconnect_max_s = 1

[watchlist]
root_key = "{hq["root"]}"
store = "{store}"

[mqtt]
host = "{HOST}"
port = {site.broker.port}
username = "site-a/unit-1"
password_file = "{creds / "unit-1" / "mqtt.pw"}"
tls = {{ ca_file = "{creds / "broker" / "ca.pem"}" }}
{key}
heartbeat_interval_s = 1
reconnect_min_delay_s = 0.1
reconnect_max_delay_s = 0.5

[outbox]
path = "{tmp / "outbox.sqlite"}"
verdicts = "require"
verdict_timeout_s = 5

[canary]
enabled = true
interval_s = 6
verdict_timeout_s = 10
""",
        base_dir=tmp,
    )


def receiver(site: Site, store: HitStore) -> Receiver:
    rx = Receiver(
        site.receiver_config("rx-canary"),
        store,
    )
    rx.start()
    wait_for(rx.subscribed.is_set, what="the receiver subscribed with its account")
    return rx


def unit_row(store: HitStore, unit_id: str = "unit-1") -> dict[str, Any]:
    return next((u for u in store.units() if u["unit_id"] == unit_id), {})


def canary_of(store: HitStore) -> dict[str, Any]:
    return ((unit_row(store).get("heartbeat") or {}).get("unit") or {}).get("canary") or {}


def reasons(store: HitStore) -> list[str]:
    return [r.text for r in evaluate(unit_row(store), time.time()).reasons]


class Running:
    """A unit daemon and a receiver on the site, stopped on exit."""

    def __init__(self, site: Site, tmp: Path, config: Any, engine: Any) -> None:
        from edge.daemon import Daemon
        from edge.notify import Notifier

        self.store = HitStore(tmp / "hits.sqlite")
        self.rx = receiver(site, self.store)
        self.daemon = Daemon(config, engine=engine, notifier=Notifier(environ={}))

    def __enter__(self) -> Running:
        import threading

        self.daemon.start()
        # run() is the unit's main loop: it starts each canary run when due, as under systemd.
        self.loop = threading.Thread(target=self.daemon.run, name="unit-main", daemon=True)
        self.loop.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.request_stop()
        self.loop.join(10)
        self.daemon.stop()
        self.rx.close()
        self.store.close()


def test_the_canary_passes_end_to_end_every_interval_and_never_becomes_a_hit(
    site: Site, hq: dict[str, Any], engine: Any, tmp_path: Path
) -> None:
    config = unit_config(tmp_path, site, hq, unit_store(tmp_path, hq, engine, "with"))
    with Running(site, tmp_path, config, engine) as run:
        wait_for(lambda: unit_row(run.store).get("last_canary_at"), 40, "the first canary recorded at the centre")
        first = unit_row(run.store)["last_canary_at"]
        # The camera is dead all along: the canary is its own source.
        wait_for(
            lambda: (unit_row(run.store).get("last_canary_at") or 0) > first + 3, 40, "a second canary, a period on"
        )
        wait_for(lambda: run.daemon.canary.passes >= 2, 20, lambda: f"two passes: {run.daemon.canary.status()}")
        wait_for(lambda: canary_of(run.store).get("state") == "passed", 20, "the heartbeat saying so")
        assert run.store.hits(limit=None) == []  # operators never see it
        assert run.rx.stats()["canaries"] >= 2 and run.rx.stats()["new"] == 0
        said = reasons(run.store)
        assert not [r for r in said if "canary" in r], said
        assert any("camera gate" in r for r in said), said  # the dead camera is red on its own
        status = run.daemon.status()
        assert status["canary"]["interval_s"] == 6 and status["watchlist"]["canary"] is True
        assert "canary" not in [c["id"] for c in status["cameras"]]
        assert not [w for w in run.daemon.warnings() if w.startswith("canary")]


def test_a_missing_signing_key_turns_the_unit_red_with_the_centres_refusal_in_chromium(
    site: Site, hq: dict[str, Any], engine: Any, tmp_path: Path, new_page: Any
) -> None:
    from playwright.sync_api import expect

    from central import accounts
    from central.console import ConsoleSettings, create_app
    from central.webserver import BackgroundServer

    config = unit_config(tmp_path, site, hq, unit_store(tmp_path, hq, engine, "with"), sign=False)
    with Running(site, tmp_path, config, engine) as run:
        wait_for(lambda: canary_of(run.store).get("state") == "failed", 40, "the unit reporting its canary failed")
        assert "the centre refused the canary hit: unsigned" in canary_of(run.store)["reason"]
        assert unit_row(run.store).get("last_canary_at") is None and run.store.hits(limit=None) == []
        red = [r for r in evaluate(unit_row(run.store), time.time()).reasons if r.text.startswith("canary failed")]
        assert red and red[0].level == "red", reasons(run.store)
        run.store.add_user("ana", "operator", accounts.hash_password("ana-password-1"), actor="test")
        server = BackgroundServer(create_app(run.store, settings=ConsoleSettings(poll_s=0.25))).start()
        try:
            page = new_page()
            page.goto(server.url + "/fleet")
            page.fill("input[name=username]", "ana")
            page.fill("input[name=password]", "ana-password-1")
            page.click("button[type=submit]")
            page.goto(server.url + "/fleet")
            row = page.locator("tr[data-unit='site-a/unit-1']")
            # Its status is unsigned too, so quarantined: the centre knows it only from its heartbeat.
            expect(row).to_have_class(re.compile(r"\blevel-red\b"))
            expect(row.locator("li.reason.red").filter(has_text="canary failed")).to_contain_text(
                "the centre refused the canary hit: unsigned"
            )
        finally:
            server.stop()


def test_a_list_without_the_canary_is_refused_and_one_held_from_before_fails_the_canary(
    site: Site, hq: dict[str, Any], engine: Any, tmp_path: Path
) -> None:
    from matching.matcher import Matcher
    from watchlist.format.errors import BundleRejected
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    store = unit_store(tmp_path, hq, engine, "without")  # applied while the unit's canary was off
    wl = Watchlist(
        WatchlistConfig(root_key=hq["root"], store=tmp_path / "fresh.db"),
        Matcher(dim=engine.embedding_dim),
        engine.model_id,
        require_canary=True,
    )
    try:
        with pytest.raises(BundleRejected) as refused:
            wl.offer_file(hq["without"])
        assert refused.value.reason == "no_canary" and "watchlist enrol-canary" in refused.value.message
        assert wl.offer_file(hq["with"]) == 2
    finally:
        wl.close()
    with Running(site, tmp_path, unit_config(tmp_path, site, hq, store), engine) as run:
        wait_for(lambda: canary_of(run.store).get("state") == "failed", 40, "the canary failing on the old list")
        why = canary_of(run.store)["reason"]
        assert f"does not hold {CANARY_PERSON_ID!r}" in why and "version 1" in why, why
        assert any(r.startswith("canary failed") for r in reasons(run.store))


def test_a_blocked_acl_fails_the_canary_with_no_verdict(
    site: Site, hq: dict[str, Any], engine: Any, tmp_path: Path
) -> None:
    # The unit publishes under another site than its account may write: the broker drops its hits.
    config = unit_config(tmp_path, site, hq, unit_store(tmp_path, hq, engine, "with"), site_id="site-b")
    with Running(site, tmp_path, config, engine) as run:
        wait_for(lambda: run.daemon.canary.failures >= 1, 40, "the canary timing out")
        assert "got no verdict from the centre" in run.daemon.canary.problem
        assert any(w.startswith("canary failed") for w in run.daemon.warnings())
        assert unit_row(run.store).get("last_canary_at") is None


def test_wrong_embeddings_fail_the_canary_at_matching(engine: Any, tmp_path: Path) -> None:
    """As a wrong integer kernel would: the engine's embeddings turned, the list stays right."""
    from edge.canary import CANARY_CAMERA_ID, CANARY_FPS, Canary, CanaryConfig
    from edge.pipeline import CameraSpec, Pipeline
    from engines.cache import default_cache_dir
    from engines.canary_media import canary_frames, ensure_canary_picture, load_canary_picture
    from matching.matcher import Matcher, TemplateIndex
    from watchlist.hq.enrol import judge_photo

    photo = load_canary_picture(ensure_canary_picture(default_cache_dir()))
    ref = judge_photo(engine, photo).embedding
    matcher = Matcher(dim=engine.embedding_dim)
    matcher.swap(
        TemplateIndex.build(
            [CANARY_PERSON_ID], ref[None, :], version=1, model_id=engine.model_id, default_threshold=0.6
        )
    )

    class Turned:
        """The engine with its embedder's output rolled by one place: unit length, wrong."""

        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def embed(self, *a: Any, **k: Any) -> np.ndarray:
            return np.roll(engine.embed(*a, **k), 1, axis=-1)

    for eng, passes in ((engine, True), (Turned(), False)):
        canary = Canary(
            CanaryConfig(enabled=True, interval_s=600, verdict_timeout_s=0.5),
            canary_frames(photo),
            expects_verdicts=False,
            has_canary=lambda: True,
        )
        pipeline = Pipeline(
            unit_id="u",
            cameras=[CameraSpec(CANARY_CAMERA_ID, canary.source, CANARY_FPS)],
            engine=eng,
            matcher=matcher,
            sinks=[canary],
        )
        canary._stats = lambda p=pipeline: p.stats()[CANARY_CAMERA_ID]
        canary.tick()
        while (frame := canary.source.latest(timeout=0)) is not None:
            pipeline.process_frame(frame)
        if passes:
            assert canary.passed is True, canary.status()
        else:
            # The run's own deadline (0.5 s) decides; tick judges it once it has passed.
            wait_for(lambda c=canary: (c.tick(), c.passed is False)[1], 10, "the run timing out")
            assert "not matched although the list holds it" in canary.problem, canary.problem
