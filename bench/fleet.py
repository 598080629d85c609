"""The centre at national scale: N simulated units against one Mosquitto, receivers in a shared
group and one PostgreSQL store, for minutes; how far behind the receivers fall, how their memory
moves, and whether any hit is lost or stored twice.

    python bench/fleet.py --units 2000 --minutes 10 --json fleet.json
    python bench/fleet.py --units 200 --minutes 2 --db /tmp/fleet.sqlite    # one SQLite file instead

Each simulated unit is a real MQTT 5 connection with its own client id and Ed25519 key (registered
with the receivers, which run with `--unsigned reject`, as a site with signed units does). It
connects with its signed 'offline' Last Will, publishes its signed retained 'online' status, a
retained heartbeat every `--heartbeat-s` (about 1.5 kB, the shape a unit with two cameras sends;
the first at a random point of the period, so the fleet does not beat in step) and signed QoS 1
hits with an 8.8 kB crop at random (Poisson) times, `--hits-per-unit-hour` on average; at the end
each unit publishes 'offline' and disconnects. All units share one thread of this process (paho's
external loop); the receivers are `checkpoint-receiver run` processes, as operators run them.

Lag is measured where an operator sees it: from the moment a message is published (its `queued_at`
or `at`) to the moment its row is visible in the store, read by a poller every `--poll-s` seconds
(so each lag carries up to one poll interval of slack). Receiver memory is each process's resident
set, sampled every 2 s; "flat" compares the highest sample after the first minute with the sample
at one minute. A hit is lost when the broker acknowledged it (PUBACK) and it is not in the store
after the drain; a duplicate is a hit id stored more than once.

A temporary PostgreSQL cluster (Debian's postgresql package, fsync on) is used unless `--db` names
a store. Needs Mosquitto.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import selectors
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine, machine_summary
from bench.reporting import ReceiverProcess
from testing.broker import MosquittoBroker, find_mosquitto
from testing.hits import noise_jpeg
from testing.postgres import PostgresCluster, find_pg_bin
from wire import records, topics
from wire.records import Hit
from wire.signing import UnitSigner, generate_unit_key, public_key_line

SITE = "fleet"
MEMORY_SAMPLE_S = 2.0
FLAT_AFTER_S = 60.0
FLAT_TOLERANCE = 0.10
TARGET_LAG_P99_S = 1.0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB, or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StoreReader:
    """Read-only SQL on the receivers' store, SQLite or PostgreSQL (`?` placeholders)."""

    def __init__(self, url: str) -> None:
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            import psycopg

            self._conn = psycopg.connect(url, autocommit=True)
        else:
            import sqlite3

            self._conn = sqlite3.connect(url, timeout=30.0, isolation_level=None)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            sql = sql.replace("?", "%s")
        return list(self._conn.execute(sql, args).fetchall())

    def close(self) -> None:
        self._conn.close()


@dataclass(eq=False)  # one per connection, kept in sets by identity
class SimUnit:
    unit_id: str
    signer: UnitSigner
    client: Any = None
    connected: bool = False
    inflight: dict[int, str] = field(default_factory=dict)


class Fleet:
    """N units on N MQTT connections, all driven by one thread through paho's external loop."""

    def __init__(self, broker: MosquittoBroker, units: list[SimUnit], crop: bytes, seed: int) -> None:
        self.broker = broker
        self.units = units
        self.crop = crop
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, str, SimUnit]] = []
        self._seq = 0
        self.published: dict[str, float] = {}  # hit id -> queued_at
        self.acked: set[str] = set()
        self.heartbeats_sent = 0
        self.disconnects = 0
        self.publish_errors = 0
        self.closing = False
        self._writers: set[SimUnit] = set()

    # --- connections ---------------------------------------------------------------------------
    def connect_all(self, timeout: float) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        for u in self.units:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=u.unit_id, protocol=mqtt.MQTTv5)
            c.will_set(
                topics.topic(SITE, u.unit_id, "status"),
                records.status_payload(SITE, u.unit_id, "offline", "connection lost", signer=u.signer),
                qos=1,
                retain=True,
            )
            c.on_connect = self._on_connect(u)
            c.on_publish = self._on_publish(u)
            c.on_disconnect = self._on_disconnect(u)
            c.connect(self.broker.host, self.broker.port, keepalive=60)
            u.client = c
            self.sel.register(c.socket(), selectors.EVENT_READ, u)
        deadline = time.monotonic() + timeout
        while not all(u.connected for u in self.units):
            if time.monotonic() > deadline:
                n = sum(u.connected for u in self.units)
                raise RuntimeError(f"only {n} of {len(self.units)} units connected within {timeout:g} s")
            self.step(0.05)

    def _on_connect(self, u: SimUnit):
        def cb(client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                raise RuntimeError(f"unit {u.unit_id}: broker refused the connection: {reason}")
            u.connected = True
            client.publish(
                topics.topic(SITE, u.unit_id, "status"),
                records.status_payload(SITE, u.unit_id, "online", "connected", signer=u.signer),
                qos=1,
                retain=True,
            )

        return cb

    def _on_publish(self, u: SimUnit):
        def cb(_client: Any, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
            hit_id = u.inflight.pop(mid, None)
            if hit_id is not None:
                self.acked.add(hit_id)

        return cb

    def _on_disconnect(self, u: SimUnit):
        def cb(*_args: Any) -> None:
            if u.connected and not self.closing:
                self.disconnects += 1
            u.connected = False

        return cb

    # --- the loop ------------------------------------------------------------------------------
    def step(self, timeout: float) -> None:
        """One turn of the external loop: read what arrived, write what is queued, keepalives."""
        for key, _events in self.sel.select(timeout):
            u = key.data
            if u.client.loop_read() != 0:
                self._reconnect(u)
            self._note_write(u)
        # Only the connections with something queued: asking all 2000 every turn would cost the
        # simulator more CPU than the receivers it measures.
        for u in list(self._writers):
            u.client.loop_write()
            if not u.client.want_write():
                self._writers.discard(u)

    def _note_write(self, u: SimUnit) -> None:
        if u.client.want_write():
            self._writers.add(u)

    def misc(self) -> None:
        """Keepalive pings and timeouts, once a second."""
        for u in self.units:
            if u.client.loop_misc() != 0:
                self._reconnect(u)
            self._note_write(u)

    def _reconnect(self, u: SimUnit) -> None:
        try:
            self.sel.unregister(u.client.socket())
        except (KeyError, ValueError, TypeError):
            pass
        u.connected = False
        u.client.reconnect()
        self.sel.register(u.client.socket(), selectors.EVENT_READ, u)

    def schedule(self, at: float, kind: str, u: SimUnit) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (at, self._seq, kind, u))

    def heartbeat(self, u: SimUnit, period: float) -> None:
        payload = records.heartbeat_payload(
            SITE,
            u.unit_id,
            interval_s=period,
            uptime_s=100.0,
            unit=unit_figures(u.unit_id),
            outbox={**dict.fromkeys(records.HEARTBEAT_OUTBOX_KEYS, 0), "max_bytes": 512 * 1024 * 1024},
            link={"state": "connected", "connects": 1, "connect_attempts": 1, "last_error": None},
        )
        info = u.client.publish(topics.topic(SITE, u.unit_id, "heartbeat"), payload, qos=0, retain=True)
        if info.rc != 0:
            self.publish_errors += 1
        self._note_write(u)
        self.heartbeats_sent += 1

    def hit(self, u: SimUnit) -> None:
        now = time.time()
        h = Hit(
            unit_id=u.unit_id,
            camera_id="cam-1",
            captured_at=now,
            person_id=f"case-{self.rng.randrange(1, 5000):05d}",
            score=0.8,
            threshold=0.6,
            margin=0.2,
            box=(10.0, 10.0, 80.0, 90.0),
            model_id="bench",
            watchlist_version=1,
            crop_jpeg=self.crop,
        )
        payload = records.hit_payload(records.hit_record(h, SITE, queued_at=now), self.crop, None, signer=u.signer)
        info = u.client.publish(topics.topic(SITE, u.unit_id, "hits"), payload, qos=1)
        if info.rc != 0:
            self.publish_errors += 1
        self._note_write(u)
        u.inflight[info.mid] = h.id
        self.published[h.id] = now

    def run(self, seconds: float, heartbeat_s: float, hits_per_s: float, on_second: Any) -> None:
        """Drive heartbeats and hits for `seconds`; `on_second` is called about once a second."""
        start = time.monotonic()
        for u in self.units:
            self.schedule(start + self.rng.uniform(0, heartbeat_s), "heartbeat", u)
            if hits_per_s > 0:
                self.schedule(start + self.rng.expovariate(hits_per_s), "hit", u)
        end = start + seconds
        next_second = start + 1.0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            while self.timers and self.timers[0][0] <= now:
                _at, _seq, kind, u = heapq.heappop(self.timers)
                if kind == "heartbeat":
                    self.heartbeat(u, heartbeat_s)
                    self.schedule(now + heartbeat_s, "heartbeat", u)
                else:
                    self.hit(u)
                    self.schedule(now + self.rng.expovariate(hits_per_s), "hit", u)
            if now >= next_second:
                self.misc()
                on_second()
                next_second += 1.0
            wait = min(next_second, self.timers[0][0] if self.timers else end, end) - time.monotonic()
            self.step(max(0.0, min(wait, 0.05)))

    def drain(self, timeout: float) -> None:
        """Keep the loop turning until every hit is acknowledged, or `timeout`."""
        deadline = time.monotonic() + timeout
        last_misc = time.monotonic()
        while any(u.inflight for u in self.units) and time.monotonic() < deadline:
            self.step(0.05)
            if time.monotonic() - last_misc >= 1.0:
                self.misc()
                last_misc = time.monotonic()

    def shut_down(self, timeout: float) -> None:
        """Each unit says 'offline' (shutdown) and disconnects, as `edge run` does on SIGTERM."""
        self.closing = True
        for u in self.units:
            u.client.publish(
                topics.topic(SITE, u.unit_id, "status"),
                records.status_payload(SITE, u.unit_id, "offline", "shutdown", signer=u.signer),
                qos=1,
                retain=True,
            )
        deadline = time.monotonic() + timeout
        while any(u.client.want_write() for u in self.units) and time.monotonic() < deadline:
            self.step(0.05)
        self.step(0.5)
        for u in self.units:
            u.client.disconnect()
            u.client.loop_write()
        self.sel.close()


def unit_figures(unit_id: str) -> dict[str, Any]:
    """What a unit with two cameras puts in its heartbeat (the shape edge/daemon.py's status has)."""
    camera = {
        "up": True,
        "since": 1.0,
        "last_error": None,
        "previous_error": None,
        "previous_error_at": None,
        "reconnects": 0,
        "fps_in": 25.0,
        "fps_analysed": 5.0,
        "faces": 120,
        "hits": 1,
        "lag_s": 0.05,
        "frames_skipped": 0,
        "frames_full": 100,
        "frames_regions": 400,
        "searched_share": 0.3,
        "faces_confirmed": 90,
        "errors": 0,
    }
    return {
        "software_version": "bench",
        "started_at": 1.0,
        "warnings": [],
        "model_id": "bench",
        "cameras": [dict(camera, id=f"cam-{i}", name=f"{unit_id} gate {i}") for i in (1, 2)],
        "cameras_up": 2,
        "cameras_total": 2,
        "watchlist": {"version": 7, "model_id": "bench", "persons": 5000, "expires_at": time.time() + 86400 * 30},
        "hits": 1,
        "sinks": {},
        "selftest": {"passed": True},
    }


class Poller(threading.Thread):
    """Notes when each hit and each heartbeat becomes visible in the store."""

    def __init__(self, url: str, poll_s: float) -> None:
        super().__init__(name="fleet-poller", daemon=True)
        self.url = url
        self.poll_s = poll_s
        self.error: BaseException | None = None
        self.seen_hits: dict[str, float] = {}
        self.heartbeat_lags: list[float] = []
        self._seen_heartbeat: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        reader = StoreReader(self.url)  # SQLite connections belong to the thread that opens them
        try:
            since = time.time() - 5.0
            while not self._halt.wait(self.poll_s):
                self.poll(reader, since)
                since = time.time() - 5.0
        except BaseException as e:  # handed to the main thread by check_alive
            self.error = e
        finally:
            reader.close()

    def check_alive(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the store poller failed: {self.error!r}") from self.error

    def poll(self, reader: StoreReader, since: float) -> None:
        now = time.time()
        for hit_id, _received in reader.query("SELECT id, received_at FROM hits WHERE received_at >= ?", (since,)):
            self.seen_hits.setdefault(hit_id, now)
        for unit_id, body in reader.query(
            "SELECT unit_id, heartbeat FROM units WHERE last_heartbeat_at >= ?", (since,)
        ):
            at = json.loads(body).get("at") if body else None
            if at is not None and self._seen_heartbeat.get(unit_id) != at:
                self._seen_heartbeat[unit_id] = at
                self.heartbeat_lags.append(now - at)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.check_alive()


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    broker = MosquittoBroker(work / "broker", persistence=True).start()
    cluster = None
    if args.db:
        db = args.db
    else:
        bindir = find_pg_bin()
        if bindir is None:
            raise SystemExit("needs PostgreSQL's initdb and pg_ctl (apt-get install -y postgresql), or --db PATH")
        # Its own folder: a root-run benchmark's private temporary folder is closed to the postgres user.
        cluster = PostgresCluster(bindir, Path(tempfile.mkdtemp(prefix="fleet-pg-")), fsync=True).start()
        db = cluster.create_database()
    receivers: list[ReceiverProcess] = []
    try:
        units = [SimUnit(f"u{i:05d}", generate_unit_key()) for i in range(args.units)]
        keys = work / "unit-keys.txt"
        keys.write_text("".join(public_key_line(SITE, u.unit_id, u.signer.public_raw) + "\n" for u in units))
        receivers = [
            ReceiverProcess(
                broker,
                db,
                work / f"rx-{i}.log",
                f"rx-{chr(ord('a') + i)}",
                extra_args=("--unit-keys", str(keys), "--unsigned", "reject"),
            )
            for i in range(args.receivers)
        ]
        wait_subscribed(broker, receivers, timeout=60)
        fleet = Fleet(broker, units, noise_jpeg(args.crop_bytes), args.seed)
        t0 = time.monotonic()
        fleet.connect_all(timeout=120)
        connect_s = time.monotonic() - t0
        poller = Poller(db, args.poll_s)
        poller.start()

        samples: list[tuple[float, list[float | None]]] = []
        cpu0 = [cpu_seconds(r.proc.pid) for r in receivers]
        own_cpu0 = time.process_time()
        start = time.monotonic()
        last_sample = [-MEMORY_SAMPLE_S]

        def on_second() -> None:
            for r in receivers:
                r.check_alive()
            poller.check_alive()
            t = time.monotonic() - start
            if t - last_sample[0] >= MEMORY_SAMPLE_S:
                samples.append((t, [rss_mb(r.proc.pid) for r in receivers]))
                last_sample[0] = t

        fleet.run(args.minutes * 60.0, args.heartbeat_s, args.hits_per_unit_hour / 3600.0, on_second)
        run_s = time.monotonic() - start
        cpu_used = [cpu_seconds(r.proc.pid) - c for r, c in zip(receivers, cpu0)]
        own_cpu = time.process_time() - own_cpu0
        fleet.drain(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            fleet.acked <= poller.seen_hits.keys() and len(poller.heartbeat_lags) >= fleet.heartbeats_sent
        ):
            poller.check_alive()
            time.sleep(0.2)
        poller.stop()
        fleet.shut_down(timeout=30)

        reader = StoreReader(db)
        stored = [row[0] for row in reader.query("SELECT id FROM hits")]
        rejects = reader.query("SELECT count(*) FROM rejects")[0][0]
        units_online = reader.query("SELECT count(*) FROM units WHERE state = 'online'")[0][0]
        reader.close()
    finally:
        for r in receivers:
            r.stop(timeout=30)
        broker.kill()
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.workdir, ignore_errors=True)

    stored_set = set(stored)
    lost = sorted(fleet.acked - stored_set)
    hit_lags = [poller.seen_hits[h] - q for h, q in fleet.published.items() if h in poller.seen_hits]
    return {
        "units": args.units,
        "minutes": args.minutes,
        "receivers": args.receivers,
        "store": "postgresql (temporary cluster, fsync on)" if cluster is not None else db,
        "heartbeat_s": args.heartbeat_s,
        "hits_per_unit_hour": args.hits_per_unit_hour,
        "poll_s": args.poll_s,
        "connect_s": round(connect_s, 2),
        "run_s": round(run_s, 1),
        "heartbeats_sent": fleet.heartbeats_sent,
        "heartbeats_seen": len(poller.heartbeat_lags),
        "heartbeat_lag_p50_s": pct(poller.heartbeat_lags, 50),
        "heartbeat_lag_p99_s": pct(poller.heartbeat_lags, 99),
        "heartbeat_lag_max_s": max(poller.heartbeat_lags, default=float("nan")),
        "hits_sent": len(fleet.published),
        "hits_acked": len(fleet.acked),
        "hits_stored": len(stored_set & set(fleet.published)),
        "hits_lost": len(lost),
        "lost_ids": lost[:20],
        "hits_duplicated": len(stored) - len(stored_set),
        "hit_lag_p50_s": pct(hit_lags, 50),
        "hit_lag_p99_s": pct(hit_lags, 99),
        "hit_lag_max_s": max(hit_lags, default=float("nan")),
        "rejects": int(rejects),
        "units_online_at_end": int(units_online),
        "unit_disconnects": fleet.disconnects,
        "publish_errors": fleet.publish_errors,
        "receiver_cpu_share": [round(c / run_s, 3) for c in cpu_used],
        "simulator_cpu_share": round(own_cpu / run_s, 3),
        "load_average": os.getloadavg(),
        "memory": (memory := memory_summary(samples, len(receivers))),
        "targets": {
            "no_hit_lost_or_stored_twice": not lost and len(stored) == len(stored_set),
            "lag_p99_under_1s": max(pct(poller.heartbeat_lags, 99), pct(hit_lags, 99)) < TARGET_LAG_P99_S,
            "receiver_memory_flat": all(m.get("flat") for m in memory),
        },
        "memory_samples": [{"t": round(t, 1), "rss_mb": m} for t, m in samples],
    }


def wait_subscribed(broker: MosquittoBroker, receivers: list[ReceiverProcess], timeout: float) -> None:
    """Until the broker's log shows each receiver's subscription to the shared hits topic."""
    deadline = time.monotonic() + timeout
    while True:
        for r in receivers:
            r.check_alive()
        log = broker.log_text()
        if all(f"{r.client_id} 1 $share/" in log or f"{r.client_id} 2 $share/" in log for r in receivers):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"receivers not subscribed within {timeout:g} s; broker log:\n{log[-2000:]}")
        time.sleep(0.1)


def memory_summary(samples: list[tuple[float, list[float | None]]], n: int) -> list[dict[str, Any]]:
    """Per receiver: resident memory at one minute, the highest after it, at the end, and whether it
    stayed within FLAT_TOLERANCE of the one-minute figure."""
    out = []
    for i in range(n):
        series = [(t, m[i]) for t, m in samples if m[i] is not None]
        if not series:
            out.append({"receiver": i, "flat": None})
            continue
        at_minute = next((m for t, m in series if t >= FLAT_AFTER_S), series[-1][1])
        after = [m for t, m in series if t >= FLAT_AFTER_S] or [series[-1][1]]
        peak_after = max(after)
        out.append(
            {
                "receiver": i,
                "rss_first_mb": round(series[0][1], 1),
                "rss_at_1min_mb": round(at_minute, 1),
                "rss_peak_after_1min_mb": round(peak_after, 1),
                "rss_end_mb": round(series[-1][1], 1),
                "growth_after_1min": round(peak_after / at_minute - 1.0, 4),
                "flat": peak_after <= at_minute * (1.0 + FLAT_TOLERANCE),
            }
        )
    return out


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("units / receivers / minutes", f"{r['units']} / {r['receivers']} / {r['minutes']:g}"),
        ("store", r["store"]),
        ("connect all units", f"{r['connect_s']:.1f} s"),
        ("heartbeats sent / seen in store", f"{r['heartbeats_sent']} / {r['heartbeats_seen']}"),
        (
            "heartbeat lag p50 / p99 / max",
            f"{r['heartbeat_lag_p50_s']:.3f} / {r['heartbeat_lag_p99_s']:.3f} / {r['heartbeat_lag_max_s']:.3f} s",
        ),
        ("hits sent / acked / stored", f"{r['hits_sent']} / {r['hits_acked']} / {r['hits_stored']}"),
        ("hits lost / stored twice", f"{r['hits_lost']} / {r['hits_duplicated']}"),
        (
            "hit lag p50 / p99 / max",
            f"{r['hit_lag_p50_s']:.3f} / {r['hit_lag_p99_s']:.3f} / {r['hit_lag_max_s']:.3f} s",
        ),
        ("rejected messages", str(r["rejects"])),
        ("unit disconnects", str(r["unit_disconnects"])),
        ("receiver CPU (share of one core)", " / ".join(f"{c:.2f}" for c in r["receiver_cpu_share"])),
        ("simulated units' CPU (this process)", f"{r['simulator_cpu_share']:.2f}"),
        ("load average at the end (1/5/15 min)", " / ".join(f"{x:.1f}" for x in r["load_average"])),
    ]
    for m in r["memory"]:
        if m.get("flat") is None:
            continue
        rows.append(
            (
                f"receiver {m['receiver']} RSS 1 min / peak after / end",
                f"{m['rss_at_1min_mb']:.0f} / {m['rss_peak_after_1min_mb']:.0f} / {m['rss_end_mb']:.0f} MB "
                f"({m['growth_after_1min']:+.1%}, {'flat' if m['flat'] else 'GROWING'})",
            )
        )
    for name, met in r["targets"].items():
        rows.append((f"target: {name.replace('_', ' ')}", "met" if met else "NOT MET"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--units", type=int, default=2000, help="simulated units, one MQTT connection each")
    p.add_argument("--minutes", type=float, default=10.0, help="how long the fleet runs")
    p.add_argument("--receivers", type=int, default=2, help="receivers in the shared subscription group")
    p.add_argument("--heartbeat-s", type=float, default=30.0, help="each unit's heartbeat period (the default)")
    p.add_argument("--hits-per-unit-hour", type=float, default=6.0, help="mean hits per unit per hour")
    p.add_argument("--crop-bytes", type=int, default=8800, help="size of each hit's JPEG crop")
    p.add_argument("--poll-s", type=float, default=0.1, help="how often the store is read for new rows")
    p.add_argument("--db", default=None, help="a store URL or SQLite path instead of a temporary PostgreSQL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if find_mosquitto() is None:
        raise SystemExit("needs mosquitto (apt-get install -y mosquitto)")
    if args.units < 1 or args.receivers < 1 or not math.isfinite(args.minutes) or args.minutes <= 0:
        raise SystemExit("--units and --receivers must be at least 1 and --minutes above 0")
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        result = measure(args, Path(tmp))
    result["machine"] = describe_machine()
    print(machine_summary(result["machine"]))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
