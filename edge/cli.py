"""`edge`: the unit's command line: check a config, run the unit, its watchlist (edge.watchlist_cli)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from common.version import VERSION_MESSAGE, software_version
from edge.config import ConfigError, UnitConfig, load_config
from edge.watchlist_cli import watchlist


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(software_version(), message=VERSION_MESSAGE)
def main() -> None:
    """The checkpoint edge unit: cameras in, faces matched against the watchlist, hits out.

    \b
    Examples:
      edge check-config /etc/checkpoint/unit.toml
      edge run --config /etc/checkpoint/unit.toml
      edge watchlist apply /media/usb/watchlist-v12-full.cpwl --config /etc/checkpoint/unit.toml
    """


main.add_command(watchlist)


def _load_or_exit(path: str) -> UnitConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        problems = str(exc).splitlines()
        if len(problems) == 1:
            click.echo(f"config error: {problems[0]}", err=True)
        else:
            click.echo(f"config error: {len(problems)} problems:", err=True)
            for line in problems:
                click.echo(f"  {line}", err=True)
        sys.exit(2)


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--probe",
    is_flag=True,
    help="also read one frame from each camera, publish on the unit's hits topic and read the watchlist manifest",
)
@click.option(
    "--selftest",
    is_flag=True,
    help="also load the face models and run the known-answer self-test of them and the matcher (as `edge run` does)",
)
def check_config(file: Path, probe: bool, selftest: bool) -> None:
    """Check a unit config file and print what it sets up (software version, cameras, watchlist
    applied or not, where hits go); exit status 2 and each problem if it is wrong.

    Every problem names the file and the key, for example
    `unit.toml: cameras[1].url: camera url scheme 'http' is not supported ...`.

    Without [mqtt] signing_key it warns: the centre quarantines unsigned hits from units whose key it
    holds. With --probe each enabled camera is opened and one frame read (its size is printed); the
    unit's account publishes a probe message on its hits topic (the broker must acknowledge it, not
    refuse it); the watchlist reader's account reads HQ's manifest on [watchlist] topic; and a
    missing signing_key fails. The broker ties a client id to its account, so it is not probed while
    the unit runs (stop it first). Exit status 1 when any of them failed. With --selftest the config's face
    models are loaded and the known-answer self-test that `edge run` runs at start is run (the models
    and the matcher on check inputs with stored right answers); exit status 1 on a wrong answer.

    \b
    Examples:
      edge check-config /etc/checkpoint/unit.toml
      edge check-config --selftest /etc/checkpoint/unit.toml
      edge check-config --probe /etc/checkpoint/unit.toml
    """
    from edge.camera.urls import redact_url

    cfg = _load_or_exit(str(file))
    click.echo(f"{file}: OK (checkpoint {software_version()})")
    click.echo(f"  unit {cfg.unit.id} at site {cfg.unit.site}")
    for cam in cfg.cameras:
        state = f"{cam.analysis_fps:g} fps analysed" if cam.enabled else "disabled"
        name = f" ({cam.name})" if cam.name else ""
        click.echo(f"  camera {cam.id}{name}: {redact_url(cam.url)} via {cam.backend}, {state}")
    click.echo(f"  watchlist store {cfg.watchlist.store}, root key {cfg.watchlist.root_key}")
    click.echo(f"  watchlist: {_watchlist_state(cfg.watchlist.store)}")
    sinks = []
    if cfg.mqtt is not None:
        sinks.append(f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port} (outbox {cfg.outbox.path})")
    if cfg.sinks.jsonl is not None:
        sinks.append(f"jsonl {cfg.sinks.jsonl.path}")
    click.echo(f"  hits go to: {', '.join(sinks)}")
    if cfg.mqtt is not None and cfg.mqtt.signing_key is None:
        click.echo(
            "  warning: [mqtt] has no signing_key: the centre quarantines this unit's hits as 'unsigned' once it "
            'holds its key (make-credentials unit registers it); set signing_key = "/etc/checkpoint/signing.key"'
        )
    selftest_ok = True
    if selftest:
        from edge.probe import selftest_result

        st = selftest_result(cfg)
        selftest_ok = st.ok
        click.echo(f"self-test: {'OK' if st.ok else 'FAILED'}: {st.detail}")
    failed = []
    if probe:
        from edge.probe import probe_all

        click.echo("probe:")
        results = probe_all(cfg)
        for r in results:
            click.echo(f"  {r.what}: {'OK' if r.ok else 'FAILED'}: {r.detail}")
        failed = [r.what for r in results if not r.ok]
        click.echo(
            f"probe: {len(results) - len(failed)} of {len(results)} worked"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    if failed or not selftest_ok:
        sys.exit(1)


def _watchlist_state(store: Path) -> str:
    """Whether a list is applied in the unit's store, without creating the store."""
    import time

    if not Path(store).is_file():
        return "no list applied yet (the store is created at first start); apply one: edge watchlist apply FILE --config ..."
    from watchlist.format.errors import WatchlistError
    from watchlist.unit.store import UnitStore

    try:
        s = UnitStore(store)
    except WatchlistError as exc:
        return f"cannot read the store: {exc}"
    try:
        st, (persons, templates) = s.state(), s.counts()
    finally:
        s.close()
    if not st.version:
        return "no list applied yet; apply one: edge watchlist apply FILE --config ..."
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.expires_at)) if st.expires_at else "never"
    expired = " (EXPIRED)" if st.expires_at and st.expires_at <= time.time() else ""
    return f"version {st.version} ({st.kind}), {persons} persons, {templates} templates, expires {expires}{expired}"


@main.command("run")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="the unit's TOML config file",
)
def run(config_path: Path) -> None:
    """Run the unit until SIGTERM or Ctrl-C (under systemd: Type=notify, see systemd/checkpoint-edge.service).

    Exit status: 0 after a clean stop, 1 if the unit could not start (models, watchlist, sinks),
    2 for a config error, 3 when the known-answer self-test failed (this machine computes the
    models or the matcher wrongly; systemd does not restart it: see docs/edge.md, "Self-test at start").

    \b
    Example:
      edge run --config /etc/checkpoint/unit.toml
    """
    from edge.daemon import run_daemon
    from edge.process import configure_logging

    cfg = _load_or_exit(str(config_path))
    configure_logging(cfg.logging)
    sys.exit(run_daemon(cfg, config_path))


@main.command("analyse")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="the unit's TOML config file (its engine, [matching], [analysis] and watchlist store are used)",
)
@click.option("--fps", type=float, default=None, help="frames analysed per second (default: the first camera's)")
@click.option("--debug", is_flag=True, help="also log every decision (DEBUG) to stderr")
@click.argument("clip", type=click.Path(dir_okay=False, path_type=Path))
def analyse(config_path: Path, fps: float | None, debug: bool, clip: Path) -> None:
    """Run a video file through the unit's analysis and say, per track, why it hit or not.

    Prints each track's time span in the clip, embeddings (+ re-checks), the best watchlist person
    and score against the threshold, and the decision (or why no face was embedded). Hits are
    printed, never sent.

    \b
    Example:
      edge analyse --config /etc/checkpoint/unit.toml gate-camera.mp4
    """
    import logging

    from edge.diagnose import DiagnoseError, analyse_clip, format_diagnosis

    cfg = _load_or_exit(str(config_path))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        diagnosis = analyse_clip(cfg, clip, fps)
    except DiagnoseError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(format_diagnosis(diagnosis))


if __name__ == "__main__":
    main()
