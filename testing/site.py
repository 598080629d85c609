"""The site of docs/protocol.md "Deployment", as tests run it: Mosquitto started on
deploy/mosquitto/checkpoint.conf (only the folder of the certificates and the port are replaced) with
deploy/mosquitto/acl installed into that folder, accounts made by deploy/make-credentials (which
appends the readers' and receivers' blocks to that ACL), and `Probe`, a bare client over the one
MQTT link that reports PUBACK and SUBACK reasons. Used by tests/test_deploy.py, tests/test_site.py
and tests/test_edge_check_config.py."""

from __future__ import annotations

import getpass
import grp
import os
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central.receiver import ReceiverConfig
from testing.broker import HOST, MosquittoBroker, free_port
from wire.mqtt import MqttConnection, MqttLink


class SiteError(RuntimeError):
    """The deployed site could not be set up as asked."""


ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
INSTALL_DIR = "/etc/mosquitto/checkpoint/"


def render_conf(
    broker_dir: Path, work: Path, port: int, require_certificate: bool = False, own_user: bool = False
) -> str:
    """deploy/mosquitto/checkpoint.conf with its install folder and port replaced, plus what Debian's
    main mosquitto.conf adds (persistence, log). As root, Mosquitto is told to stay the current user
    (who can read a private tmp folder), unless `own_user`: then it drops to its own user, as
    Debian's service does."""
    text = (DEPLOY / "mosquitto" / "checkpoint.conf").read_text()
    for old in (f"{INSTALL_DIR}acl", INSTALL_DIR, "listener 8883\n", "require_certificate false\n"):
        if old not in text:
            raise SiteError(f"deploy/mosquitto/checkpoint.conf no longer has {old!r}: update testing/site.py")
    text = text.replace(INSTALL_DIR, f"{broker_dir}/")
    text = text.replace("listener 8883\n", f"listener {port} {HOST}\n")
    if require_certificate:
        text = text.replace("require_certificate false\n", "require_certificate true\n")
    lines = [
        "persistence true",
        f"persistence_location {work}/",
        f"log_dest file {work}/mosquitto.log",
        "log_type all",
    ]
    if os.geteuid() == 0 and not own_user:
        lines.append(f"user {getpass.getuser()}")
    return "\n".join(lines) + "\n" + text


def make_credentials(*args: object) -> str:
    """Run deploy/make-credentials with `args`; its output (SiteError with its stderr when it fails)."""
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "make-credentials"), *map(str, args)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SiteError(f"make-credentials {' '.join(map(str, args))} failed: {done.stderr}")
    return done.stdout


def install_acl(broker_dir: Path) -> Path:
    """deploy/mosquitto/acl copied into the broker's folder, as the install steps do; make-credentials
    appends the readers' and receivers' blocks to this copy."""
    broker_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(DEPLOY / "mosquitto" / "acl", broker_dir / "acl"))


def make_site_credentials(creds: Path, broker_group: str | None = None) -> Path:
    """The accounts of the two-site test deployment, made by deploy/make-credentials into `creds`: the
    CA and broker certificate (broker/, with the ACL), units site-a/unit-1 and site-b/unit-2 (unit-1/,
    unit-2/: password, watchlist reader password, signing key, client certificate), hq/, and two
    receivers, receiver/ and receiver-2/. The broker's files go to `broker_group` (default: this
    process's group, whom a Mosquitto that stays this user can read). Returns the unit keys file the
    centre loads."""
    broker_dir, passwd, unit_keys = creds / "broker", creds / "broker" / "passwd", creds / "unit-keys"
    group = ["--broker-group", broker_group or grp.getgrgid(os.getegid()).gr_name]
    install_acl(broker_dir)
    make_credentials("ca", "--out", broker_dir, "--broker-host", HOST, "--broker-host", "localhost", *group)
    common = ["--passwd", passwd, "--ca-dir", broker_dir, "--client-cert", *group]
    acl = ["--acl", broker_dir / "acl"]
    for site_id, unit in (("site-a", "unit-1"), ("site-b", "unit-2")):
        make_credentials(
            "unit", "--site", site_id, "--unit", unit, "--out", creds / unit, "--unit-keys", unit_keys, *common, *acl
        )
    make_credentials("hq", "--out", creds / "hq", *common)
    make_credentials("receiver", "--out", creds / "receiver", *common, *acl)
    make_credentials("receiver", "--name", "receiver-2", "--out", creds / "receiver-2", *common, *acl)
    return unit_keys


@dataclass
class Site:
    """A running deployed broker and the accounts of `make_site_credentials`; `hq` is whatever signs lists."""

    broker: MosquittoBroker
    creds: Path
    unit_keys: Path
    hq: Any = None

    def conn(self, username: str | None, password_file: Path | None, **tls: Any) -> MqttConnection:
        return MqttConnection(
            host=HOST,
            port=self.broker.port,
            username=username,
            password_file=password_file,
            tls={"ca_file": self.creds / "broker" / "ca.pem", **tls},
            reconnect_min_delay_s=0.1,
            reconnect_max_delay_s=0.5,
            connect_timeout_s=3,
        )

    def account(self, who: str) -> MqttConnection:
        files = {
            "unit-1": ("site-a/unit-1", "unit-1/mqtt.pw"),
            "unit-2": ("site-b/unit-2", "unit-2/mqtt.pw"),
            "reader-a": ("site-a/unit-1/watchlist", "unit-1/watchlist.pw"),
            "reader-b": ("site-b/unit-2/watchlist", "unit-2/watchlist.pw"),
            "hq": ("hq", "hq/hq.pw"),
            "receiver": ("receiver", "receiver/receiver.pw"),
            "receiver-2": ("receiver-2", "receiver-2/receiver-2.pw"),
        }
        user, pw = files[who]
        return self.conn(user, self.creds / pw)

    def receiver_config(self, client_id: str, **overrides: Any) -> ReceiverConfig:
        """checkpoint-receiver's config on this site: the `receiver` account over TLS, the units' keys."""
        return ReceiverConfig(
            host=HOST,
            port=self.broker.port,
            client_id=client_id,
            username="receiver",
            password_file=self.creds / "receiver" / "receiver.pw",
            tls={"ca_file": self.creds / "broker" / "ca.pem"},
            reconnect_min_delay_s=0.1,
            unit_keys=self.unit_keys,
            **overrides,
        )


def start_deployed_broker(
    workdir: Path, creds: Path, require_certificate: bool = False, own_user: bool = False
) -> MosquittoBroker:
    """Mosquitto on the deployed files in `creds`/broker (`render_conf`), its state and log in `workdir`."""
    broker = MosquittoBroker(workdir, port=free_port())
    broker.conf_path.write_text(render_conf(creds / "broker", workdir, broker.port, require_certificate, own_user))
    return broker.start()


class Probe:
    """A bare client over the one MQTT link: publish and wait for the PUBACK's reason, collect messages."""

    def __init__(self, conn: MqttConnection, client_id: str | None = None, clean_start: bool = True) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, Any] = {}
        self.subacks: dict[int, list[Any]] = {}
        self._cond = threading.Condition()
        self.link = MqttLink(
            conn,
            client_id or f"probe-{uuid.uuid4().hex[:8]}",
            name="probe",
            clean_start=clean_start,
            on_message=self._message,
            on_publish=self._published,
            on_suback=self._subscribed,
        )
        self.link.start()

    def _message(self, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _published(self, mid: int, reason: Any) -> None:
        with self._cond:
            self.acks[mid] = reason
            self._cond.notify_all()

    def _subscribed(self, mid: int, reasons: list[Any]) -> None:
        with self._cond:
            self.subacks[mid] = reasons
            self._cond.notify_all()

    def connected(self) -> Probe:
        problem = self.link.wait_connected(10)
        assert problem is None, problem
        return self

    def publish(self, topic: str, payload: bytes = b"{}") -> str:
        info = self.link.client.publish(topic, payload, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, 10), f"no PUBACK for {topic}"
            return str(self.acks[info.mid])

    def subscribe(self, topic: str) -> None:
        _rc, mid = self.link.client.subscribe(topic, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.subacks, 10), f"no SUBACK for {topic}"

    def wait_messages(self, count: int, timeout: float = 10) -> list[tuple[str, bytes]]:
        """The messages once at least `count` have arrived (AssertionError naming how many did, else)."""
        with self._cond:
            arrived = self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            assert arrived, f"{len(self.messages)} of {count} messages arrived"
            return list(self.messages)

    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _ in self.messages]

    def close(self) -> None:
        self.link.stop()
