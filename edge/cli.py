"""`edge`: the unit's command line: check a config, run the unit, run the demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edge.config import ConfigError, UnitConfig, load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The checkpoint edge unit: cameras in, faces matched against the watchlist, hits out.

    \b
    Examples:
      edge check-config /etc/checkpoint/unit.toml
      edge run --config /etc/checkpoint/unit.toml
      edge demo
    """


def _load_or_exit(path: str) -> UnitConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(2)


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check_config(file: Path) -> None:
    """Check a unit config file and print what it sets up; exit status 2 and each problem if it is wrong.

    Every problem names the file and the key, for example
    `unit.toml: cameras[1].url: camera url scheme 'http' is not supported ...`.

    \b
    Example:
      edge check-config /etc/checkpoint/unit.toml
    """
    from edge.camera.sources import redact_url

    cfg = _load_or_exit(str(file))
    click.echo(f"{file}: OK")
    click.echo(f"  unit {cfg.unit.id} at site {cfg.unit.site}")
    for cam in cfg.cameras:
        state = f"{cam.analysis_fps:g} fps analysed" if cam.enabled else "disabled"
        name = f" ({cam.name})" if cam.name else ""
        click.echo(f"  camera {cam.id}{name}: {redact_url(cam.url)} via {cam.backend}, {state}")
    click.echo(f"  watchlist store {cfg.watchlist.store}, root key {cfg.watchlist.root_key}")
    sinks = []
    if cfg.mqtt is not None:
        sinks.append(f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port} (outbox {cfg.outbox.path})")
    if cfg.sinks.jsonl is not None:
        sinks.append(f"jsonl {cfg.sinks.jsonl.path}")
    click.echo(f"  hits go to: {', '.join(sinks)}")


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
    2 for a config error.

    \b
    Example:
      edge run --config /etc/checkpoint/unit.toml
    """
    from edge.daemon import configure_logging, run_daemon

    cfg = _load_or_exit(str(config_path))
    configure_logging(cfg.logging)
    sys.exit(run_daemon(cfg, config_path))


@main.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("edge-demo"),
    show_default=True,
    help="folder for the generated video, watchlist, config and hits file",
)
@click.option("--seconds", type=click.FloatRange(6.0, 300.0), default=16.0, show_default=True, help="video length")
@click.option("--verbose", is_flag=True, help="show the unit's log lines too")
def demo(out_dir: Path, seconds: float, verbose: bool) -> None:
    """Run the whole loop on generated data: no camera, no broker, nothing downloaded.

    Makes a video from public-domain pictures that ship with scikit-image (the NASA astronaut
    photo, the cameraman photo), a signed watchlist holding the astronaut (enrolled from an
    altered copy of her photo: mirrored, turned, darkened; not from the video), and a config whose
    only camera is the video file and whose sink is a JSON-lines file. Then runs the unit on it and prints each hit:
    the astronaut once per appearance, the cameraman never.

    \b
    Example:
      edge demo --out /tmp/edge-demo
    """
    from testing.demo import DemoError, run_demo

    try:
        result = run_demo(out_dir, seconds=seconds, verbose=verbose, echo=click.echo)
    except DemoError as exc:
        click.echo(f"demo failed: {exc}", err=True)
        sys.exit(1)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
