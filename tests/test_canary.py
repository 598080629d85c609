"""The canary (issue 19): a real unit daemon with the real engine on the deployed site (TLS, accounts,
ACL, signed hits), a real receiver, HQ's own enrolment of the canary person from the pinned picture.
The canary, on by default, passes end to end and shows at the centre without ever becoming a hit; a
dead camera does not stop it; a missing signing key, a list without the canary, a blocked ACL and
wrong embeddings each make it fail with the step named. In Chromium, a unit with a missing signing
key, an empty list, a blocked ACL, a wrong kernel or a dead camera shows red on the fleet page
within one canary period, with the reason."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from central.fleet import evaluate
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
    tmp: Path,
    site: Site,
    hq: dict[str, Any],
    store: Path,
    *,
    sign: bool = True,
    site_id: str = "site-a",
    camera: Path | None = None,
    interval_s: float = 6,
    verdict_timeout_s: float = 10,
) -> Any:
    """unit-1's config on the site; its one camera, `gate`, is dead, or a video file played round and
    round (`camera`: the unit has nothing wrong but what a test makes wrong)."""
    from edge.config import parse_config

    creds = site.creds
    key = f'signing_key = "{creds / "unit-1" / "signing.key"}"' if sign else ""
    gate = f'url = "{DEAD_CAMERA}"' if camera is None else f'url = "{camera}"\nloop = true\nanalysis_fps = 1'
    return parse_config(
        f"""
[unit]
id = "unit-1"
site = "{site_id}"

[[cameras]]
id = "gate"
{gate}
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
interval_s = {interval_s}
verdict_timeout_s = {verdict_timeout_s}
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


class Turned:
    """An engine whose embedder's output is rolled by one place: unit length, wrong, as a wrong integer
    kernel makes embeddings while the detector still finds the faces."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def embed(self, *a: Any, **k: Any) -> np.ndarray:
        return np.roll(self._engine.embed(*a, **k), 1, axis=-1)


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


@dataclass(frozen=True)
class Cause:
    """One way a unit goes wrong, and the reason the fleet page must show in red for it."""

    reason: str | re.Pattern[str]  # a red reason on the unit's row holds it
    sign: bool = True  # the unit has its signing key
    listed: bool = True  # the unit holds a list with the canary (else none at all)
    hits_allowed: bool = True  # the broker's ACL lets the unit write its hits
    turned: bool = False  # the engine's embeddings are wrong, as a wrong kernel makes them
    camera_dead: bool = False  # its one camera is dead (else it shows an empty scene)
    canary_passes: bool = False


CAUSES = {
    "missing signing key": Cause("canary failed: the centre refused the canary hit: unsigned", sign=False),
    "empty list": Cause(
        f"canary failed: the canary person was not matched: the list in force (version 0) does not hold "
        f"{CANARY_PERSON_ID!r}",
        listed=False,
    ),
    "blocked ACL": Cause(
        re.compile(r"canary failed: the canary hit \S+ got no verdict from the centre"), hits_allowed=False
    ),
    "wrong kernel": Cause("canary failed: the canary person was not matched although the list holds it", turned=True),
    "dead camera": Cause("camera gate down", camera_dead=True, canary_passes=True),
}
# A run at start, then one every PERIOD_S: each cause must show within the first period. A run fails
# VERDICT_TIMEOUT_S after it began when nothing answered; that leaves the rest of the period for the
# heartbeat (every second) and the page.
PERIOD_S, VERDICT_TIMEOUT_S = 15.0, 8.0
HITS_ACL_LINE = "pattern write checkpoint/v1/%u/hits\n"


@pytest.fixture(scope="module")
def empty_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short clip of a scene with nobody in it, for a camera that works."""
    from testing.media import make_face_clip

    return make_face_clip(tmp_path_factory.mktemp("scene") / "empty.mp4", [], size=(320, 240), fps=5, seconds=2)


@pytest.mark.parametrize("cause", list(CAUSES.values()), ids=list(CAUSES))
def test_each_cause_turns_the_unit_red_with_its_reason_within_one_period_in_chromium(
    cause: Cause,
    hq: dict[str, Any],
    engine: Any,
    empty_scene: Path,
    tmp_path: Path,
    mosquitto_bin: str,
    new_page: Any,
) -> None:
    """Issue 19's target: a unit with a missing signing key, an empty list, a blocked ACL, a wrong kernel
    or a dead camera shows red on the fleet page within one canary period, with the reason; the real
    unit daemon, Mosquitto on the deployed files, receiver and console, the page updating live."""
    from playwright.sync_api import expect

    from central.console import ConsoleSettings, create_app
    from central.webserver import BackgroundServer
    from tests.console_support import add_users, login

    creds = tmp_path / "creds"
    unit_keys = make_site_credentials(creds)
    if not cause.hits_allowed:
        # The ACL as a broker's could be, wrong: the unit may send its heartbeats but not its hits.
        acl = creds / "broker" / "acl"
        assert HITS_ACL_LINE in acl.read_text()
        acl.write_text(acl.read_text().replace(HITS_ACL_LINE, ""))
    site = Site(start_deployed_broker(tmp_path / "broker", creds), creds, unit_keys)
    store = unit_store(tmp_path, hq, engine, "with") if cause.listed else tmp_path / "never-applied.db"
    config = unit_config(
        tmp_path,
        site,
        hq,
        store,
        sign=cause.sign,
        camera=None if cause.camera_dead else empty_scene,
        interval_s=PERIOD_S,
        verdict_timeout_s=VERDICT_TIMEOUT_S,
    )
    try:
        run = Running(site, tmp_path, config, Turned(engine) if cause.turned else engine)
        started = time.monotonic()

        def left_ms() -> float:
            return max(1.0, (started + PERIOD_S - time.monotonic()) * 1000)

        with run:
            add_users(run.store, "ana")
            server = BackgroundServer(create_app(run.store, settings=ConsoleSettings(poll_s=0.25))).start()
            try:
                page = new_page()
                login(page, server.url, "ana")
                page.goto(server.url + "/fleet")  # then live: the rows follow the store
                row = page.locator("tr[data-unit='site-a/unit-1']")
                expect(row).to_have_class(re.compile(r"\blevel-red\b"), timeout=left_ms())
                expect(row.locator("li.reason.red").filter(has_text=cause.reason)).to_have_count(1, timeout=left_ms())
                if cause.canary_passes:
                    expect(row.locator(".canary")).to_contain_text("last canary passed", timeout=left_ms())
                    assert not [r for r in reasons(run.store) if "canary" in r], reasons(run.store)
                else:
                    assert run.daemon.canary.failures >= 1 and unit_row(run.store).get("last_canary_at") is None
                assert run.store.hits(limit=None) == []  # the canary never becomes an operator's hit
            finally:
                server.stop()
    finally:
        site.broker.stop()


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

    for eng, passes in ((engine, True), (Turned(engine), False)):
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
