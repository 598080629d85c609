"""`run` and `serve`: the receiver, and the console with or without it, from centre.toml and flags."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from central.cli.common import DB_OPTION, format_hit, open_store


class ConfigProblem(click.ClickException):
    """The config file, or a flag laid over it, cannot be used: a usage error (exit 2), each line naming
    the file and key or the flag."""

    exit_code = 2


CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="centre.toml (see deploy/centre.example.toml); flags and environment variables given override it.",
)

# HQ's register and enrolment photos for the commands an operator runs beside the console (review,
# report); `serve` has its own, without the environment variable.
REGISTER_OPTION = click.option(
    "--register",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="CHECKPOINT_REGISTER",
    help="HQ's register (SQLite, read-only; env CHECKPOINT_REGISTER; default: [console] register of --config): "
    "names, priorities and the cases HQ closed (a confirmation of one is refused, as in the console).",
)
PHOTOS_OPTION = click.option(
    "--photos",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="HQ's enrolment folder (<folder>/<person_id>/<photo>; default: [console] photos of --config).",
)


def register_view(config: Any, photos: bool = True) -> Any:
    """HQ's register (and its enrolment photos) as `config` ([console], with the flags over it) names
    them, read-only; a UsageError naming the flags when they cannot be read."""
    from central.register_view import RegisterView, RegisterViewError

    flags = "--register/--photos" if photos else "--register"
    try:
        return RegisterView(config.console.register_path, config.console.photos if photos else None)
    except RegisterViewError as e:
        raise click.UsageError(f"{flags}: {e}") from None


# The flag of each option that sets one key of centre.toml: "table.key" (docs/console.md lists them).
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "db_url": ("--db", "store.db"),
    "host": ("--host", "mqtt.host"),
    "port": ("--port", "mqtt.port"),
    "protocol": ("--protocol", "mqtt.protocol"),
    "client_id": ("--client-id", "mqtt.client_id"),
    "group": ("--group", "mqtt.group"),
    "username": ("--username", "mqtt.username"),
    "password": ("--password", "mqtt.password"),
    "password_file": ("--password-file", "mqtt.password_file"),
    "ca_file": ("--ca-file", "mqtt.tls.ca_file"),
    "cert_file": ("--cert-file", "mqtt.tls.cert_file"),
    "key_file": ("--key-file", "mqtt.tls.key_file"),
    "reconnect_max_delay": ("--reconnect-max-delay", "mqtt.reconnect_max_delay_s"),
    "unit_keys": ("--unit-keys", "receiver.unit_keys"),
    "unsigned": ("--unsigned", "receiver.unsigned"),
    "retention_days": ("--retention-days", "store.retention_days"),
    "listen": ("--listen", "console.listen"),
    "http_port": ("--http-port", "console.port"),
    "tls_cert": ("--tls-cert", "console.tls_cert"),
    "tls_key": ("--tls-key", "console.tls_key"),
    "register": ("--register", "console.register"),
    "photos": ("--photos", "console.photos"),
    "expiry_warning_days": ("--expiry-warning-days", "console.expiry_warning_days"),
    "trusted_proxies": ("--trusted-proxy", "console.trusted_proxies"),
    # Flags that switch something off; the key is set to the flag's opposite.
    "no_share": ("--no-share", "mqtt.shared"),
    "no_receiver": ("--no-receiver", "console.receiver"),
}
_NEGATED = {"no_share", "no_receiver"}


def broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say how the receiver reaches the broker (shared by `run` and `serve`). Their
    defaults are ReceiverConfig's (tests/test_centre_config.py checks it); they apply when neither a
    flag nor the config file gives the key."""
    options = [
        CONFIG_OPTION,
        click.option("--host", default="localhost", show_default=True, help="Broker host."),
        click.option("--port", type=int, default=1883, show_default=True, help="Broker port (8883 usually for TLS)."),
        click.option(
            "--protocol",
            type=click.Choice(["5", "3.1.1"]),
            default="5",
            show_default=True,
            help="MQTT version; 3.1.1 has no shared subscriptions.",
        ),
        click.option(
            "--client-id", default=None, help="Stable id, different per receiver [checkpoint-receiver-<host>]."
        ),
        click.option("--group", default="checkpoint-receivers", show_default=True, help="Shared-subscription group."),
        click.option("--no-share", is_flag=True, help="Subscribe to all hits instead of sharing them with the group."),
        click.option("--username", default=None, help="Broker user name."),
        click.option(
            "--password",
            default=None,
            envvar="CHECKPOINT_MQTT_PASSWORD",
            help="Broker password (prefer --password-file or env CHECKPOINT_MQTT_PASSWORD).",
        ),
        click.option("--password-file", type=click.Path(path_type=Path), default=None, help="File with the password."),
        click.option("--ca-file", type=click.Path(path_type=Path), default=None, help="CA certificate (PEM): TLS on."),
        click.option("--cert-file", type=click.Path(path_type=Path), default=None, help="Client certificate (PEM)."),
        click.option("--key-file", type=click.Path(path_type=Path), default=None, help="Client key (PEM)."),
        click.option("--tls", "use_tls", is_flag=True, help="TLS with the system CA store (implied by --ca-file)."),
        click.option(
            "--reconnect-max-delay",
            type=float,
            default=60.0,
            show_default=True,
            help="Longest wait between reconnect attempts, seconds.",
        ),
        click.option(
            "--unit-keys",
            type=click.Path(path_type=Path, exists=True),
            default=None,
            help="Unit public keys: a file of key lines or a folder of *.pub (deploy/make-credentials unit).",
        ),
        click.option(
            "--unsigned",
            type=click.Choice(["accept", "reject"]),
            default="accept",
            show_default=True,
            help="Hits/status not signed by a registered key, from units with no registered key: store them "
            "with their verdict, or quarantine them. Units with a registered key must always sign.",
        ),
        click.option(
            "--retention-days",
            type=float,
            default=90.0,
            show_default=True,
            help="Hits older than this are deleted from the store.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def centre_config(ctx: click.Context, config_file: Path | None) -> Any:
    """The config file with the flags and environment variables given on top; ConfigProblem (exit 2)
    naming the file and key, or the flag, of each problem."""
    from central.config import ConfigError, load_centre_config

    overrides: dict[str, dict[str, Any]] = {}
    flags: dict[str, str] = {}

    def put(dotted: str, value: Any, flag: str) -> None:
        table, *path = dotted.split(".")
        node = overrides.setdefault(table, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        flags[dotted] = flag

    for param, value in ctx.params.items():
        # Only what was given counts: a default must not hide the file's value.
        if ctx.get_parameter_source(param) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        if param == "use_tls":
            put("mqtt.tls", {}, "--tls")  # merged with the file's [mqtt.tls]: TLS on, its files kept
        elif param in FLAG_KEYS:
            flag, dotted = FLAG_KEYS[param]
            put(dotted, not value if param in _NEGATED else value, flag)
            if param == "password":  # one source of the password wins, as with the two flags
                put("mqtt.password_file", None, flag)
            elif param == "password_file":
                put("mqtt.password", None, flag)
            elif param == "reconnect_max_delay":
                put("mqtt.reconnect_min_delay_s", min(1.0, value), flag)
    try:
        return load_centre_config(config_file, overrides, flags)
    except ConfigError as e:
        raise ConfigProblem(str(e)) from None


def _start_receiver(config: Any, store: Any, on_hit: Callable[[dict], None] | None) -> Any:
    from central.receiver import Receiver

    try:
        receiver = Receiver(config, store, on_hit=on_hit)
    except ValueError as e:  # the unit keys cannot be read: as bad as a bad option
        raise click.UsageError(str(e)) from None
    receiver.start()
    return receiver


def _stop_receiver(receiver: Any) -> None:
    receiver.close()
    counts = receiver.stats()
    click.echo(
        f"receiver stopped: {counts['new']} new hits, {counts['duplicates']} duplicates dropped, "
        f"{counts['rejected']} rejected",
        err=True,
    )


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@click.command()
@DB_OPTION
@broker_options
@click.option("--quiet", is_flag=True, help="Do not print a line per hit.")
@click.pass_context
def run(ctx: click.Context, config_file: Path | None, quiet: bool, **_given: Any) -> None:
    """Subscribe to the hits, status and heartbeats of all units; store each hit once; print one line per new hit.

    Runs until SIGINT/SIGTERM. Unit status changes go to the log (stderr, shown with -v). Takes its
    settings from --config FILE ([mqtt], [receiver], [store]) and the flags; a flag given wins.

    \b
    Example:
      checkpoint-receiver -v run --config /etc/checkpoint/centre.toml --port 1884
      checkpoint-receiver -v run --host 127.0.0.1 --port 1883 --db hits.sqlite
      2025-01-01T10:00:00Z  HIT  station-1/unit-3  camera=gate  person=P42  score=0.712 ...
    """
    config = centre_config(ctx, config_file)
    store = open_store(config.db, must_exist=False)
    try:
        receiver = _start_receiver(config.receiver, store, None if quiet else lambda row: click.echo(format_hit(row)))
        try:
            _wait_for_signal()
        finally:
            _stop_receiver(receiver)
    finally:
        store.close()


@click.command()
@DB_OPTION
@broker_options
@click.option("--no-receiver", is_flag=True, help="Console only: receivers run elsewhere and write the same store.")
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address the console listens on.")
@click.option("--http-port", type=int, default=8080, show_default=True, help="Port the console listens on.")
@click.option("--tls-cert", type=click.Path(exists=True, path_type=Path), default=None, help="HTTPS certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, path_type=Path), default=None, help="HTTPS key (PEM).")
@click.option(
    "--register",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="HQ's register (SQLite, read-only) for names, priorities and enrolment dates.",
)
@click.option(
    "--photos",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="HQ's enrolment folder (<folder>/<person_id>/<photo>) to show beside the crop.",
)
@click.option(
    "--expiry-warning-days", type=float, default=3.0, show_default=True, help="Flag watchlists expiring sooner."
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="ADDRESS",
    help="A reverse proxy (address or network; repeat for several) whose X-Forwarded-For/-Proto are "
    "believed. Default: none, the client is the connection's peer.",
)
@click.pass_context
def serve(ctx: click.Context, config_file: Path | None, **_given: Any) -> None:
    """Serve the operators' web console, with the receiver in the same process (unless --no-receiver).

    Log in with an account made by `checkpoint-receiver user add`. Use --tls-cert/--tls-key (or a
    TLS proxy in front) for anything beyond localhost: session cookies are then marked Secure. Behind
    a proxy, name it with --trusted-proxy so that logins are limited by the real client's address.
    Takes its settings from --config FILE (centre.toml) and the flags; a flag given wins.

    \b
    Example:
      checkpoint-receiver serve --config /etc/checkpoint/centre.toml
      checkpoint-receiver serve --db hits.sqlite --host broker.example.org --port 8883 --ca-file ca.pem \\
          --username ops --password-file ops.pw --register /srv/hq/register.sqlite --photos /srv/hq/photos
      checkpoint-receiver serve --no-receiver --db postgresql://console@db.example.org/checkpoint \\
          --trusted-proxy 127.0.0.1
    """
    from central.console import create_app
    from central.webserver import ServerError, make_server

    config = centre_config(ctx, config_file)
    console = config.console
    view = register_view(config)
    store = open_store(config.db, must_exist=False)
    receiver = None
    try:
        app = create_app(store, register=view, settings=console.settings())
        try:
            server = make_server(
                app,
                console.listen,
                console.port,
                tls_cert=console.tls_cert,
                tls_key=console.tls_key,
                trusted_proxies=console.trusted_proxies,
            )
        except ServerError as e:
            raise click.UsageError(str(e)) from None
        if console.receiver:
            receiver = _start_receiver(config.receiver, store, None)
        scheme = "https" if console.tls_cert else "http"
        click.echo(f"console on {scheme}://{console.listen}:{console.port}  (store {store.location})", err=True)
        # uvicorn handles SIGINT/SIGTERM itself and raises the signal again once it has stopped, to
        # the handler that was in place before: this one, so the receiver and store close cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run()
    finally:
        if receiver is not None:
            _stop_receiver(receiver)
        store.close()
