"""One id rule: what HQ enrols, a bundle lists and a unit's config names can always travel in a hit
(issue 20: a C1 control character or U+2028 in a person id passed enrolment and the bundle, then
every hit for that person failed on the unit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testing.hits import make_hit
from watchlist.format.bundle import BundleFormatError, check_person_id
from watchlist.hq.enrol import read_manifest
from wire.errors import ProtocolError
from wire.records import MAX_ID_CHARS, id_problem
from wire.topics import check_topic_level

REFUSED = ["case-2024\x9f0173", "case\x9b2", "case\u20280173", "case\u2029x", "case\x7f", "tab\there", ""]


@pytest.mark.parametrize("value", REFUSED)
def test_an_id_the_wire_refuses_is_refused_by_enrolment_bundles_and_configs(value: str) -> None:
    assert id_problem(value) is not None
    with pytest.raises(BundleFormatError):
        check_person_id(value)
    with pytest.raises(ProtocolError):
        check_topic_level(value, "unit id")


def test_every_id_the_bundle_takes_travels_in_a_hit() -> None:
    for pid in ["case-2024-0173", "Fall 17/2024 (Köln)", "案件-7", "x" * 64]:
        assert check_person_id(pid) == pid
        assert make_hit(person_id=pid).person_id == pid
    assert id_problem("x" * MAX_ID_CHARS) is None and id_problem("x" * (MAX_ID_CHARS + 1)) is not None


def test_a_manifest_row_is_split_at_csv_line_ends_only(tmp_path: Path) -> None:
    manifest = tmp_path / "cases.csv"
    manifest.write_text("person_id,photo,age\ncase-2024\u20280173,a.png,7\ncase-B,b.png,7\n", encoding="utf-8")
    entries, refused = read_manifest(manifest)
    # Two rows, not three: the separator inside the first id neither splits it nor makes "0173" a person.
    assert [e.person_id for e in entries] == ["case-B"]
    assert [r["where"] for r in refused] == ["cases.csv:2"] and "line separators" in refused[0]["reason"]


def test_a_unit_config_names_the_key_of_an_id_the_wire_refuses(tmp_path: Path) -> None:
    from edge.config import ConfigError, load_config

    conf = tmp_path / "unit.toml"
    conf.write_text('[unit]\nid = "gate\u20282"\nsite = "s"\n')
    with pytest.raises(ConfigError, match=r"unit\.id"):
        load_config(conf)


def test_a_unit_may_not_be_called_by_a_word_its_topic_level_reserves(tmp_path: Path) -> None:
    """Issue 20, item 7: unit id 'watchlist' was accepted; checkpoint/v1/<site>/watchlist/ is the site's
    watchlist, and the site's reader account is '<site>/watchlist'."""
    from edge.config import ConfigError, load_config
    from wire.topics import RESERVED_UNIT_IDS, topic

    with pytest.raises(ProtocolError, match="'watchlist' is reserved"):
        check_topic_level("watchlist", "unit id", RESERVED_UNIT_IDS)
    with pytest.raises(ProtocolError, match="reserved"):
        topic("site-1", "watchlist", "hits")
    assert topic("watchlist", "gate-1", "hits") == "checkpoint/v1/watchlist/gate-1/hits"  # a site may be
    conf = tmp_path / "unit.toml"
    conf.write_text('[unit]\nid = "watchlist"\nsite = "s"\n')
    with pytest.raises(ConfigError, match=r"unit\.toml: unit\.id: unit id 'watchlist' is reserved"):
        load_config(conf)
