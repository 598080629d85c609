"""The optional software_version of status and heartbeat messages: sent by every unit, accepted
when absent (units older than the field), refused when malformed; the schemas say the same."""

from __future__ import annotations

import json

import pytest

from common.version import software_version
from wire import records
from wire.errors import ProtocolError


def _heartbeat(**kw) -> bytes:
    outbox = dict.fromkeys(records.HEARTBEAT_OUTBOX_KEYS, 0)
    link = {"state": "connected", "connects": 1, "connect_attempts": 1, "last_error": None}
    return records.heartbeat_payload(
        "site-1", "unit-1", interval_s=10, uptime_s=1, unit={}, outbox=outbox, link=link, at=1.0, **kw
    )


def test_status_and_heartbeat_carry_the_software_version() -> None:
    assert records.decode_status(records.status_payload("s", "u", "online", "connected"))["software_version"] == (
        software_version()
    )
    assert records.decode_heartbeat(_heartbeat())["software_version"] == software_version()
    assert records.decode_heartbeat(_heartbeat(software_version="9.9.9"))["software_version"] == "9.9.9"


def test_an_older_unit_without_the_field_is_accepted_and_a_bad_one_refused() -> None:
    body = json.loads(records.status_payload("s", "u", "online", "connected"))
    del body["software_version"]
    assert "software_version" not in records.decode_status(json.dumps(body).encode())
    body["software_version"] = 3
    with pytest.raises(ProtocolError, match="software_version"):
        records.decode_status(json.dumps(body).encode())
    hb = json.loads(_heartbeat())
    hb["software_version"] = ""
    with pytest.raises(ProtocolError, match="software_version"):
        records.decode_heartbeat(json.dumps(hb).encode())


def test_the_schemas_name_the_optional_field(payload_schemas) -> None:
    schemas = payload_schemas
    for kind in ("status", "heartbeat"):
        assert schemas[kind]["properties"]["software_version"]["type"] == "string"
        assert "software_version" not in schemas[kind]["required"]
    assert schemas["heartbeat"]["properties"]["unit"]["properties"]["warnings"]["type"] == "array"
