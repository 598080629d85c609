"""MQTT topics of protocol v1: ``checkpoint/v1/<site>/<unit>/<hits|status|heartbeat>`` from a unit,
``checkpoint/v1/<site>/<unit>/verdicts`` from the centre's receivers to that unit.

A site, unit or group id is one topic level; `TopicLevel` is that rule as a pydantic type, for the
config models of every role, and `UnitIdLevel` the same for a unit id, which may also not be one of
the words `RESERVED_UNIT_IDS` gives a meaning at that level.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from wire.errors import ProtocolError
from wire.records import id_problem

TOPIC_ROOT = "checkpoint/v1"
KINDS = ("hits", "status", "heartbeat")
"""What a unit publishes (and a receiver subscribes to)."""
VERDICTS = "verdicts"
"""What the receivers answer a unit's hits with; the unit reads it, only the receiver account writes it
(deploy/mosquitto/acl). Not one of KINDS: a receiver never takes a message from there."""
# Words that already mean something where a unit id stands, and what. HQ publishes a site's list
# under checkpoint/v1/<site>/watchlist/# (deploy/mosquitto/acl): a unit of that name would publish
# into the list's topics, and read them with its own account.
RESERVED_UNIT_IDS: dict[str, str] = {
    "watchlist": "checkpoint/v1/<site>/watchlist/ is where HQ publishes the site's watchlist",
}


def check_topic_level(value: str, what: str, reserved: dict[str, str] | None = None) -> str:
    """Return `value` if it can be one MQTT topic level (a site or unit id), else raise ProtocolError.

    `reserved`: words that level may not be, each with why (RESERVED_UNIT_IDS for a unit id)."""
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} must be a non-empty string, got {value!r}")
    bad = [c for c in "/+#\x00" if c in value]
    if bad or value.startswith("$") or value != value.strip():
        raise ProtocolError(
            f"{what} {value!r} cannot be an MQTT topic level: no '/', '+', '#', NUL, leading '$' "
            f"or surrounding spaces (use letters, digits, '-', '_', '.')"
        )
    # It also travels in every record the unit sends: the wire's id rule holds for it too.
    problem = id_problem(value)
    if problem is not None:
        raise ProtocolError(f"{what} {value!r} {problem} (use letters, digits, '-', '_', '.')")
    if reserved and value in reserved:
        raise ProtocolError(f"{what} {value!r} is reserved ({reserved[value]}); choose another")
    return value


def topic(site: str, unit_id: str, kind: str) -> str:
    """The topic a unit publishes `kind` ('hits', 'status', 'heartbeat') on."""
    if kind not in KINDS:
        raise ProtocolError(f"unknown topic kind {kind!r}; expected one of {', '.join(KINDS)}")
    return f"{TOPIC_ROOT}/{check_topic_level(site, 'site')}/{check_topic_level(unit_id, 'unit id', RESERVED_UNIT_IDS)}/{kind}"


def verdict_topic(site: str, unit_id: str) -> str:
    """The topic the receivers publish the verdicts on a unit's hits on, and the unit reads."""
    return f"{TOPIC_ROOT}/{check_topic_level(site, 'site')}/{check_topic_level(unit_id, 'unit id', RESERVED_UNIT_IDS)}/{VERDICTS}"


def parse_topic(name: str) -> tuple[str, str, str]:
    """Split ``checkpoint/v1/<site>/<unit>/<kind>`` into (site, unit, kind)."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[4] not in KINDS or not parts[2] or not parts[3]:
        raise ProtocolError(f"topic {name!r} is not {TOPIC_ROOT}/<site>/<unit>/<hits|status|heartbeat>")
    return parts[2], parts[3], parts[4]


def _topic_level(value: str) -> str:
    try:
        return check_topic_level(value, "id")
    except ProtocolError as e:
        raise ValueError(str(e)) from None


def _unit_id_level(value: str) -> str:
    try:
        return check_topic_level(value, "unit id", RESERVED_UNIT_IDS)
    except ProtocolError as e:
        raise ValueError(str(e)) from None


TopicLevel = Annotated[str, AfterValidator(_topic_level)]
"""A config value that must be one MQTT topic level (site, subscription group)."""

UnitIdLevel = Annotated[str, AfterValidator(_unit_id_level)]
"""A unit id in a config: one MQTT topic level and none of RESERVED_UNIT_IDS."""
