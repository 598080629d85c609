"""`publish`: a bundle or a key set onto a site's watchlist topic, or into a file for USB."""

from __future__ import annotations

from pathlib import Path

import click

from watchlist.cli.common import KeyDir, fail, passphrase
from watchlist.format.errors import BundleRejected, WatchlistError


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), help="HQ register")
@click.option("--topic", help="the site's watchlist topic prefix, e.g. checkpoint/v1/site-1/watchlist")
@click.option("--host", default="localhost", show_default=True)
@click.option("--port", default=1883, show_default=True, help="1883 plain, 8883 usually for TLS")
@click.option("--username", default=None, help="broker user name (HQ's account, e.g. hq)")
@click.option("--password-file", type=click.Path(path_type=Path), default=None, help="file holding the password")
@click.option("--ca-file", type=click.Path(path_type=Path), default=None, help="CA certificate (PEM): turns TLS on")
@click.option("--cert-file", type=click.Path(path_type=Path), default=None, help="client certificate (PEM)")
@click.option("--key-file", type=click.Path(path_type=Path), default=None, help="client key (PEM)")
@click.option("--tls", "use_tls", is_flag=True, help="TLS with the system CA store (implied by --ca-file)")
@click.option("--chunk-bytes", default=1024 * 1024, show_default=True, help="bytes per MQTT message")
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait for the broker at each step")
@click.option(
    "--export", "export_dir", type=click.Path(path_type=Path), help="write a copy into this folder (USB, scp)"
)
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path, exists=True),
    help="key folder: a delta over MQTT goes with the full snapshot of its version, signed with it",
)
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def publish(
    bundle: Path,
    register_path: Path | None,
    topic: str | None,
    host: str,
    port: int,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    use_tls: bool,
    chunk_bytes: int,
    timeout: float,
    export_dir: Path | None,
    keys_dir: Path | None,
    passphrase_env: str | None,
) -> None:
    """Publish a bundle to a site's watchlist topic (retained, QoS 1, chunked) and/or as a file
    (--export), and record it in the register as published: later deltas are built against it.
    A delta over MQTT needs --keys: the full snapshot of its version is signed from the register
    and published with it, so a unit that missed a delta catches up. A key set file goes to the
    keyset topic. A broker that refuses the account, the certificate or a topic fails at once.

    \b
    Examples:
      watchlist publish v12.cpwl --register hq.db --topic checkpoint/v1/site-1/watchlist --host broker.hq \\
          --port 8883 --username hq --password-file /secure/hq.pw --ca-file /secure/ca.pem --keys /secure/hq-keys
      watchlist publish v12.cpwl --register hq.db --export /media/usb
    """
    from pydantic import ValidationError

    from watchlist.format.bundle import peek, sha256_hex
    from watchlist.format.keys import KEYSET_MAGIC
    from watchlist.hq.build import sign_snapshot
    from watchlist.hq.publish import export_file, publish_bundle, publish_keyset
    from watchlist.hq.register import Register
    from wire.mqtt import MqttConnection

    values: dict[str, object] = {"host": host, "port": port, "username": username, "password_file": password_file}
    if ca_file or cert_file or key_file or use_tls:
        values["tls"] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    try:
        connection = MqttConnection.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in e.errors())
        raise click.UsageError(problems) from None
    data = bundle.read_bytes()
    try:
        if data[:8] == KEYSET_MAGIC:
            if topic is None:
                raise click.UsageError("give --topic: key sets travel over MQTT")
            publish_keyset(data, topic, connection=connection, timeout=timeout)
            click.echo(f"key set published on {topic}/keyset")
            return
        if topic is None and export_dir is None:
            raise click.UsageError("give --topic (MQTT), --export DIR (a file), or both")
        if register_path is None:
            raise click.UsageError("give --register: HQ's register records what is published, deltas build on it")
        reg = Register(register_path)
        digest = sha256_hex(data)
        reg.release_with_sha256(digest)  # before anything goes out: is it one of this register's releases?
        if topic is not None:
            snapshot = None
            if peek(data)["kind"] == "delta":
                if keys_dir is None:
                    raise click.UsageError(
                        "give --keys: a delta over MQTT goes with the full snapshot of its version, signed at "
                        "publishing, or a unit that missed a delta would stay on its old list"
                    )
                kd = KeyDir(keys_dir, passphrase(passphrase_env))
                snapshot = sign_snapshot(reg, data, kd.current_signing(), kd.keyset())
            m = publish_bundle(
                data, topic, snapshot=snapshot, connection=connection, chunk_bytes=chunk_bytes, timeout=timeout
            )
            version = reg.mark_published(digest, f"mqtt://{host}:{port}/{topic}")
            click.echo(
                f"{m.kind} bundle version {m.version} published on {topic}/{m.kind} ({m.chunks} chunks, {m.size} bytes)"
            )
            if snapshot is not None:
                click.echo(f"full snapshot of version {m.version} published on {topic}/full ({len(snapshot)} bytes)")
        if export_dir is not None:
            path = export_file(data, export_dir)
            version = reg.mark_published(digest, f"file:{path}")
            click.echo(f"exported to {path}")
    except (WatchlistError, BundleRejected) as exc:
        fail(exc)
    click.echo(f"version {version} recorded as published in {register_path}")
