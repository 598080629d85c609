"""Bundles signed by HQ's own key that are still wrong: the unit refuses each with a reason (defence in depth).

A mistaken or stolen signing key must not crash the unit, make it allocate without bound, or blind
it (a threshold that matches everyone, templates that match nobody). These tests sign hostile
headers with the test Authority's key, so they reach the checks behind the signature. Each refusal
must name what the test changed, so that no test passes on a bundle refused earlier for another
reason; where the unit's message names no field, the control (the same header unchanged and
signed the same way is applied) shows that the change is what the unit refused.
"""

from __future__ import annotations

import copy
import os
import random
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from matching.matcher import Matcher
from testing.synthetic import Authority, make_persons, person_centers, samples_of
from watchlist.format import canonical
from watchlist.format.bundle import BUNDLE_DOMAIN, BUNDLE_MAGIC, frame, parse_verified
from watchlist.format.errors import BundleRejected
from watchlist.format.keys import KEYSET_DOMAIN, KEYSET_MAGIC, key_id, make_keyset, signed_message
from watchlist.format.verify import UnitTrust, read_bundle_file, verify_bundle
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig

MODEL = "synthetic:v1"
MAX_BYTES = 256 * 1024


@pytest.fixture
def hq() -> Authority:
    return Authority(model_id=MODEL, threshold=0.5)


@pytest.fixture
def unit(tmp_path: Path, hq: Authority):
    """A unit whose engine makes 128-d embeddings, holding full version 5 of a 10-person list."""
    cfg = WatchlistConfig(
        root_key=hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db", max_bundle_bytes=MAX_BYTES
    )
    wl = Watchlist(cfg, Matcher(), MODEL, embedding_dim=128)
    wl.start()
    wl.offer(hq.bundle(5, *_list(10)), source="setup")
    yield wl
    wl.close()


def _list(n: int, dim: int = 128, seed: int = 0):
    persons = make_persons([f"case-{i}" for i in range(n)], 2)
    return persons, samples_of(person_centers(n, dim=dim, seed=seed), 2, seed=seed + 1)


def _parts(data: bytes) -> tuple[dict, bytes]:
    f = frame(data)
    return canonical.loads(bytes(f.header)), bytes(f.blob)


def sign_raw(hq: Authority, header: dict | bytes, blob: bytes) -> bytes:
    """A bundle whose header and blob are exactly these, signed by `hq` (no format rule applied)."""
    head = header if isinstance(header, bytes) else canonical.dumps(header)
    body = b"".join(
        [
            BUNDLE_MAGIC,
            struct.pack("<I", len(hq.keyset)),
            hq.keyset,
            struct.pack("<I", len(head)),
            head,
            struct.pack("<Q", len(blob)),
            blob,
            bytes.fromhex(key_id(hq.signing.public_key())),
        ]
    )
    return body + hq.signing.sign(signed_message(BUNDLE_DOMAIN, body))


def _refused(wl: Watchlist, data: bytes, reason: str, names: str) -> BundleRejected:
    """Offer `data`: refused for `reason` with a message that `names` what the test changed, and the
    unit keeps version 5."""
    before = wl.matcher.index
    with pytest.raises(BundleRejected) as info:
        wl.offer(data, source="test")
    assert info.value.reason == reason, f"{info.value.reason}: {info.value.message}"
    assert names in info.value.message, f"the refusal does not name {names!r}: {info.value.message}"
    assert wl.version == 5 and wl.matcher.index is before
    assert wl.store.events(1)[0]["reason"] == reason
    return info.value


# Values a hostile signer could put anywhere: each JSON type, at and beyond the format's limits.
_HOSTILE = (None, True, 0, -1, 2**53, 2**64, 10**400, 1e308, 0.5, "", "x" * 5000, [], [None], {}, {"id": None})


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [p for k, v in items for p in [(*prefix, k), *_paths(v, (*prefix, k))]]


def _mutate_json(rng: random.Random, doc: dict) -> tuple[str, dict]:
    """A copy of the decoded JSON `doc` with one value anywhere in it replaced by a hostile one,
    removed, or joined by an unknown key; and the top-level key the change is under."""
    doc = copy.deepcopy(doc)
    path = rng.choice(_paths(doc))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    roll = rng.random()
    if roll < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif roll < 0.25 and isinstance(parent, dict):
        parent["unexpected"] = rng.choice(_HOSTILE)
    else:
        parent[path[-1]] = rng.choice(_HOSTILE)
    return path[0], doc


def test_an_unchanged_header_signed_here_is_applied(unit: Watchlist, hq: Authority) -> None:
    # The control for every test below: sign_raw itself makes bundles the unit applies, so what
    # the unit refuses there is the one change each test makes.
    assert unit.offer(sign_raw(hq, *_parts(hq.bundle(6, *_list(3)))), source="test") == 6


def test_rows_of_another_dimension_than_the_engine(unit: Watchlist, hq: Authority) -> None:
    err = _refused(unit, hq.bundle(6, *_list(3, dim=64)), "wrong_dimension", "64-d")
    assert "128-d" in err.message


def test_rows_of_another_dimension_than_the_applied_list_without_an_engine(tmp_path: Path, hq: Authority) -> None:
    # `edge watchlist apply` has no engine loaded: the applied list of the same model still fixes the size.
    cfg = WatchlistConfig(root_key=hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db")
    wl = Watchlist(cfg, Matcher(), MODEL)
    wl.start()
    wl.offer(hq.bundle(1, *_list(3)), source="setup")
    with pytest.raises(BundleRejected) as info:
        wl.offer(hq.bundle(2, *_list(3, dim=64)), source="test")
    assert info.value.reason == "wrong_dimension" and wl.version == 1
    assert "64-d" in info.value.message, info.value.message
    wl.close()


@pytest.mark.parametrize("length", [500.0, 0.5, 0.0])
def test_template_that_is_not_unit_length(unit: Watchlist, hq: Authority, length: float) -> None:
    persons, emb = _list(3)
    emb = emb.copy()
    emb[4] *= length
    _refused(unit, hq.bundle(6, persons, emb), "bad_embedding", "template 4 ")


def test_template_with_nan(unit: Watchlist, hq: Authority) -> None:
    header, blob = _parts(hq.bundle(6, *_list(3)))
    rows = np.frombuffer(blob, "<f2").copy()
    rows[7] = np.nan
    _refused(unit, sign_raw(hq, header, rows.tobytes()), "bad_embedding", "NaN")


@pytest.mark.parametrize("where", ["default", "person"])
@pytest.mark.parametrize("value", [-0.99, 0.0, 0.9999999])
def test_threshold_outside_the_calibrated_range(unit: Watchlist, hq: Authority, where: str, value: float) -> None:
    header, blob = _parts(hq.bundle(6, *_list(3)))
    if where == "default":
        header["default_threshold"] = value
    else:
        header["persons"][1]["threshold"] = value
    if value == 0.9999999:
        unit.threshold_range = (0.2, 0.95)  # a model's calibrated range is narrower than (0, 1)
    _refused(unit, sign_raw(hq, header, blob), "bad_threshold", "default_threshold" if where == "default" else "case-1")


def test_threshold_inside_a_model_range_is_accepted(unit: Watchlist, hq: Authority) -> None:
    unit.threshold_range = (0.2, 0.95)
    assert unit.offer(hq.bundle(6, *_list(3))) == 6


@pytest.mark.parametrize(
    "key, value",
    [
        ("version", 2**63),
        ("version", 2**53),
        ("embedding_dim", 2**24),
        ("templates", 10**12),
        ("expires_at", 10**30),
        ("created_at", -1),
    ],
)
def test_numbers_beyond_the_format(unit: Watchlist, hq: Authority, key: str, value: int) -> None:
    header, blob = _parts(hq.bundle(6, *_list(3)))
    header[key] = value
    _refused(unit, sign_raw(hq, header, blob), "out_of_range", f"{key} {value}")


def test_empty_list_of_a_huge_dimension_allocates_nothing(unit: Watchlist, hq: Authority) -> None:
    # Zero templates of 2**24 dimensions: no bytes to check, but the store would size an index by it.
    header, _ = _parts(hq.bundle(6, *_list(3)))
    header.update(embedding_dim=2**24, templates=0, persons=[])
    _refused(unit, sign_raw(hq, header, b""), "out_of_range", f"embedding_dim {2**24}")


def test_key_set_serial_beyond_the_format(unit: Watchlist, hq: Authority) -> None:
    hq.keyset = make_keyset(hq.root, 2**63, [hq.signing.public_key()], set())
    _refused(unit, hq.bundle(6, *_list(3)), "out_of_range", f"key set serial {2**63}")


@pytest.mark.parametrize(
    "mutate, names",
    [
        # The refusal names no field here (OverflowError's own text), but it is the only change.
        (lambda h: h.update(default_threshold=10**400), "int too large to convert to float"),
        (lambda h: h.update(embedding_offset=[1e300] * 128), "embedding_offset"),
        (lambda h: h.update(embedding_offset=[0.0] * 64), "embedding_offset"),
        (lambda h: h.update(persons={"a": 1}), "persons"),
        (lambda h: h["persons"][0].update(templates=[{"photo_date": [], "age": {}}] * 2), "photo_date"),
        (lambda h: h["persons"][0].update(threshold="high"), "'high'"),
        (lambda h: h["persons"][0].update(id="x" * 5000), "person id 'xxx"),
        (lambda h: h.pop("removed"), "'removed'"),
        (lambda h: h.update(kind=None), "kind"),
    ],
)
def test_malformed_signed_headers(unit: Watchlist, hq: Authority, mutate, names: str) -> None:
    header, blob = _parts(hq.bundle(6, *_list(3)))
    mutate(header)
    _refused(unit, sign_raw(hq, header, blob), "malformed", names)


def test_deeply_nested_header(unit: Watchlist, hq: Authority) -> None:
    _refused(unit, sign_raw(hq, b"[" * 100_000 + b"]" * 100_000, b""), "malformed", "recursion")


def _trust(hq: Authority) -> UnitTrust:
    return UnitTrust(hq.root.public_key(), MODEL, 1 << 30, expected_dim=128, applied_version=5)


def test_fuzzed_bundles_only_ever_raise_bundle_rejected(hq: Authority) -> None:
    """Truncations and bit flips of a real bundle, unsigned and re-signed: BundleRejected or a valid bundle."""
    rng = random.Random(11)
    good = hq.bundle(6, *_list(4))
    header_bytes = bytes(frame(good).header)
    _, blob = _parts(good)
    trust = _trust(hq)
    outcomes: dict[str, int] = {}
    for i in range(1500):
        if i % 3 == 0:  # raw damage: the signature check or framing refuses it
            data = bytearray(good)
            if rng.random() < 0.5:
                data = data[: rng.randrange(len(data))]
            else:
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            candidate = bytes(data)
        else:  # damage behind the signature: the parser itself is fuzzed
            head = bytearray(header_bytes)
            body = bytearray(blob)
            if i % 3 == 1:
                head = head[: rng.randrange(len(head))] if rng.random() < 0.3 else head
                for _ in range(rng.randint(1, 3)):
                    head[rng.randrange(len(head))] ^= 1 << rng.randrange(8)
            else:
                for _ in range(rng.randint(1, 3)):
                    body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
                if rng.random() < 0.2:
                    body = body[: rng.randrange(len(body))]
            candidate = sign_raw(hq, bytes(head), bytes(body))
        try:
            verify_bundle(candidate, trust, now=0)
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
        except BundleRejected as exc:
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
    # The fuzzing reached the parser and the checks behind it, not just the signature.
    assert {"bad_signature", "malformed", "bad_embedding"} <= set(outcomes), outcomes


def test_fuzzed_key_sets_signed_by_the_root_only_ever_raise_bundle_rejected(hq: Authority) -> None:
    """Key sets the root signed, damaged as bytes (the decoder) or changed in one field (the checks
    behind it): BundleRejected or a valid bundle, and every check behind the decoder is reached."""
    payload = hq.keyset[12:-64]  # between the magic and length, and the root's signature
    doc = canonical.loads(payload)
    persons, emb = _list(2)
    rng = random.Random(9)
    trust = _trust(hq)
    changed: list[str] = []  # the refusals of changed fields
    for i in range(1000):
        if i % 2:
            mutated = bytearray(payload[: rng.randrange(1, len(payload) + 1)])
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        else:
            mutated = bytearray(canonical.dumps(_mutate_json(rng, doc)[1]))
        head = KEYSET_MAGIC + struct.pack("<I", len(mutated)) + bytes(mutated)
        hq.keyset = head + hq.root.sign(signed_message(KEYSET_DOMAIN, head))
        try:
            verify_bundle(hq.bundle(6, persons, emb), trust, now=0)
        except BundleRejected as exc:
            if not i % 2:
                changed.append(exc.message)
    assert not [m for m in changed if "not valid JSON" in m], "a changed field must decode"
    checks = (
        "not a format-1 key set",
        "names root",
        "serial and issued_at must be integers",
        "beyond the format's limits",
        "revoked must be a list",
    )
    assert [c for c in checks if not any(c in m for m in changed)] == [], "checks no change reached"


def test_parse_verified_never_raises_anything_but_bundle_rejected(hq: Authority) -> None:
    """Headers damaged as bytes (the decoder) or changed in one field (the checks behind it): only
    BundleRejected, and the changes reach the check of every field, which names it."""
    framed = frame(hq.bundle(6, *_list(2)))
    rng = random.Random(5)
    head = bytes(framed.header)
    header = canonical.loads(head)
    named = dict.fromkeys(header, False)  # field: a change to it was refused naming it
    for i in range(2000):
        if i % 2:
            cut = bytearray(head[: rng.randrange(1, len(head) + 1)])
            cut[rng.randrange(len(cut))] = rng.randrange(256)
            field, data = None, bytes(cut)
        else:
            field, changed = _mutate_json(rng, header)
            data = canonical.dumps(changed)
        try:
            parse_verified(frame(sign_raw(hq, data, bytes(framed.blob))))
        except BundleRejected as exc:
            if field is not None:
                assert "not valid JSON" not in exc.message, "a changed field must decode"
                named[field] = named[field] or field in exc.message
    assert [field for field, seen in named.items() if not seen] == [], "fields no refusal named"


# ---- files that never end ---------------------------------------------------------------------


def _offer_file_in_thread(wl: Watchlist, path: Path) -> dict:
    out: dict = {}

    def run() -> None:
        try:
            wl.offer_file(path)
        except BundleRejected as exc:
            out["reason"] = exc.reason
        except Exception as exc:  # reported by the assertion below, not lost in the thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    out["finished"] = not t.is_alive()
    return out


def test_apply_of_a_symlink_to_dev_zero_reads_a_bounded_amount(unit: Watchlist, tmp_path: Path) -> None:
    link = tmp_path / "list.cpwl"
    link.symlink_to("/dev/zero")
    out = _offer_file_in_thread(unit, link)
    assert out == {"finished": True, "reason": "oversized"}
    assert unit.version == 5


def test_apply_of_an_endless_fifo_reads_a_bounded_amount(unit: Watchlist, tmp_path: Path) -> None:
    fifo = tmp_path / "list.cpwl"
    os.mkfifo(fifo)
    stop = threading.Event()

    def writer() -> None:
        with open(fifo, "wb") as f:
            chunk = b"\x00" * 65536
            try:
                while not stop.is_set():
                    f.write(chunk)
            except BrokenPipeError:
                pass

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    out = _offer_file_in_thread(unit, fifo)
    stop.set()
    assert out == {"finished": True, "reason": "oversized"}
    assert unit.version == 5


def test_a_fifo_carrying_a_valid_bundle_is_applied(unit: Watchlist, hq: Authority, tmp_path: Path) -> None:
    fifo = tmp_path / "list.cpwl"
    os.mkfifo(fifo)
    data = hq.bundle(6, *_list(3))
    threading.Thread(target=lambda: fifo.write_bytes(data), daemon=True).start()
    assert read_bundle_file(fifo, MAX_BYTES) == data


def test_a_key_set_file_that_never_ends_is_read_no_further_than_the_limit(tmp_path: Path) -> None:
    from watchlist.format.errors import KeyFileError
    from watchlist.format.keys import read_keyset_file

    link = tmp_path / "keyset.bin"
    link.symlink_to("/dev/zero")
    with pytest.raises(KeyFileError, match="too large for a key set"):
        read_keyset_file(link)
