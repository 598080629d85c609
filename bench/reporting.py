"""Benchmark of hit reporting: outbox -> Mosquitto -> checkpoint-receiver, all real, on this machine.

Measures
  * outbox write cost per hit (Outbox.put: rollback journal + synchronous=FULL, three fsyncs per hit),
  * sustained hits/s from MqttReporter.submit to rows committed in the receiver's store: SQLite,
    and PostgreSQL (a temporary cluster, fsync on) where Debian's postgresql is installed,
  * publish-to-receive latency p50/p99 (queued_at in the unit -> received_at in the receiver) at a
    paced rate and under saturation,
  * recovery after a broker restart with a backlog of pending hits (default 10,000).

It starts its own mosquitto (the test fixture's runner) on a free loopback port and the receiver
as a subprocess (`python -m central.cli run`), as operators would run it.

    python bench/reporting.py --json OUT.json
    python bench/reporting.py --sign --json OUT.json    # the same with every hit and status signed (Ed25519)
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine, machine_summary
from bench.store import StoreProbe
from edge.outbox import Outbox, OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import MosquittoBroker, find_mosquitto
from testing.hits import noise_jpeg
from testing.postgres import PostgresCluster, find_pg_bin
from wire import records
from wire.records import Hit
from wire.signing import KnownKeys, generate_unit_key, public_key_line, verify_record, write_unit_key


def make_hit(tag: str, crop: bytes | None) -> Hit:
    return Hit(
        unit_id="unit-1",
        camera_id="cam-1",
        captured_at=time.time(),
        person_id=tag,
        score=0.8,
        threshold=0.6,
        margin=0.2,
        box=(10.0, 10.0, 80.0, 90.0),
        model_id="bench",
        watchlist_version=1,
        crop_jpeg=crop,
    )


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class ReceiverProcess:
    """checkpoint-receiver in its own process; progress is read from its store (SQLite or PostgreSQL)."""

    def __init__(
        self, broker: MosquittoBroker, db: str, log: Path, client_id: str, extra_args: Sequence[str] = ()
    ) -> None:
        self.db = db
        self.client_id = client_id
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "central.cli",
                "run",
                "--host",
                broker.host,
                "--port",
                str(broker.port),
                "--db",
                db,
                "--client-id",
                client_id,
                *extra_args,
                "--quiet",
                "--reconnect-max-delay",
                "0.5",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        self._probe: StoreProbe | None = None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"receiver {self.client_id} exited ({self.proc.returncode}):\n{tail}")

    def probe(self) -> StoreProbe | None:
        """The store, once the receiver has created it."""
        if self._probe is None:
            if "://" not in self.db and not Path(self.db).exists():
                return None  # the receiver creates its SQLite store as it starts
            try:
                self._probe = StoreProbe(self.db)
            except Exception:  # not created yet (the receiver makes it on start)
                return None
        return self._probe

    def count(self, tag: str) -> int:
        probe = self.probe()
        return 0 if probe is None else probe.count(tag)

    def wait(self, tag: str, n: int, timeout: float) -> float:
        """Block until `n` hits tagged `tag` are stored; returns the time it happened."""
        deadline = time.monotonic() + timeout
        while self.count(tag) < n:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the receiver exited ({self.proc.returncode}); see its log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"receiver has {self.count(tag)}/{n} {tag} hits after {timeout}s")
            time.sleep(0.1)
        return time.monotonic()

    def latencies_ms(self, tag: str) -> list[float]:
        return self.probe().latencies_ms(tag)

    def last_received_at(self, tag: str) -> float:
        return self.probe().last_received_at(tag)

    def stop(self, timeout: float = 15) -> None:
        if self._probe is not None:
            self._probe.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def bench_outbox(work: Path, n: int, crop: bytes) -> dict[str, dict[str, float]]:
    out = {}
    for name, c in (("no_crop", None), (f"crop_{len(crop) // 1000}kB", crop)):
        box = Outbox(OutboxConfig(path=work / f"put-{name}.sqlite"))
        times = []
        for _ in range(n):
            h = make_hit("put", c)
            record = records.encode_record(records.hit_record(h, "site-a"))
            t0 = time.perf_counter()
            box.put(h.id, record, c)
            times.append((time.perf_counter() - t0) * 1e6)
        box.close()
        out[name] = {"mean_us": float(np.mean(times)), "p50_us": pct(times, 50), "p99_us": pct(times, 99)}
    return out


def bench_signing(n: int, crop: bytes) -> dict[str, float]:
    """CPU cost per hit of building the message the reporter publishes, unsigned and signed, and of
    the receiver's verify_record: what signing adds, apart from fsyncs and the network."""
    signer = generate_unit_key()
    keys = KnownKeys.parse(public_key_line("site-a", "unit-1", signer.public_raw))
    record = records.encode_record(records.hit_record(make_hit("sign", crop), "site-a"))
    out: dict[str, float] = {}
    for name, fn in (
        ("payload_unsigned_us", lambda: records.hit_payload(record, crop, None)),
        ("payload_signed_us", lambda: records.hit_payload(record, crop, None, signer=signer)),
    ):
        t0 = time.perf_counter()
        for _ in range(n):
            payload = fn()
        out[name] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        verify_record(payload, keys)
    out["verify_us"] = (time.perf_counter() - t0) / n * 1e6
    return out


def measure(
    work: Path, name: str, store_url: str, args: argparse.Namespace, crop: bytes, signing_key: Path | None, full: bool
) -> dict:
    """Unit reporter -> a fresh Mosquitto -> a receiver writing to `store_url`: sustained hits/s, and
    with `full` also the paced latency and the recovery of a backlog after a broker restart."""
    out: dict = {}
    broker = MosquittoBroker(work / f"broker-{name}").start()
    rx = ReceiverProcess(broker, store_url, work / f"receiver-{name}.log", f"bench-rx-{name}")
    reporter = MqttReporter(
        MqttConfig(
            host=broker.host,
            port=broker.port,
            site="site-a",
            reconnect_min_delay_s=0.1,
            reconnect_max_delay_s=1.0,
            heartbeat_interval_s=5.0,
            signing_key=signing_key,
        ),
        OutboxConfig(path=work / f"outbox-{name}.sqlite", max_bytes=1024**3),
        "unit-1",
    )
    try:
        deadline = time.monotonic() + 20
        while reporter.state != "connected" or rx.probe() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no connection: {reporter.last_error}")
            time.sleep(0.05)
        # Warm up until the receiver is subscribed (the reporter holds hits until then).
        reporter.submit(make_hit("warmup", crop))
        rx.wait("warmup", 1, 30)

        # Sustained throughput: submit as fast as the outbox takes them.
        t0 = time.monotonic()
        for _ in range(args.hits):
            reporter.submit(make_hit("throughput", crop))
        t_submitted = time.monotonic()
        t_done = rx.wait("throughput", args.hits, 300)
        lat = rx.latencies_ms("throughput")
        out["throughput"] = {
            "hits": args.hits,
            "seconds": t_done - t0,
            "hits_per_s": args.hits / (t_done - t0),
            "submit_hits_per_s": args.hits / (t_submitted - t0),
            "latency_saturated_p50_ms": pct(lat, 50),
            "latency_saturated_p99_ms": pct(lat, 99),
        }

        if not full:
            return out
        # Latency at a paced rate, as in the field (hits are rare).
        period = 1.0 / args.rate
        t_next = time.monotonic()
        for _ in range(args.latency_hits):
            reporter.submit(make_hit("latency", crop))
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))
        rx.wait("latency", args.latency_hits, 60)
        lat = rx.latencies_ms("latency")
        out["latency"] = {
            "rate_per_s": args.rate,
            "hits": args.latency_hits,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat),
        }

        # Recovery: broker down, backlog builds up on disk, broker back.
        broker.stop()
        t_fill = time.monotonic()
        for _ in range(args.backlog):
            reporter.submit(make_hit("backlog", crop))
        fill_s = time.monotonic() - t_fill
        pending = reporter.outbox.depth
        t_start = time.monotonic()
        broker.start()
        wall_start = time.time()
        while reporter.state != "connected":
            time.sleep(0.01)
        t_connected = time.monotonic()
        t_all = rx.wait("backlog", args.backlog, 600)
        drained = reporter.flush(60)
        out["recovery"] = {
            "pending_at_restart": pending,
            "fill_seconds": fill_s,
            "reporter_reconnect_s": t_connected - t_start,
            "all_received_s": t_all - t_start,
            "last_stored_after_restart_s": rx.last_received_at("backlog") - wall_start,
            "drain_hits_per_s": args.backlog / (t_all - t_connected),
            "outbox_empty": drained,
            "reconnect_max_delay_s": 1.0,
        }
    finally:
        reporter.close(5)
        rx.stop()
        broker.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--puts", type=int, default=2000, help="hits for the outbox write cost")
    ap.add_argument("--hits", type=int, default=5000, help="hits for the sustained throughput run")
    ap.add_argument("--rate", type=float, default=50.0, help="hits/s for the paced latency run")
    ap.add_argument("--latency-hits", type=int, default=300)
    ap.add_argument("--backlog", type=int, default=10000, help="hits pending when the broker comes back")
    ap.add_argument("--crop-bytes", type=int, default=8000, help="size of each face crop JPEG")
    ap.add_argument("--sign", action="store_true", help="the unit signs every hit and status ([mqtt] signing_key)")
    ap.add_argument("--no-postgres", action="store_true", help="measure the SQLite store only")
    args = ap.parse_args()

    if find_mosquitto() is None:
        print("needs mosquitto (apt-get install -y mosquitto)", file=sys.stderr)
        return 2
    crop = noise_jpeg(args.crop_bytes)
    results: dict = {
        "command": "python bench/reporting.py " + " ".join(sys.argv[1:]),
        "machine": {
            **describe_machine(),
            "sqlite": sqlite3.sqlite_version,
            "mosquitto": subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True).stdout.split("\n")[0],
        },
        "crop_bytes": len(crop),
        "signed": args.sign,
        # Other work on the machine moves every figure here (fsync latency above all): record it.
        "load_avg_1m_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="bench-reporting-") as tmp:
        work = Path(tmp)
        results["outbox_put"] = bench_outbox(work, args.puts, crop)
        results["signing_cpu"] = bench_signing(args.puts, crop)

        signing_key = write_unit_key(generate_unit_key(), work / "unit-1.key") if args.sign else None
        stores = {"sqlite": str(work / "receiver.sqlite")}
        cluster = None
        if not args.no_postgres and find_pg_bin() is not None:
            # Its own top-level folder: the server's user must reach it.
            cluster = PostgresCluster(find_pg_bin(), Path(tempfile.mkdtemp(prefix="bench-pg-")), fsync=True).start()
            stores["postgresql"] = cluster.create_database()
        elif not args.no_postgres:
            print("PostgreSQL not installed (apt-get install -y postgresql): SQLite only", file=sys.stderr)
        try:
            results.update(measure(work, "sqlite", stores["sqlite"], args, crop, signing_key, full=True))
            results["stores"] = {"sqlite": results["throughput"]}
            if "postgresql" in stores:
                pg = measure(work, "postgresql", stores["postgresql"], args, crop, signing_key, full=False)
                results["stores"]["postgresql"] = pg["throughput"]
        finally:
            if cluster is not None:
                cluster.stop()

    results["load_avg_1m_end"] = os.getloadavg()[0]
    put = results["outbox_put"]
    rows = [
        ("outbox write, no crop (mean / p99)", f"{put['no_crop']['mean_us']:.0f} / {put['no_crop']['p99_us']:.0f} us"),
    ]
    crop_key = next(k for k in put if k != "no_crop")
    rows.append(
        (f"outbox write, {crop_key} (mean / p99)", f"{put[crop_key]['mean_us']:.0f} / {put[crop_key]['p99_us']:.0f} us")
    )
    sc = results["signing_cpu"]
    rows.append(
        (
            "hit message unsigned / signed / verify",
            f"{sc['payload_unsigned_us']:.0f} / {sc['payload_signed_us']:.0f} / {sc['verify_us']:.0f} us",
        )
    )
    t, lt, r = results["throughput"], results["latency"], results["recovery"]
    rows += [
        (f"sustained, {t['hits']} hits submit->stored (SQLite)", f"{t['hits_per_s']:.0f} hits/s"),
        ("  submit alone", f"{t['submit_hits_per_s']:.0f} hits/s"),
        (
            "  latency when saturated p50 / p99",
            f"{t['latency_saturated_p50_ms']:.0f} / {t['latency_saturated_p99_ms']:.0f} ms",
        ),
        (f"latency at {lt['rate_per_s']:g} hits/s p50 / p99", f"{lt['p50_ms']:.1f} / {lt['p99_ms']:.1f} ms"),
        (f"recovery, {r['pending_at_restart']} pending: reconnect", f"{r['reporter_reconnect_s']:.2f} s"),
        ("  all received after broker start", f"{r['all_received_s']:.2f} s"),
        ("  drain rate", f"{r['drain_hits_per_s']:.0f} hits/s"),
    ]
    if "postgresql" in results["stores"]:
        pg = results["stores"]["postgresql"]
        rows.append((f"sustained, {pg['hits']} hits submit->stored (PostgreSQL)", f"{pg['hits_per_s']:.0f} hits/s"))
    width = max(len(k) for k, _ in rows)
    print(
        f"hit reporting benchmark ({'signed' if args.sign else 'unsigned'} hits, {results['machine']['cpus']} CPUs, "
        f"crop {len(crop)} bytes, load average "
        f"{results['load_avg_1m_start']:.1f} -> {results['load_avg_1m_end']:.1f})"
    )
    print(f"  {machine_summary(results['machine'])}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
