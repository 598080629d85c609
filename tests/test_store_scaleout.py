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
