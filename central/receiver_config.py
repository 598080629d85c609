"""The receiver's settings: how it reaches the broker, which subscriptions it makes, how much it
takes in at once, how long hits are kept, and what it does with records not verifiably signed.
`checkpoint-receiver run` builds one from its flags and centre.toml (central/config.py).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from central.publications import MANIFEST_SUBSCRIPTION
from wire import records, topics
from wire.mqtt import MqttConnection
from wire.topics import TopicLevel


class ReceiverConfig(MqttConnection):
    """How the receiver reaches the broker and which subscriptions it makes."""

    client_id: str = Field(
        default_factory=lambda: f"checkpoint-receiver-{socket.gethostname()}",
        description="stable and different for each receiver (the broker keeps its session by this id)",
    )
    group: TopicLevel = Field(default="checkpoint-receivers", description="shared-subscription group that splits hits")
    shared: bool = Field(default=True, description="use $share/<group>/... (MQTT 5); off: receive every hit")
    receive_maximum: int = Field(default=100, ge=1, le=65535, description="hits the broker may send unacknowledged")
    batch_max: int = Field(default=200, ge=1, le=10000, description="messages committed to the store at once")
    queue_max: int = Field(
        default=20000, ge=1, description="QoS 0 messages (heartbeats) waiting for the store; more are dropped, counted"
    )
    queue_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=records.MAX_HEARTBEAT_BYTES, description="their payload bytes, the same way"
    )
    heartbeat_min_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="a unit's heartbeat (any QoS 0 message on its topics) sooner than this after the last one "
        "taken is dropped, counted (units send one every 30 s by default)",
    )
    retention_days: float = Field(default=90.0, gt=0, description="hits older than this are purged from the store")
    unit_keys: Path | None = Field(
        default=None, description="unit public keys (a file of key lines or a folder of *.pub files)"
    )
    unsigned: Literal["accept", "reject"] = Field(
        default="accept",
        description="hits and status not verifiably signed from units with no registered key: accept "
        "(stored with their verdict, while units migrate) or reject (quarantined). Units with a registered "
        "key must always sign validly.",
    )

    @model_validator(mode="after")
    def _reject_needs_keys(self) -> ReceiverConfig:
        if self.unsigned == "reject" and self.unit_keys is None:
            raise ValueError("unsigned = reject quarantines every hit unless unit_keys names the units' public keys")
        return self

    def subscriptions(self) -> list[str]:
        hits = f"{topics.TOPIC_ROOT}/+/+/hits"
        if self.shared and self.protocol == "5":
            hits = f"$share/{self.group}/{hits}"
        # HQ's watchlist manifests (not their chunks): the fleet page shows units behind HQ's list.
        return [
            hits,
            f"{topics.TOPIC_ROOT}/+/+/status",
            f"{topics.TOPIC_ROOT}/+/+/heartbeat",
            MANIFEST_SUBSCRIPTION,
        ]
