"""Every way a bundle is refused on the unit: the reason is reported and the current list stays."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from matching.matcher import Matcher
from testing.synthetic import Authority, make_persons, person_centers, samples_of, unit_rows
from watchlist.format import canonical
from watchlist.format.bundle import BUNDLE_DOMAIN, BUNDLE_MAGIC, frame
from watchlist.format.errors import REASONS, BundleRejected
from watchlist.format.keys import generate_key, key_id, make_keyset, signed_message
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig

MODEL = "synthetic:v1"


@pytest.fixture
def hq() -> Authority:
    return Authority(model_id=MODEL, threshold=0.5)


def _persons(n: int, seed: int = 0, prefix: str = "case") -> tuple[tuple, np.ndarray, np.ndarray]:
    centers = person_centers(n, seed=seed)
    return make_persons([f"{prefix}-{i}" for i in range(n)], 2), samples_of(centers, 2, seed=seed + 1), centers


@pytest.fixture
def unit(tmp_path: Path, hq: Authority):
    """A unit holding full version 5 of a 20-person list."""
    cfg = WatchlistConfig(
        root_key=hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db", max_bundle_bytes=256 * 1024
    )
    wl = Watchlist(cfg, Matcher(), MODEL)
    wl.start()
    persons, emb, centers = _persons(20)
    wl.offer(hq.bundle(5, persons, emb), source="setup")
    wl.centers = centers
    yield wl
    wl.close()


def _assert_refused(wl: Watchlist, data: bytes, reason: str) -> BundleRejected:
    before_index = wl.matcher.index
    probe = unit_rows(wl.centers[:1])
    before_match = wl.matcher.match(probe)
    with pytest.raises(BundleRejected) as info:
        wl.offer(data, source="test")
    assert info.value.reason == reason, info.value.message
    st = wl.status()
    assert st["version"] == 5 and st["last_rejection"]["reason"] == reason
    assert wl.matcher.index is before_index and wl.matcher.match(probe) == before_match
    assert wl.store.events(1)[0]["kind"] == "rejected" and wl.store.events(1)[0]["reason"] == reason
    return info.value


def _delta(hq: Authority, version: int, base: int, **kw) -> bytes:
    persons, emb, _ = _persons(2, seed=50, prefix="new")
    return hq.bundle(version, persons, emb, kind="delta", base=base, **kw)


def test_tampered_embedding_bytes(unit: Watchlist, hq: Authority) -> None:
    data = bytearray(_delta(hq, 6, 5))
    data[-200] ^= 0x01  # inside the embedding blob
    _assert_refused(unit, bytes(data), "bad_signature")


def test_tampered_header_bytes(unit: Watchlist, hq: Authority) -> None:
    data = _delta(hq, 6, 5)
    data = data.replace(b'"version":6', b'"version":7')
    _assert_refused(unit, data, "bad_signature")


def test_tampered_key_set(unit: Watchlist, hq: Authority) -> None:
    data = bytearray(_delta(hq, 6, 5))
    data[40] ^= 0x20  # inside the embedded key set's JSON
    _assert_refused(unit, bytes(data), "bad_keyset_signature")


def test_signed_by_a_key_the_key_set_does_not_list(unit: Watchlist, hq: Authority) -> None:
    _assert_refused(unit, _delta(hq, 6, 5, signing=generate_key()), "unknown_key")


def test_key_set_from_another_root(unit: Watchlist, hq: Authority) -> None:
    rogue = Authority(model_id=MODEL)  # its own root, key set and signing key
    persons, emb, _ = _persons(2, seed=50)
    _assert_refused(unit, rogue.bundle(6, persons, emb, kind="delta", base=5), "bad_keyset_signature")


def test_revoked_key_even_with_an_old_key_set(unit: Watchlist, hq: Authority) -> None:
    old_keyset = hq.keyset
    old_key = hq.rotate(revoke_old=True)
    unit.offer(_delta(hq, 6, 5), source="rotation")  # the unit now holds key set 2, revoking the old key
    assert unit.status()["keyset_serial"] == 2
    err = _assert_refused_at(unit, _delta(hq, 7, 6, signing=old_key, keyset=old_keyset), "revoked_key", 6)
    assert key_id(old_key.public_key()) in err.message


def _assert_refused_at(wl: Watchlist, data: bytes, reason: str, version: int) -> BundleRejected:
    with pytest.raises(BundleRejected) as info:
        wl.offer(data, source="test")
    assert info.value.reason == reason, info.value.message
    assert wl.version == version and wl.status()["last_rejection"]["reason"] == reason
    return info.value


def test_revocation_sent_on_its_own(unit: Watchlist, hq: Authority) -> None:
    old_key = hq.signing
    revoking = make_keyset(hq.root, 2, [generate_key().public_key()], [key_id(old_key.public_key())])
    unit.offer(revoking, source="keyset")
    assert unit.status()["keyset_serial"] == 2
    _assert_refused(unit, _delta(hq, 6, 5), "revoked_key")  # still carries key set 1
    with pytest.raises(BundleRejected) as info:
        unit.offer_keyset(hq.keyset, source="replay")  # key set 1 again
    assert info.value.reason == "keyset_rollback"


def test_rollback(unit: Watchlist, hq: Authority) -> None:
    persons, emb, _ = _persons(20)
    _assert_refused(unit, hq.bundle(4, persons, emb), "rollback")
    _assert_refused(unit, hq.bundle(5, persons, emb), "rollback")  # a replay of the applied version


def test_wrong_base(unit: Watchlist, hq: Authority) -> None:
    _assert_refused(unit, _delta(hq, 7, 6), "wrong_base")
    _assert_refused(unit, _delta(hq, 7, 4), "wrong_base")


def test_delta_around_another_offset(unit: Watchlist, hq: Authority) -> None:
    persons, emb, _ = _persons(2, seed=50, prefix="new")
    offset = np.full(128, 0.01, np.float32)
    _assert_refused(unit, hq.bundle(6, persons, emb, kind="delta", base=5, offset=offset), "wrong_base")


def test_expired(unit: Watchlist, hq: Authority) -> None:
    _assert_refused(unit, _delta(hq, 6, 5, created_at=int(time.time()) - 7200, valid_for_s=3600), "expired")


def test_wrong_model(unit: Watchlist, hq: Authority) -> None:
    persons, emb, _ = _persons(20)
    _assert_refused(unit, hq.bundle(6, persons, emb, model_id="other-model:v2"), "wrong_model")
    _assert_refused(unit, _delta(hq, 6, 5, model_id="other-model:v2"), "wrong_model")


def test_truncated(unit: Watchlist, hq: Authority) -> None:
    data = _delta(hq, 6, 5)
    for cut in (10, 100, len(data) // 2, len(data) - 1):
        _assert_refused(unit, data[:cut], "truncated")
    _assert_refused(unit, data + b"\x00", "truncated")


def test_oversized_refused_before_parsing(unit: Watchlist, hq: Authority, tmp_path: Path) -> None:
    persons, emb, _ = _persons(600, seed=3)
    big = hq.bundle(6, persons, emb)
    assert len(big) > unit.config.max_bundle_bytes
    _assert_refused(unit, big, "oversized")
    # A file is refused from its size alone: this one is sparse garbage that is never read.
    huge = tmp_path / "huge.cpwl"
    with open(huge, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    with pytest.raises(BundleRejected) as info:
        unit.offer_file(huge)
    assert info.value.reason == "oversized" and unit.version == 5


@pytest.mark.parametrize("junk", [b"", b'{"version": 99}', b"CPWLKEY", os.urandom(3000), b"PK\x03\x04" + bytes(100)])
def test_not_a_bundle(unit: Watchlist, junk: bytes) -> None:
    _assert_refused(unit, junk, "not_a_bundle")


def test_signed_but_malformed_header(unit: Watchlist, hq: Authority) -> None:
    # HQ's own key signing a header that breaks the format (a bug at HQ, not an attack).
    header = canonical.dumps({"format": 1, "kind": "full", "version": 6})
    body = b"".join(
        [
            BUNDLE_MAGIC,
            struct.pack("<I", len(hq.keyset)),
            hq.keyset,
            struct.pack("<I", len(header)),
            header,
            struct.pack("<Q", 0),
            bytes.fromhex(key_id(hq.signing.public_key())),
        ]
    )
    data = body + hq.signing.sign(signed_message(BUNDLE_DOMAIN, body))
    _assert_refused(unit, data, "malformed")


def test_every_reason_has_a_test() -> None:
    covered = {
        "oversized",
        "not_a_bundle",
        "truncated",
        "bad_keyset_signature",
        "keyset_rollback",
        "unknown_key",
        "revoked_key",
        "bad_signature",
        "malformed",
        "wrong_model",
        "rollback",
        "wrong_base",
        "expired",
        # tests/test_watchlist_hostile.py: signed, but refused all the same
        "out_of_range",
        "wrong_dimension",
        "bad_embedding",
        "bad_threshold",
        # tests/test_canary.py: a list without the canary on a unit that runs it
        "no_canary",
    }
    assert covered == set(REASONS)


def test_framing_reads_lengths_only(hq: Authority) -> None:
    persons, emb, _ = _persons(3)
    data = hq.bundle(1, persons, emb)
    f = frame(data)
    assert bytes(f.keyset) == hq.keyset
    assert len(f.blob) == emb.shape[0] * 128 * 2
    assert f.key_id == key_id(hq.signing.public_key())
    assert canonical.loads(bytes(f.header))["version"] == 1
