"""The centre's config file, centre.toml: the broker, the receiver's limits, the store and the console.

One file for what `checkpoint-receiver run` and `serve` otherwise take as a dozen flags; flags and
environment variables given still override it (the CLI passes them as `overrides`). The broker and
receiver keys are ReceiverConfig's own fields, spread over three tables so that each reads as one
job; ReceiverConfig validates them together, so its cross-key rules (password or password_file,
unsigned = "reject" needs unit_keys) hold for the file as for the flags. Unknown keys are errors,
and every problem is reported with the file and the key (or the flag) it came from.

Example (deploy/centre.example.toml is a complete one)::

    cfg = load_centre_config(Path("/etc/checkpoint/centre.toml"), overrides={"mqtt": {"port": 8883}})
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from central.console import ConsoleSettings
from central.fleet import EXPIRY_WARNING_S
from central.receiver_config import ReceiverConfig
from common import toml
from common.config import StrictModel
from wire.mqtt import MqttConnection

DEFAULT_DB = "checkpoint-hits.sqlite"

# Which table each ReceiverConfig field is written in. tests/test_centre_config.py checks that every
# field has exactly one table, so a field added to ReceiverConfig cannot go unreachable from the file.
RECEIVER_TABLES: dict[str, frozenset[str]] = {
    "mqtt": frozenset(MqttConnection.model_fields) | {"client_id", "group", "shared"},
    "receiver": frozenset(
        {"receive_maximum", "batch_max", "queue_max", "queue_max_bytes", "heartbeat_min_interval_s"}
        | {"unit_keys", "unsigned"}
    ),
    "store": frozenset({"retention_days"}),
}
STORE_KEYS = RECEIVER_TABLES["store"] | {"db"}
TABLES = ("mqtt", "receiver", "store", "console")
# Keys holding a file or folder: relative ones are taken from the config file's folder, not from
# wherever the command happens to be started.
_PATH_KEYS = {
    "mqtt": ("password_file",),
    "mqtt.tls": ("ca_file", "cert_file", "key_file"),
    "receiver": ("unit_keys",),
    "console": ("tls_cert", "tls_key", "register", "photos"),
}


class ConfigError(Exception):
    """The centre's config cannot be used; one line per problem, each naming the file and key (or flag)."""


class ConsoleConfig(StrictModel):
    """[console]: where the web console listens and how it behaves (central/console.py ConsoleSettings)."""

    receiver: bool = Field(default=True, description="run a receiver in the console's process (false: console only)")
    listen: str = Field(default="127.0.0.1", min_length=1, description="address the console listens on")
    port: int = Field(default=8080, ge=1, le=65535, description="port the console listens on")
    tls_cert: Path | None = Field(default=None, description="HTTPS certificate (PEM); give tls_key too")
    tls_key: Path | None = Field(default=None, description="HTTPS key (PEM)")
    trusted_proxies: list[str] = Field(default_factory=list, description="reverse proxies whose X-Forwarded-* count")
    # Named so in the file; `register` itself is taken by pydantic's BaseModel.
    register_path: Path | None = Field(default=None, alias="register", description="HQ's register (SQLite, read-only)")
    photos: Path | None = Field(default=None, description="HQ's enrolment folder, <folder>/<person_id>/<photo>")
    expiry_warning_days: float = Field(default=EXPIRY_WARNING_S / 86400, gt=0)
    session_ttl_s: float = Field(default=ConsoleSettings.session_ttl_s, gt=0)
    session_idle_s: float = Field(default=ConsoleSettings.session_idle_s, gt=0)
    overdue_after_s: float = Field(default=ConsoleSettings.overdue_after_s, gt=0)
    on_duty_s: float = Field(default=ConsoleSettings.on_duty_s, gt=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        from central.webserver import ServerError, check_trusted_proxies

        try:
            return check_trusted_proxies(v)
        except ServerError as e:
            raise ValueError(str(e).removeprefix("--trusted-proxy ")) from None

    @model_validator(mode="after")
    def _tls_pair(self) -> ConsoleConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key (--tls-cert/--tls-key), or neither")
        return self

    def settings(self) -> ConsoleSettings:
        return ConsoleSettings(
            expiry_warning_s=self.expiry_warning_days * 86400,
            session_ttl_s=self.session_ttl_s,
            session_idle_s=self.session_idle_s,
            overdue_after_s=self.overdue_after_s,
            on_duty_s=self.on_duty_s,
        )


@dataclass(frozen=True)
class CentreConfig:
    """Everything `run` and `serve` need: the store's address, the receiver's and the console's settings."""

    db: str
    receiver: ReceiverConfig
    console: ConsoleConfig


def load_centre_config(
    path: Path | None, overrides: dict[str, dict[str, Any]] | None = None, flags: dict[str, str] | None = None
) -> CentreConfig:
    """Read `path` (None: no file, defaults only), lay `overrides` ({table: {key: value}}, as in the file)
    over it, and check the result. `flags` names the flag each overridden "table.key" came from, so
    that a problem with it names the flag rather than the file. Raises ConfigError.

    Example: ``load_centre_config(Path("centre.toml"), {"console": {"port": 8443}}, {"console.port": "--http-port"})``
    """
    raw: dict[str, Any] = {}
    name = "options"
    if path is not None:
        name = str(path)
        try:
            raw = toml.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{name}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}: cannot read the config file: {e}") from None
        except toml.TOMLDecodeError as e:
            raise ConfigError(f"{name}: TOML syntax error: {e}") from None
        except RecursionError:
            raise ConfigError(f"{name}: nested too deeply to read; check that this is the centre's config") from None
    return _check(raw, name, path.resolve().parent if path is not None else None, overrides or {}, flags or {})


def _check(
    raw: dict[str, Any], name: str, base_dir: Path | None, overrides: dict[str, dict[str, Any]], flags: dict[str, str]
) -> CentreConfig:
    problems: list[str] = []
    tables: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key not in TABLES:
            problems.append(f"{name}: {key}: unknown table (allowed: {', '.join(TABLES)}); check its spelling")
        elif not isinstance(value, dict):
            problems.append(f"{name}: {key}: must be a table ([{key}])")
        else:
            tables[key] = dict(value)
    allowed = {**RECEIVER_TABLES, "store": STORE_KEYS}
    for table, keys in allowed.items():
        for key in sorted(set(tables.get(table, {})) - keys):
            problems.append(
                f"{name}: {table}.{key}: unknown key (allowed here: {', '.join(sorted(keys))}); "
                "check its spelling or remove it"
            )
            del tables[table][key]
    if base_dir is not None:
        _resolve_paths(tables, base_dir)
    for table, values in overrides.items():
        _merge(tables.setdefault(table, {}), values)

    def where(loc: tuple[Any, ...], table: str) -> str:
        key = ".".join([table, *(str(p) for p in loc)]) if loc else table
        for n in range(len(loc), 0, -1):  # mqtt.tls.ca_file given by --ca-file names the flag
            flag = flags.get(".".join([table, *(str(p) for p in loc[:n])]))
            if flag:
                return flag
        return f"{name}: {key}"

    receiver_values = {k: v for t in RECEIVER_TABLES for k, v in tables.get(t, {}).items() if k != "db"}
    receiver = console = None
    try:
        receiver = ReceiverConfig(**receiver_values)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper()))
            table = next((t for t, keys in RECEIVER_TABLES.items() if loc and loc[0] in keys), "mqtt")
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where(loc, table)}: {msg}" if loc else f"{name}: {msg}")
    try:
        console = ConsoleConfig(**tables.get("console", {}))
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key (allowed here: {', '.join(f.alias or n for n, f in ConsoleConfig.model_fields.items())}); check its spelling"
            problems.append(f"{where(loc, 'console')}: {msg}" if loc else f"{name}: console: {msg}")
    db = tables.get("store", {}).get("db", DEFAULT_DB)
    if not isinstance(db, str) or not db:
        problems.append(f"{where(('db',), 'store')}: give the store as a SQLite file path or a postgresql:// URL")
    if problems:
        raise ConfigError("\n".join(problems))
    assert receiver is not None and console is not None  # no problem means both validated
    return CentreConfig(db=db, receiver=receiver, console=console)


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    """Overrides win key by key; a nested table (mqtt.tls) is merged, not replaced, so --ca-file keeps
    the file's client certificate."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _resolve_paths(tables: dict[str, dict[str, Any]], base_dir: Path) -> None:
    for where, keys in _PATH_KEYS.items():
        table: Any = tables
        for part in where.split("."):
            table = table.get(part) if isinstance(table, dict) else None
        if not isinstance(table, dict):
            continue
        for key in keys:
            if isinstance(table.get(key), str) and not Path(table[key]).expanduser().is_absolute():
                table[key] = str(base_dir / table[key])
    store = tables.get("store", {})
    db = store.get("db")
    # A plain SQLite path is the file's; a URL (sqlite:///..., postgresql://...) is taken as written.
    if isinstance(db, str) and db and "://" not in db and not Path(db).expanduser().is_absolute():
        store["db"] = str(base_dir / db)
