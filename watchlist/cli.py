"""``watchlist``: HQ's tools (keys, enrolment, bundles, publishing) and the unit's (apply, status)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import click
import tomllib

from common.files import atomic_write
from watchlist.format.errors import BundleRejected, WatchlistError

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: give a duration such as 3600, 90m, 12h or 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _passphrase(env: str | None) -> bytes | None:
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise click.UsageError(f"environment variable {env} is empty or unset; it should hold the key passphrase")
    return value.encode()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log progress")
def main(verbose: bool) -> None:
    """Signed watchlist tools: keys, enrolment, bundles and publishing at HQ; apply and status on a unit."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


# ---- keys ---------------------------------------------------------------------------------------


class _KeyDir:
    """HQ's key folder: root.key (keep offline), root.pub (pin on units), keyset.bin, signing-<id>.key."""

    def __init__(self, path: Path, passphrase: bytes | None) -> None:
        self.path = Path(path)
        self.passphrase = passphrase

    def root(self):  # noqa: ANN201
        from watchlist.format.keys import load_private_key

        return load_private_key(self.path / "root.key", self.passphrase)

    def keyset(self):  # noqa: ANN201
        from watchlist.format.keys import load_public_key, parse_keyset, read_keyset_file

        return parse_keyset(read_keyset_file(self.path / "keyset.bin"), load_public_key(self.path / "root.pub"))

    def current_signing(self):  # noqa: ANN201
        from watchlist.format.keys import load_private_key

        kid = (self.path / "signing.current").read_text().strip()
        return load_private_key(self.path / f"signing-{kid}.key", self.passphrase)

    def new_signing(self):  # noqa: ANN201
        from watchlist.format.keys import generate_key, key_id, save_private_key

        key = generate_key()
        kid = key_id(key.public_key())
        save_private_key(key, self.path / f"signing-{kid}.key", self.passphrase)
        return key, kid

    def write_keyset(self, envelope: bytes, current: str | None) -> None:
        atomic_write(self.path / "keyset.bin", envelope)
        if current:
            atomic_write(self.path / "signing.current", (current + "\n").encode())


@main.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True, help="key folder to create")
@click.option("--passphrase-env", help="encrypt the private keys with the passphrase in this environment variable")
def keygen(directory: Path, passphrase_env: str | None) -> None:
    """Create HQ's root key, a first signing key and key set 1.

    Example: watchlist keygen --dir /secure/hq-keys
    Then copy hq-keys/root.pub to every unit ([watchlist] root_key) and keep root.key offline.
    """
    from watchlist.format.keys import generate_key, make_keyset, save_private_key, save_public_key

    try:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "root.key").exists():
            raise WatchlistError(f"{directory}/root.key exists: this folder already holds HQ keys")
        kd = _KeyDir(directory, _passphrase(passphrase_env))
        root = generate_key()
        save_private_key(root, directory / "root.key", kd.passphrase)
        save_public_key(root.public_key(), directory / "root.pub")
        signing, kid = kd.new_signing()
        kd.write_keyset(make_keyset(root, 1, [signing.public_key()], issued_at=int(time.time())), kid)
    except WatchlistError as exc:
        _fail(exc)
    click.echo(f"root key and signing key {kid} in {directory} (key set serial 1)")
    click.echo(f"pin {directory / 'root.pub'} on every unit; keep {directory / 'root.key'} offline")


@main.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path, exists=True), required=True, help="key folder")
@click.option("--keep-old", is_flag=True, help="keep the old signing keys valid instead of revoking them")
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def rotate(directory: Path, keep_old: bool, passphrase_env: str | None) -> None:
    """Make a new signing key and a root-signed key set naming it (old keys revoked unless --keep-old).

    Example: watchlist rotate --dir /secure/hq-keys && watchlist publish /secure/hq-keys/keyset.bin --topic ...
    """
    from watchlist.format.keys import make_keyset

    try:
        kd = _KeyDir(directory, _passphrase(passphrase_env))
        root, ks = kd.root(), kd.keyset()
        signing, kid = kd.new_signing()
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        old = {k: Ed25519PublicKey.from_public_bytes(raw) for k, raw in ks.signing_keys.items()}
        keep = list(old.values()) if keep_old else []
        revoked = set(ks.revoked) | (set() if keep_old else set(old))
        kd.write_keyset(
            make_keyset(root, ks.serial + 1, keep + [signing.public_key()], revoked, issued_at=int(time.time())), kid
        )
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    click.echo(
        f"signing key {kid} in force (key set serial {ks.serial + 1}); "
        f"{'old keys kept' if keep_old else f'revoked: {sorted(old)}'}"
    )


@main.command()
@click.argument("key_id")
@click.option("--dir", "directory", type=click.Path(path_type=Path, exists=True), required=True, help="key folder")
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def revoke(key_id: str, directory: Path, passphrase_env: str | None) -> None:
    """Revoke a signing key (a new key set without it). Publish the key set so units learn it at once.

    Example: watchlist revoke 7ffbdafda9ea0a8ea3d5ca2bf05201fd --dir /secure/hq-keys
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from watchlist.format.keys import make_keyset

    try:
        kd = _KeyDir(directory, _passphrase(passphrase_env))
        root, ks = kd.root(), kd.keyset()
        if key_id not in ks.signing_keys and key_id not in ks.revoked:
            raise WatchlistError(f"key {key_id} is not in key set {ks.serial}: nothing to revoke")
        keep = [Ed25519PublicKey.from_public_bytes(raw) for k, raw in ks.signing_keys.items() if k != key_id]
        kd.write_keyset(
            make_keyset(root, ks.serial + 1, keep, set(ks.revoked) | {key_id}, issued_at=int(time.time())), None
        )
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    click.echo(
        f"key {key_id} revoked in key set {ks.serial + 1}" + ("" if keep else "; no signing key left: run rotate")
    )


# ---- HQ: enrolment, build, publish ----------------------------------------------------------------


@main.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--register", "register_path", type=click.Path(path_type=Path), required=True, help="HQ register (SQLite)"
)
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="write the full report as JSON here")
def enrol(source: Path, register_path: Path, report_path: Path | None) -> None:
    """Enrol photos from a CSV manifest or a folder (<folder>/<person_id>/<photo>) into the register.

    Example: watchlist enrol cases.csv --register hq.db --report enrol-report.json
    """
    from watchlist.hq.enrol import EnrolmentReport, entries_from
    from watchlist.hq.enrol import enrol as run_enrol
    from watchlist.hq.register import Register

    try:
        entries, refused = entries_from(source)
        from engines.face_engine import FaceEngine

        engine = FaceEngine.load()
        report = EnrolmentReport(model_id=engine.model_id, rejected=list(refused))
        run_enrol(Register(register_path), engine, entries, report=report)
    except WatchlistError as exc:
        _fail(exc)
    for r in report.rejected:
        click.echo(f"rejected {r.get('where')}: {r['reason']}")
    for w in report.warnings:
        click.echo(f"warning: {w}")
    click.echo(report.summary())
    if report_path:
        report_path.write_text(json.dumps(report.to_json(), indent=2))


@main.command()
@click.argument("person_ids", nargs=-1, required=True)
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), required=True)
def remove(person_ids: tuple[str, ...], register_path: Path) -> None:
    """Take persons off the list (found, or case closed); the next bundle removes them from units.

    Example: watchlist remove case-2024-0173 --register hq.db && watchlist build --delta ...
    """
    from watchlist.hq.register import Register

    n = Register(register_path).remove_persons(person_ids)
    click.echo(f"{n} of {len(person_ids)} persons removed from the register")


@main.command()
@click.option("--register", "register_path", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, exists=True), required=True, help="key folder")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="bundle file to write")
@click.option("--delta", is_flag=True, help="only the changes since --base (default: the latest release)")
@click.option("--base", type=int, help="released version the delta applies to")
@click.option("--valid-for", default="7d", show_default=True, help="time until units treat the list as expired")
@click.option("--threshold", type=float, help="default cosine threshold for the list (remembered for next builds)")
@click.option("--model-id", help="embedding model (default: the only one in the register)")
@click.option("--with-names", is_flag=True, help="ship display names to units (default: case numbers only)")
@click.option("--passphrase-env", help="environment variable holding the key passphrase")
def build(
    register_path: Path,
    keys_dir: Path,
    out: Path,
    delta: bool,
    base: int | None,
    valid_for: str,
    threshold: float | None,
    model_id: str | None,
    with_names: bool,
    passphrase_env: str | None,
) -> None:
    """Build and sign the next bundle (full, or --delta) from the register.

    Example: watchlist build --register hq.db --keys /secure/hq-keys --out v12.cpwl --delta --valid-for 7d
    """
    from watchlist.hq.build import plan_bundle, release
    from watchlist.hq.register import Register

    try:
        reg = Register(register_path)
        models = reg.model_ids()
        if model_id is None:
            if len(models) != 1:
                raise WatchlistError(
                    f"the register holds templates of {len(models)} models ({', '.join(models)}): give --model-id"
                )
            model_id = models[0]
        if threshold is None:
            threshold = reg.get_meta(f"threshold:{model_id}")
            if threshold is None:
                raise WatchlistError(
                    f"give --threshold: the cosine similarity at which model {model_id} "
                    "calls two faces the same person (it is remembered afterwards)"
                )
        else:
            reg.set_meta(f"threshold:{model_id}", threshold)
        kd = _KeyDir(keys_dir, _passphrase(passphrase_env))
        bundle, digests, skipped = plan_bundle(
            reg,
            model_id=model_id,
            default_threshold=float(threshold),
            kind="delta" if delta else "full",
            base_version=base,
            valid_for_s=_duration(valid_for),
            with_names=with_names,
        )
        rel = release(reg, bundle, digests, kd.current_signing(), kd.keyset(), out, skipped)
    except (WatchlistError, BundleRejected, ValueError) as exc:
        _fail(exc)
    b = rel.bundle
    what = f"delta {b.base_version}->{b.version}" if b.kind == "delta" else f"full version {b.version}"
    click.echo(
        f"{what}: {len(b.persons)} persons ({b.n_templates} templates) in, {len(b.removed)} removed, "
        f"{len(rel.data)} bytes -> {out}"
    )
    if skipped:
        click.echo(f"warning: {len(skipped)} persons have no template of model {model_id} and are not in the list")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--topic", required=True, help="the site's watchlist topic prefix, e.g. checkpoint/v1/site-1/watchlist")
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
@click.option("--export", "export_dir", type=click.Path(path_type=Path), help="also write a copy here (USB, scp)")
def publish(
    bundle: Path,
    topic: str,
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
) -> None:
    """Publish a bundle (retained, QoS 1, chunked) to a site's watchlist topic; a key set file goes to
    the keyset topic. A broker that refuses the account, the certificate or a topic fails at once.

    \b
    Example:
      watchlist publish v12.cpwl --topic checkpoint/v1/site-1/watchlist --host broker.hq --port 8883 \\
          --username hq --password-file /secure/hq.pw --ca-file /secure/ca.pem
    """
    from pydantic import ValidationError

    from watchlist.format.keys import KEYSET_MAGIC
    from watchlist.hq.publish import export_file, publish_bundle, publish_keyset
    from wire.mqtt import MqttConnection

    values: dict[str, object] = {"host": host, "port": port, "username": username, "password_file": password_file}
    if ca_file or cert_file or key_file or use_tls:
        values["tls"] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    try:
        connection = MqttConnection(**values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in e.errors())
        raise click.UsageError(problems) from None
    data = bundle.read_bytes()
    try:
        if data[:8] == KEYSET_MAGIC:
            publish_keyset(data, topic, connection=connection, timeout=timeout)
            click.echo(f"key set published on {topic}/keyset")
            return
        m = publish_bundle(data, topic, connection=connection, chunk_bytes=chunk_bytes, timeout=timeout)
        if export_dir:
            click.echo(f"exported to {export_file(data, export_dir)}")
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)
    click.echo(f"{m.kind} bundle version {m.version} published on {topic}/{m.kind} ({m.chunks} chunks, {m.size} bytes)")


@main.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--root-key", type=click.Path(path_type=Path, exists=True), help="also verify against this root key")
def inspect_cmd(bundle: Path, root_key: Path | None) -> None:
    """Show a bundle's header (and, with --root-key, whether its signature chain holds).

    Example: watchlist inspect v12.cpwl --root-key hq-keys/root.pub
    """
    from watchlist.format.bundle import peek
    from watchlist.format.keys import load_public_key
    from watchlist.format.verify import UnitTrust, verify_bundle

    data = bundle.read_bytes()
    try:
        h = peek(data)
        click.echo(
            json.dumps(
                {k: v for k, v in h.items() if k != "persons"} | {"persons": len(h.get("persons", []))}, indent=2
            )
        )
        if root_key:
            trust = UnitTrust(
                load_public_key(root_key),
                expected_model_id=h.get("model_id", ""),
                max_bundle_bytes=len(data),
                applied_version=0,
            )
            verify_bundle(data, trust, now=time.time())
            click.echo("signature chain: valid")
    except (WatchlistError, BundleRejected) as exc:
        _fail(exc)


# ---- unit side -----------------------------------------------------------------------------------


def _unit_config(config: Path | None, store: Path | None, root_key: Path | None, max_bytes: int | None):  # noqa: ANN202
    from watchlist.unit.config import WatchlistConfig

    values: dict = {}
    if config is not None:
        try:
            doc = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.UsageError(f"{config}: {exc}") from None
        values = dict(doc.get("watchlist") or {})
        if not values:
            raise click.UsageError(f"{config} has no [watchlist] table")
        for key in ("root_key", "store"):
            if key in values and not Path(values[key]).is_absolute():
                values[key] = str(config.parent / values[key])
    if store is not None:
        values["store"] = store
    if root_key is not None:
        values["root_key"] = root_key
    if max_bytes is not None:
        values["max_bundle_bytes"] = max_bytes
    try:
        return WatchlistConfig(**values)
    except Exception as exc:
        raise click.UsageError(f"{config or 'options'}: [watchlist] {exc}") from None


@main.command("apply")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--config", type=click.Path(path_type=Path, exists=True), help="unit TOML ([watchlist] is read)")
@click.option("--store", type=click.Path(path_type=Path), help="the unit's watchlist store")
@click.option("--root-key", type=click.Path(path_type=Path, exists=True), help="HQ's root public key")
@click.option("--model-id", help="the unit's embedding model (default: the applied list's)")
@click.option("--max-bytes", type=int, help="largest bundle accepted")
def apply_cmd(
    bundle: Path,
    config: Path | None,
    store: Path | None,
    root_key: Path | None,
    model_id: str | None,
    max_bytes: int | None,
) -> None:
    """Verify and apply a bundle or key set file on a unit (USB, scp). A running unit picks it up within its tick.

    Example: watchlist apply /media/usb/watchlist-v12-full.cpwl --config /etc/checkpoint/unit.toml
    """
    from matching.matcher import Matcher
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.store import UnitStore

    cfg = _unit_config(config, store, root_key, max_bytes)
    if model_id is None:
        st = UnitStore(cfg.store)
        model_id = st.state().model_id
        st.close()
        if model_id is None:
            raise click.UsageError("this store holds no list yet: give --model-id (the unit's embedding model id)")
    try:
        wl = Watchlist(cfg, Matcher(), model_id)
        wl.start()
        version = wl.offer_file(bundle)
    except BundleRejected as exc:
        click.echo(f"rejected ({exc.reason}): {exc.message}", err=True)
        sys.exit(1)
    except WatchlistError as exc:
        _fail(exc)
    if wl.status()["applied_since_start"] == 0:
        click.echo(f"key set {wl.status()['keyset_serial']} accepted; watchlist version {version} unchanged")
        return
    click.echo(
        f"applied: watchlist version {version} ({wl.current_index.n_persons} persons, "
        f"{wl.current_index.n_templates} templates)"
    )


@main.command()
@click.option("--config", type=click.Path(path_type=Path, exists=True), help="unit TOML ([watchlist] is read)")
@click.option("--store", type=click.Path(path_type=Path, exists=True), help="the unit's watchlist store")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def status(config: Path | None, store: Path | None, as_json: bool) -> None:
    """The applied watchlist version, its expiry, and the latest applies and rejections.

    Example: watchlist status --store /var/lib/checkpoint/watchlist.db
    """
    from watchlist.unit.store import UnitStore

    if store is None:
        if config is None:
            raise click.UsageError("give --store or --config")
        doc = tomllib.loads(config.read_text()).get("watchlist") or {}
        store = Path(doc.get("store", "/var/lib/checkpoint/watchlist.db"))
        if not store.is_absolute():
            store = config.parent / store
    try:
        s = UnitStore(store)
    except WatchlistError as exc:
        _fail(exc)
    st = s.state()
    persons, templates = s.counts()
    now = time.time()
    out = {
        "store": str(store),
        "version": st.version,
        "kind": st.kind,
        "model_id": st.model_id,
        "persons": persons,
        "templates": templates,
        "created_at": st.created_at,
        "expires_at": st.expires_at,
        "expired": bool(st.expires_at is not None and now >= st.expires_at),
        "signing_key_id": st.signing_key_id,
        "applied_at": st.applied_at,
        "events": s.events(10),
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(
        f"version {st.version} ({st.kind or 'none'}), model {st.model_id}, {persons} persons, {templates} templates"
    )
    if st.expires_at:
        left = st.expires_at - now
        click.echo(
            f"expires {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.expires_at))}"
            + (" (EXPIRED)" if left <= 0 else f" (in {left / 3600:.1f} h)")
        )
    for e in out["events"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        click.echo(
            f"  {when} {e['kind']} {e['version'] or ''} {e['reason'] or ''} {e['detail'] or ''} [{e['source'] or ''}]"
        )


if __name__ == "__main__":
    main()
