"""`edge watchlist`: the unit's watchlist from a shell: apply a bundle or key set file (USB, scp), show
what is applied, list who is on it. A thin layer over watchlist.unit (Watchlist, UnitStore); HQ's
tools stay under `watchlist`.

Exit status, every command: 0 done, 1 the bundle was rejected (`apply`), 2 a usage, config or store
error (the message names what is wrong).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from common import toml
from watchlist.format.errors import BundleRejected, WatchlistError

CONFIG_HELP = "the unit's TOML config ([watchlist] and [engine] are read)"
STORE_HELP = "the unit's watchlist store (default: [watchlist] store in --config)"


def _unit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The --config and --store options that name a unit's watchlist store."""
    f = click.option("--store", type=click.Path(path_type=Path), help=STORE_HELP)(f)
    return click.option("--config", type=click.Path(path_type=Path, exists=True, dir_okay=False), help=CONFIG_HELP)(f)


@click.group("watchlist")
def watchlist() -> None:
    """The unit's watchlist: apply a bundle from a file, show what is applied, list who is on it.

    Exit status: 0 done, 1 the bundle was rejected (apply), 2 a usage, config or store error.

    \b
    Examples:
      edge watchlist apply /media/usb/watchlist-v12-full.cpwl --config /etc/checkpoint/unit.toml
      edge watchlist status --config /etc/checkpoint/unit.toml
      edge watchlist list --config /etc/checkpoint/unit.toml
    """


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _watchlist_table(config: Path) -> dict:
    """The config's [watchlist] table, its paths made absolute against the config's folder (as the unit reads them)."""
    try:
        doc = toml.loads(config.read_text())
    except (OSError, toml.TOMLDecodeError) as exc:
        raise click.UsageError(f"{config}: {exc}") from None
    values = dict(doc.get("watchlist") or {})
    if not values:
        raise click.UsageError(f"{config} has no [watchlist] table; give the unit's config (unit.toml)")
    for key in ("root_key", "store"):
        if key in values and not Path(values[key]).is_absolute():
            values[key] = str(config.parent / values[key])
    return values


def _unit_config(config: Path | None, store: Path | None, root_key: Path | None, max_bytes: int | None):
    """The unit's [watchlist] table as WatchlistConfig, with the options over it."""
    from watchlist.unit.config import WatchlistConfig

    values = _watchlist_table(config) if config is not None else {}
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


def _canary_required(config: Path) -> bool:
    """Whether the unit `config` describes runs the canary ([canary] enabled, on by default): such a
    unit refuses a list without the canary person, from USB as from MQTT."""
    from edge.canary import CanaryConfig

    try:
        table = toml.loads(config.read_text()).get("canary") or {}
        return CanaryConfig(**table).enabled
    except (OSError, toml.TOMLDecodeError) as exc:
        raise click.UsageError(f"{config}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise click.UsageError(f"{config}: [canary] {exc}") from None


def _store_path(config: Path | None, store: Path | None) -> Path:
    """The store `status` and `list` read: --store, else the config's, else WatchlistConfig's default
    (reading needs no root key, so the table is not validated whole)."""
    from watchlist.unit.config import WatchlistConfig

    if store is not None:
        return store
    if config is None:
        raise click.UsageError("give --config (the unit's unit.toml) or --store")
    return Path(_watchlist_table(config).get("store") or WatchlistConfig.model_fields["store"].default)


def _open_store(path: Path):  # a UnitStore; watchlist.unit stays a lazy import
    """The unit's store, read only where it exists: a wrong path must not create an empty store."""
    from watchlist.unit.store import UnitStore

    if not path.is_file():
        raise click.UsageError(
            f"{path}: no watchlist store there; check [watchlist] store in the config (the unit creates it at "
            "first start, or apply a list: edge watchlist apply FILE --config ...)"
        )
    try:
        return UnitStore(path)
    except WatchlistError as exc:
        _fail(exc)


def _unit_engine(config: Path):  # (EmbedderIdentity, EngineConfig), engines stay lazy imports
    """The embedder the unit's [engine] table names, as (its model id and embedding size, the table).
    Both come from the config and the weights file alone: the face engine is not loaded."""
    from engines.config import EngineConfigError, load_engine_config
    from engines.ensemble import config_identity
    from engines.errors import EngineError

    try:
        engine = load_engine_config(config)
    except EngineConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        return config_identity(engine), engine
    except EngineError as exc:
        raise click.UsageError(f"{config}: [engine]: {exc}") from None


def _threshold_range(model_id: str, engine=None) -> tuple[float, float]:  # an EngineConfig
    """The thresholds a bundle for `model_id` may carry: the calibration's range (the rule the running
    unit applies) for the unit's [engine] table where given, else for the model id; (0, 1) with a
    warning for a model without one."""
    from engines.calibration import Calibration, CalibrationError
    from watchlist.format.verify import MODEL_INDEPENDENT_THRESHOLD_RANGE

    try:
        cal = Calibration.for_engine_config(engine) if engine is not None else Calibration.load_for(model_id)
        return cal.threshold_range
    except CalibrationError as exc:
        click.echo(f"warning: thresholds are checked against (0, 1) only: {exc}", err=True)
        return MODEL_INDEPENDENT_THRESHOLD_RANGE


def _not_a_regular_file(path: Path) -> str | None:
    """What `path` is when it is not a regular file (after links), else None: decided before the file is
    opened, since opening a FIFO waits for a writer that may never come."""
    import stat

    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    kinds.append((stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


@watchlist.command("apply")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@_unit_options
@click.option("--root-key", type=click.Path(path_type=Path, exists=True), help="HQ's root public key (over --config)")
@click.option("--model-id", help="override the embedding model id (default: from --config's [engine])")
@click.option("--max-bytes", type=int, help="largest bundle accepted (over --config)")
def apply_cmd(
    bundle: Path,
    config: Path | None,
    store: Path | None,
    root_key: Path | None,
    model_id: str | None,
    max_bytes: int | None,
) -> None:
    """Verify and apply a bundle or key set file on a unit (USB, scp). A running unit picks it up within its tick.

    The embedding model and the size of its embeddings are those the unit's [engine] table (in
    --config) gives, read from the config and the model's weights without loading the engine: a list
    for another model or size is refused. --model-id overrides the model (the size is then not
    checked); with neither, the applied list's model. BUNDLE must be a regular file (a FIFO or a
    device is refused before it is opened). Exit status: 0 applied, 1 rejected (the reason is
    printed), 2 a usage, config or store error. A unit whose --config runs the canary ([canary]
    enabled, the default) refuses a list without the canary person, as it does over MQTT; with
    --store alone that is not checked.

    \b
    Example:
      edge watchlist apply /media/usb/watchlist-v12-full.cpwl --config /etc/checkpoint/unit.toml
    """
    from matching.matcher import Matcher
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.store import UnitStore

    kind = _not_a_regular_file(bundle)
    if kind is not None:
        raise click.UsageError(f"{bundle} is {kind}, not a regular file; copy the bundle into a file and apply that")
    cfg = _unit_config(config, store, root_key, max_bytes)
    engine, embedding_dim = None, None
    if model_id is None and config is not None:
        # The unit's engine decides the model and the size of its embeddings: a list of another size
        # is refused here rather than blinding the unit (every face would fail to match).
        identity, engine = _unit_engine(config)
        model_id, embedding_dim = identity.model_id, identity.embedding_dim
    if model_id is None:
        st = UnitStore(cfg.store)
        model_id = st.state().model_id
        st.close()
        if model_id is None:
            raise click.UsageError(
                "this store holds no list yet: give --config (the unit's [engine] decides the model) or --model-id"
            )
    try:
        # The same check of the list's thresholds as the running unit makes, so USB and MQTT agree.
        wl = Watchlist(
            cfg,
            Matcher(),
            model_id,
            embedding_dim=embedding_dim,
            threshold_range=_threshold_range(model_id, engine),
            require_canary=config is not None and _canary_required(config),
        )
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


@watchlist.command("status")
@_unit_options
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def status(config: Path | None, store: Path | None, as_json: bool) -> None:
    """The applied watchlist version, its model, expiry, and the latest applies and rejections.
    Exit status 2 when there is no store at the path (nothing is created).

    \b
    Example:
      edge watchlist status --config /etc/checkpoint/unit.toml
    """
    from watchlist.format.listing import iso_utc

    path = _store_path(config, store)
    s = _open_store(path)
    try:
        st = s.state()
        persons, templates = s.counts()
        events = s.events(10)
    finally:
        s.close()
    now = time.time()
    out = {
        "store": str(path),
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
        "events": events,
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(
        f"version {st.version} ({st.kind or 'none'}), model {st.model_id}, {persons} persons, {templates} templates"
    )
    if st.expires_at:
        left = st.expires_at - now
        expiry = " (EXPIRED)" if left <= 0 else f" (in {left / 3600:.1f} h)"
        click.echo(f"expires {iso_utc(st.expires_at)}{expiry}")
    for e in events:
        click.echo(
            f"  {iso_utc(e['at']) or '-'} {e['kind']} {e['version'] or ''} {e['reason'] or ''} "
            f"{e['detail'] or ''} [{e['source'] or ''}]"
        )


@watchlist.command("list")
@_unit_options
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def list_cmd(config: Path | None, store: Path | None, as_json: bool) -> None:
    """Who is on the unit's applied list: person ids, priorities, templates with ages or photo dates,
    names where the bundle carried them, and the version. Exit status 2 when there is no store at
    the path.

    \b
    Example:
      edge watchlist list --config /etc/checkpoint/unit.toml
    """
    from watchlist.format.listing import format_rows, iso_utc

    path = _store_path(config, store)
    s = _open_store(path)
    try:
        rows, st = s.persons(), s.state()
    finally:
        s.close()
    if as_json:
        meta = {"source": str(path), "version": st.version, "expires_at": iso_utc(st.expires_at)}
        click.echo(json.dumps(meta | {"persons": rows}, indent=2))
        return
    click.echo(
        f"unit store {path}: version {st.version} ({st.kind or 'no list'}), expires {iso_utc(st.expires_at) or '-'}; "
        f"{len(rows)} persons, {sum(r['templates'] for r in rows)} templates"
    )
    for line in format_rows(rows):
        click.echo(line)
