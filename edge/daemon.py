"""The unit's long-running process: cameras, analysis pipeline, watchlist, hit sinks, systemd.

    daemon = Daemon(load_config("/etc/checkpoint/unit.toml"))
    daemon.start()                     # sinks, models + self-test, watchlist, cameras, pipeline; then READY=1
    daemon.run()                       # until SIGTERM/SIGINT (or daemon.request_stop())
    daemon.stop()                      # finish faces in flight, flush sinks, release cameras

Every `logging.stats_interval_s` it logs one line per camera (analysed fps, faces, hits, lag
behind live) and sets the systemd STATUS line; it sends WATCHDOG=1 only while every analysis
thread is going round its loop, so a hung unit is restarted by systemd. `status()` is the unit's
part of the MQTT heartbeat.

The checks at start (models, self-test, threshold, canary pictures) are edge.startup's; the figures'
pieces and the STATUS line edge.unit_status's; the process's logging and malloc edge.process's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.version import software_version
from edge.canary import CANARY_CAMERA_ID, CANARY_FPS, Canary
from edge.config import CameraConfig, UnitConfig
from edge.decision import MatcherLike
from edge.notify import Notifier
from edge.pipeline import CameraSpec, Pipeline
from edge.process import tune_malloc
from edge.sinks import HitSink, JsonlSink
from edge.startup import DaemonError, SelfTestFailed, canary_frames, load_engine, selftest, threshold_range
from edge.unit_status import camera_status, site_zone, status_line, watchlist_status, watchlist_warnings
from wire.records import CANARY_PERSON_ID

log = logging.getLogger(__name__)

# A thread that has not gone round its loop for this long counts as hung (its loops wake every
# second or so even with nothing to do; an embed batch on a slow CPU takes well under this).
_HUNG_AFTER_S = 30.0
# How often the watchlist re-checks its expiry and a store changed by `edge watchlist apply` from outside.
_WATCHLIST_TICK_S = 30.0
# A warning that still holds is logged again this often (the heartbeat carries it all the time).
_REWARN_S = 600.0


# `edge run`'s exit status when the known-answer self-test failed: a CPU that computes wrong answers
# will not compute right ones after a restart (systemd's RestartPreventExitStatus names it).
SELFTEST_FAILED = 3


class Daemon:
    """Wires the unit together from its config. Parts may be passed in (tests, benchmarks, demo)."""

    def __init__(
        self,
        config: UnitConfig,
        *,
        engine: Any = None,
        matcher: MatcherLike | Callable[[], MatcherLike] | None = None,
        sinks: Sequence[HitSink] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self._matcher = matcher
        self._given_sinks = list(sinks) if sinks is not None else None
        self.sinks: list[HitSink] = []
        self.notifier = notifier or Notifier()
        self.readers: dict[str, Any] = {}
        self.pipeline: Pipeline | None = None
        self.watchlist: Any = None
        self.subscriber: Any = None
        self.reporter: Any = None
        self.canary: Canary | None = None
        # Why the unit stopped on its own (a failure systemd should restart it for); None otherwise.
        self.failure: str | None = None
        # The known-answer self-test's result (edge.probe.unit_selftest) once it passed; None when the
        # engine was passed in (tests, benchmarks, the demo), which the daemon does not test.
        self.selftest: dict[str, Any] | None = None
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._stopped = False
        self._camera_labels = {c.id: (c.name, c.location) for c in config.cameras}
        self._timezone = site_zone(config.unit.timezone)
        self._warned: dict[str, float] = {}  # warning -> when it was last logged (monotonic)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open sinks, load models (and run their known-answer self-test: SelfTestFailed on a wrong answer),
        the watchlist, start cameras and analysis; then tell systemd READY."""
        cfg = self.config
        self.started_at = time.time()
        self.notifier.status("starting: opening sinks")
        self.sinks = self._given_sinks if self._given_sinks is not None else self._open_sinks()
        try:
            if self.engine is None:
                self.notifier.status("starting: loading face models")
                self.engine = load_engine(cfg)
                self.notifier.status("starting: known-answer self-test")
                self.selftest = selftest(self.engine)
            if self._matcher is None:
                self.notifier.status("starting: loading the watchlist")
                self._matcher = self._open_watchlist()
            self.notifier.status("starting: cameras")
            self.readers = {cam.id: self._open_camera(cam) for cam in cfg.enabled_cameras}
            cameras = [CameraSpec(c.id, self.readers[c.id], c.analysis_fps) for c in cfg.enabled_cameras]
            if cfg.canary.enabled:
                self.canary = self._open_canary()
                # One more camera, read by the pipeline like the others: the canary takes the camera path.
                cameras.append(CameraSpec(CANARY_CAMERA_ID, self.canary.source, CANARY_FPS))
            self.pipeline = Pipeline(
                unit_id=cfg.unit.id,
                cameras=cameras,
                engine=self.engine,
                matcher=self._matcher,
                sinks=[*self.sinks, *([self.canary] if self.canary is not None else [])],
                matching=cfg.matching,
                analysis=cfg.analysis,
            )
            for reader in self.readers.values():
                reader.start()
            self.pipeline.start()
            if self.canary is not None:
                self.canary.tick()  # the first run at start
        except SelfTestFailed as exc:
            self._shutdown(timeout=5.0, reason=str(exc))
            raise
        except BaseException:
            self._shutdown(timeout=5.0)
            raise
        line = self.status_line()
        log.info("unit %s (site %s) running checkpoint %s: %s", cfg.unit.id, cfg.unit.site, software_version(), line)
        self.notifier.ready(line)
        self._log_warnings()

    def request_stop(self) -> None:
        """Ask `run()` to return (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(self, *, until_sources_finished: bool = False, max_seconds: float | None = None) -> None:
        """Keep the unit going: watchdog pings, STATUS, periodic figures; return when asked to stop.

        `until_sources_finished` also returns once every camera is a file read to its end (demo, benchmarks).
        """
        if self.pipeline is None:
            raise DaemonError("run() needs start() first")
        stats_every = self.config.logging.stats_interval_s
        wd_every = self.notifier.watchdog_interval
        tick = min(1.0, wd_every) if wd_every else 1.0
        next_stats = time.monotonic() + stats_every
        next_wd = time.monotonic()
        next_watchlist = time.monotonic() + _WATCHLIST_TICK_S
        deadline = time.monotonic() + max_seconds if max_seconds is not None else None
        while not self._stop.wait(tick):
            now = time.monotonic()
            if self._pipeline_failed():
                return
            if self.canary is not None:
                self.canary.tick()
            if wd_every is not None and now >= next_wd:
                self.notifier.watchdog()
                next_wd = now + wd_every
            if self.watchlist is not None and now >= next_watchlist:
                self._tick_watchlist()
                self._log_warnings()
                next_watchlist = now + _WATCHLIST_TICK_S
            if now >= next_stats:
                self.log_figures()
                self.notifier.status(self.status_line())
                next_stats = now + stats_every
            if self.reporter is not None and self._outbox_gone():
                return
            if until_sources_finished and self._sources_finished():
                # Let the last sampled frames through detection before stopping.
                self._stop.wait(min(2.0, 2.0 / min(c.analysis_fps for c in self.config.enabled_cameras)))
                return
            if deadline is not None and now >= deadline:
                return

    def _pipeline_failed(self) -> bool:
        """True (and `failure` set) once a pipeline thread died or hung: the cameras may still run, but
        nothing is analysed or matched any more, so the unit stops with a failure and whatever runs
        it (systemd's Restart=, or an operator reading the exit status) starts it afresh. Checked on
        every tick, with or without systemd's watchdog."""
        problems = self.pipeline.problems(_HUNG_AFTER_S) if self.pipeline is not None else []
        if not problems:
            return False
        self.failure = "; ".join(problems)
        log.critical("unit %s stopping: %s", self.config.unit.id, self.failure)
        return True

    def _outbox_gone(self) -> bool:
        """True (and `failure` set) once the outbox file was deleted or replaced under the unit: no hit
        may be accepted into an outbox nobody sends from, so the unit stops and systemd restarts it."""
        from edge.outbox import OutboxGone

        try:
            self.reporter.outbox.check_present()
        except OutboxGone as exc:
            self.failure = str(exc)
            log.critical("unit %s stopping: %s", self.config.unit.id, self.failure)
            return True
        return False

    def stop(self, timeout: float = 20.0) -> None:
        """Stop cleanly: finish faces in flight (their hits reach the sinks), release cameras, flush sinks."""
        if self._stopped:
            return
        self.notifier.stopping("stopping: flushing hits")
        log.info("unit %s stopping", self.config.unit.id)
        # A unit that stops on its own failure tells the centre why in its 'offline' status.
        self._shutdown(timeout, reason=self.failure or "shutdown")
        self.log_figures()
        log.info(
            "unit %s stopped; %d hits this run", self.config.unit.id, self.pipeline.hits_total if self.pipeline else 0
        )

    def _shutdown(self, timeout: float, reason: str = "shutdown") -> None:
        """Stop everything; `reason` goes to the sinks (the centre sees it as the 'offline' status's reason)."""
        self._stopped = True
        deadline = time.monotonic() + timeout
        if self.pipeline is not None:
            self.pipeline.stop(timeout=max(1.0, 0.5 * timeout))
        stoppers = [
            threading.Thread(target=r.stop, args=(max(0.5, deadline - time.monotonic()),), daemon=True)
            for r in self.readers.values()
        ]
        for th in stoppers:
            th.start()
        for th in stoppers:
            th.join(max(0.5, deadline - time.monotonic()))
        for sink in self.sinks:
            try:
                sink.close(timeout=max(1.0, deadline - time.monotonic()), reason=reason)
            except Exception as exc:
                log.error("sink %s did not close cleanly: %s", sink.name, exc)
        if self.subscriber is not None:
            self.subscriber.stop(timeout=max(0.5, deadline - time.monotonic()))
        if self.watchlist is not None:
            self.watchlist.close()
        self.notifier.close()

    # -- parts ---------------------------------------------------------------------------------

    def _open_sinks(self) -> list[HitSink]:
        cfg = self.config
        sinks: list[HitSink] = []
        if cfg.sinks.jsonl is not None:
            sinks.append(JsonlSink(cfg.sinks.jsonl, cfg.unit.site))
        if cfg.mqtt is not None:
            from edge.reporter import MqttReporter

            self.reporter = MqttReporter(cfg.mqtt, cfg.outbox, cfg.unit.id, status_provider=self.status)
            sinks.append(self.reporter)
        return sinks

    def _open_watchlist(self) -> MatcherLike:
        from matching.matcher import Matcher
        from watchlist.format.errors import WatchlistError
        from watchlist.unit.apply import Watchlist

        matcher = Matcher(threshold=self.config.matching.threshold, dim=int(self.engine.embedding_dim))
        usable = threshold_range(self.config, self.engine)
        try:
            self.watchlist = Watchlist(
                self.config.watchlist,
                matcher,
                model_id=self.engine.model_id,
                embedding_dim=int(self.engine.embedding_dim),
                threshold_range=usable,
                require_canary=self.config.canary.enabled,
            )
            # A list made with another model is refused by Watchlist itself: it matches nothing and says why.
            self.watchlist.start()
        except WatchlistError as exc:
            raise DaemonError(f"the watchlist could not be opened: {exc}") from exc
        wl_cfg, mqtt = self.config.watchlist, self.config.mqtt
        if wl_cfg.topic and mqtt is not None:
            from watchlist.unit.subscriber import WatchlistSubscriber

            self.subscriber = WatchlistSubscriber(
                self.watchlist,
                wl_cfg.topic,
                connection=mqtt.watchlist_connection(self.config.unit.id),
                client_id=f"checkpoint-{self.config.unit.site}-{self.config.unit.id}-watchlist",
            )
            self.subscriber.start()
        return matcher

    def _open_canary(self) -> Canary:
        """The canary with its frames made from the cached picture; without the picture it runs no
        check and fails at once, saying why (the unit itself still runs its cameras)."""
        cfg = self.config
        frames, unavailable = canary_frames(cfg)
        canary = Canary(
            cfg.canary,
            frames,
            stats=lambda: self.pipeline.stats().get(CANARY_CAMERA_ID, {}) if self.pipeline is not None else {},
            has_canary=self._list_has_canary,
            list_version=lambda: int(getattr(self.pipeline.matcher, "version", 0)) if self.pipeline else 0,
            expects_verdicts=self.reporter is not None,
            unavailable=unavailable,
        )
        if self.reporter is not None:
            self.reporter.on_verdicts = canary.verdicts
        return canary

    def _list_has_canary(self) -> bool | None:
        if self.watchlist is not None:
            return bool(self.watchlist.has_canary)
        persons = getattr(getattr(self.pipeline.matcher, "index", None), "persons", None) if self.pipeline else None
        return None if persons is None else CANARY_PERSON_ID in persons()

    def _open_camera(self, cam: CameraConfig) -> Any:
        from edge.camera.capture import CameraReader
        from edge.camera.config import CaptureConfig

        capture = CaptureConfig.model_validate(cam.model_dump(include=set(CaptureConfig.model_fields)))
        return CameraReader(capture, on_state=self._camera_changed)

    def _tick_watchlist(self) -> None:
        try:
            self.watchlist.tick()
        except Exception as exc:  # the list in memory keeps matching; the next tick tries again
            log.error("watchlist check failed: %s", exc)

    def warnings(self) -> list[str]:
        """What the unit should not be running like: a pipeline thread dead or hung; an int8 embedder
        that failed its check on this CPU (running float32 instead); an outbox that cannot write (disk
        full, file not writable) or holds hits the centre refused; a list update it cannot take (behind
        HQ's announced version); no watchlist, an expired one, or one it cannot match with (made with
        another model or embedding size)."""
        found = self.pipeline.problems(_HUNG_AFTER_S) if self.pipeline is not None else []
        fallback = getattr(self.engine, "precision_fallback", None)
        if fallback:
            found.append(fallback)
        if self.reporter is not None:
            found += [t for t in (self.reporter.outbox.problem, self.reporter.outbox.refusal) if t]
        canary = self.canary.warning() if self.canary is not None else None
        if canary:
            found.append(canary)
        behind = self.subscriber.status().get("behind") if self.subscriber is not None else None
        found += watchlist_warnings(behind, self.watchlist.status() if self.watchlist is not None else None)
        return found

    def _log_warnings(self) -> None:
        now = time.monotonic()
        current = self.warnings()
        for text in current:
            if now - self._warned.get(text, -_REWARN_S) >= _REWARN_S:
                log.warning("%s", text)
                self._warned[text] = now
        for text in [t for t in self._warned if t not in current]:
            log.info("resolved: %s", text)
            del self._warned[text]

    def _camera_changed(self, state: Any) -> None:
        # The reader logs the transition itself; the status line shows it at once.
        self.notifier.status(self.status_line())

    def _sources_finished(self) -> bool:
        return all(getattr(r, "finished", False) for r in self.readers.values())

    # -- figures -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The unit's figures for the heartbeat: cameras (up/down since, last error, fps, lag), watchlist, hits."""
        per_cam = self.pipeline.stats() if self.pipeline is not None else {}
        cameras = [
            camera_status(cid, *self._camera_labels.get(cid, ("", "")), reader.state, per_cam.get(cid, {}))
            for cid, reader in self.readers.items()
        ]
        matcher = self.pipeline.matcher if self.pipeline is not None else None
        watchlist = watchlist_status(matcher, self.watchlist, self.subscriber)
        return {
            "software_version": software_version(),
            "started_at": round(self.started_at or 0.0, 3),
            "warnings": self.warnings(),
            "pipeline": {
                "healthy": self.pipeline is not None and self.pipeline.healthy(_HUNG_AFTER_S),
                "problems": self.pipeline.problems(_HUNG_AFTER_S) if self.pipeline is not None else [],
            },
            "model_id": getattr(self.engine, "model_id", None),
            # The site's IANA zone: operators see its local time beside UTC (absent when unknown).
            **({"timezone": self._timezone} if self._timezone is not None else {}),
            "cameras": cameras,
            "cameras_up": sum(c["up"] for c in cameras),
            "cameras_total": len(cameras),
            "watchlist": watchlist,
            "hits": self.pipeline.hits_total if self.pipeline is not None else 0,
            "sinks": {s.name: s.stats() for s in self.sinks if s.name != "mqtt"},
            **({"selftest": self.selftest} if self.selftest is not None else {}),
            **({"canary": self.canary.status()} if self.canary is not None else {}),
        }

    def status_line(self) -> str:
        """One line for `systemctl status`: cameras up, analysed fps, hits, watchlist version."""
        return status_line(self.status())

    def log_figures(self) -> None:
        """Log one line of figures per camera."""
        for cam in self.status()["cameras"]:
            log.info(
                "camera %s: %s, %.1f fps in, %.1f fps analysed, faces %d, hits %d, lag %.2f s, skipped %d, "
                "searched whole %d / in regions %d (%s of the frame), faces confirmed %d, errors %d%s",
                cam["id"],
                "up" if cam["up"] else "DOWN",
                cam["fps_in"],
                cam["fps_analysed"],
                cam["faces"],
                cam["hits"],
                cam["lag_s"],
                cam["frames_skipped"],
                cam["frames_full"],
                cam["frames_regions"],
                "-" if cam["searched_share"] is None else f"{100 * cam['searched_share']:.0f}%",
                cam["faces_confirmed"],
                cam["errors"],
                f", last error: {cam['last_error']}" if cam["last_error"] and not cam["up"] else "",
                extra={"figures": cam},
            )


def run_daemon(config: UnitConfig, config_path: str | Path | None = None) -> int:
    """Start the unit, run until SIGTERM/SIGINT, stop cleanly; the process exit status."""
    if not tune_malloc():
        log.info("no glibc mallopt here: memory is left to the C library's defaults")
    daemon = Daemon(config)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        daemon.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            daemon.start()
        except SelfTestFailed as exc:
            log.critical("%s", exc)
            return SELFTEST_FAILED
        except DaemonError as exc:
            log.error("%s", exc)
            return 1
        except Exception as exc:  # sinks, outbox, store: their messages say what to fix
            log.error("unit could not start: %s: %s", type(exc).__name__, exc)
            return 1
        daemon.run()
    finally:
        daemon.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 1 if daemon.failure else 0
