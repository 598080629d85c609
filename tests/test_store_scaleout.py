"""Scale-out: several receivers in one shared-subscription group write one PostgreSQL store, and
each hit is stored exactly once, also when the broker delivers a hit again to the other receiver."""

from __future__ import annotations

import pytest

from central.receiver import Receiver, ReceiverConfig
from central.store import HitStore
from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from testing.broker import FAST, MosquittoBroker, find_mosquitto, wait_for
from testing.hits import make_hit
from tests.services import missing_service
from wire import records


@pytest.fixture
def broker(tmp_path):
    if find_mosquitto() is None:
        missing_service("needs the mosquitto broker binary (apt-get install -y mosquitto mosquitto-clients)")
    b = MosquittoBroker(tmp_path / "broker").start()
    yield b
    b.kill()


def receiver(broker, url: str, client_id: str) -> tuple[Receiver, list[str]]:
    got: list[str] = []
    config = ReceiverConfig(
        host=broker.host, port=broker.port, client_id=client_id, reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.5
    )
    rx = Receiver(config, url, on_hit=lambda row: got.append(row["id"]))
    rx.start()
    wait_for(rx.subscribed.is_set, what=f"{client_id} subscribed")
    return rx, got


def test_two_receivers_in_one_group_store_every_hit_once_in_postgresql(broker, postgres_url, tmp_path):
    a, got_a = receiver(broker, postgres_url, "rx-a")
    b, got_b = receiver(broker, postgres_url, "rx-b")
    reporters = [
        MqttReporter(
            MqttConfig(host=broker.host, port=broker.port, site="site-a", **FAST),
            OutboxConfig(path=tmp_path / f"o{i}.sqlite"),
            f"unit-{i}",
        )
        for i in range(2)
    ]
    hits = [make_hit(unit_id=f"unit-{i % 2}") for i in range(200)]
    for i, h in enumerate(hits):
        reporters[i % 2].submit(h)
    # The same hits again, straight onto the topic, as a unit re-sending after a lost PUBACK would.
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="resender", protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    for h in hits[:50]:
        payload = records.hit_payload(records.hit_record(h, "site-a"), None, None)
        pub.publish(f"checkpoint/v1/site-a/{h.unit_id}/hits", payload, qos=1).wait_for_publish(5)
    pub.loop_stop()
    for r in reporters:
        assert r.flush(30)
    wait_for(lambda: a.counts["received"] + b.counts["received"] == 250, timeout=60, what="250 deliveries")
    for r in reporters:
        r.close()
    a.close()
    b.close()
    assert sorted(got_a + got_b) == sorted(h.id for h in hits), "each hit reported new exactly once"
    assert got_a and got_b, "both receivers took a share"
    assert a.counts["duplicates"] + b.counts["duplicates"] == 50
    store = HitStore(postgres_url)
    try:
        assert store.count_hits() == 200
        assert {u["unit_id"]: u["hits"] for u in store.units()} == {"unit-0": 100, "unit-1": 100}
        assert store.verify_audit().ok
    finally:
        store.close()


OPEN_STORE = """
import sys
from central.store import HitStore
sys.stdin.readline()  # all processes start opening at once
HitStore(sys.argv[1]).close()
print("opened")
"""


def test_receivers_started_together_on_a_new_sqlite_file_all_open_it(tmp_path):
    """Receivers started at once on a new SQLite file race to switch it to WAL; the losers used to
    fail at once with 'database is locked'."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for attempt in range(3):
        path = tmp_path / f"new-{attempt}.sqlite"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_STORE, str(path)],
                cwd=root,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        # Each child has imported the store before it reads this line: they open together.
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=60) for p in procs]
        failed = [err for (out, err), p in zip(results, procs) if p.returncode != 0 or out.strip() != "opened"]
        assert not failed, failed[0][-2000:]
        store = HitStore(path)
        assert store.count_hits() == 0
        store.close()
