"""HQ side: the register, full and delta bundles computed from it, canonical bytes, manifests."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from matching.matcher import Matcher, TemplateIndex
from testing.synthetic import ENGINE_LIKE, make_persons, person_centers, samples_of, unit_rows
from watchlist.format.bundle import Bundle, BundleFormatError, Person, Template, encode_bundle, frame, parse_verified
from watchlist.format.errors import RegisterError
from watchlist.format.keys import generate_key, make_keyset, parse_keyset
from watchlist.hq.build import plan_bundle, release
from watchlist.hq.enrol import read_manifest, scan_folder
from watchlist.hq.register import Register
from watchlist.unit.apply import Watchlist
from watchlist.unit.config import WatchlistConfig

MODEL = "synthetic:v1"


@pytest.fixture
def keys():
    root, signing = generate_key(), generate_key()
    return root, signing, parse_keyset(make_keyset(root, 1, [signing.public_key()]), root.public_key())


def _fill(reg: Register, n: int, seed: int = 0) -> np.ndarray:
    centers = person_centers(n, seed=seed)
    reg.add_persons(
        make_persons([f"case-{i:04d}" for i in range(n)], 2), samples_of(centers, 2, seed=seed + 1), model_id=MODEL
    )
    return centers


def test_full_and_delta_from_the_register_reach_the_unit(tmp_path: Path, keys) -> None:
    root, signing, keyset = keys
    reg = Register(tmp_path / "hq.db")
    centers = _fill(reg, 30)
    b1, d1, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5)
    assert (b1.kind, b1.version, len(b1.persons), b1.n_templates) == ("full", 1, 30, 60)
    r1 = release(reg, b1, d1, signing, keyset, tmp_path / "v1.cpwl")
    assert (tmp_path / "v1.cpwl").read_bytes() == r1.data
    reg.mark_published(r1.sha256, "test")

    # Changes at HQ: one found, one re-photographed, one new threshold, one new person.
    reg.remove_persons(["case-0004"])
    reg.add_template("case-0005", unit_rows(centers[5:6])[0], model_id=MODEL, photo_sha256="ab" * 32, age=12)
    reg.upsert_person("case-0006", threshold=0.8)
    reg.upsert_person("case-9999", priority=3)
    reg.add_template(
        "case-9999",
        unit_rows(person_centers(1, seed=42))[0],
        model_id=MODEL,
        photo_sha256="cd" * 32,
        photo_date="2021-03-04",
    )
    b2, d2, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5, kind="delta")
    assert b2.base_version == 1 and b2.version == 2 and b2.removed == ("case-0004",)
    assert sorted(p.person_id for p in b2.persons) == ["case-0005", "case-0006", "case-9999"]
    assert next(p for p in b2.persons if p.person_id == "case-0005").templates[-1] == Template(age=12)
    r2 = release(reg, b2, d2, signing, keyset)
    reg.mark_published(r2.sha256, "test")

    cfg = WatchlistConfig(root_key=tmp_path / "root.pub", store=tmp_path / "unit.db")
    (tmp_path / "root.pub").write_bytes(
        root.public_key().public_bytes_raw().hex().encode()
    )  # the raw-hex form of a pinned key
    wl = Watchlist(cfg, Matcher(), MODEL)
    wl.start()
    wl.offer(r1.data, "hq")
    wl.offer(r2.data, "hq")
    assert wl.version == 2
    idx = wl.matcher.index
    assert "case-0004" not in idx and "case-9999" in idx
    assert idx.templates_of("case-0005").shape == (3, 128)
    assert idx.threshold_for("case-0006") == pytest.approx(0.8)
    # The unit now holds exactly what a full bundle of version 2 would give it.
    b3, _, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5)
    full = Matcher(TemplateIndex.build(b3.template_person_ids(), b3.embeddings, offset=b3.embedding_offset))
    q = unit_rows(np.concatenate([centers, person_centers(1, seed=42)]))
    got, want = wl.matcher.search(q, k=3), full.search(q, k=3)
    assert [[p for p, _ in r] for r in got] == [[p for p, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=1e-5)
    wl.close()

    # An unchanged register still yields a (empty) delta: a signed, fresh expiry for the units.
    b4, _, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5, kind="delta")
    assert b4.persons == () and b4.removed == () and b4.base_version == 2
    assert [r["version"] for r in reg.releases()] == [1, 2]


def test_release_refuses_bad_bases_and_keys(tmp_path: Path, keys) -> None:
    root, signing, keyset = keys
    reg = Register(tmp_path / "hq.db")
    _fill(reg, 3)
    with pytest.raises(RegisterError, match="no release was published yet"):
        plan_bundle(reg, model_id=MODEL, default_threshold=0.5, kind="delta")
    b, d, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5)
    with pytest.raises(RegisterError, match="not in key set"):
        release(reg, b, d, generate_key(), keyset)
    release(reg, b, d, signing, keyset)
    with pytest.raises(RegisterError, match="already released"):
        release(reg, b, d, signing, keyset)
    with pytest.raises(RegisterError, match="never released"):
        plan_bundle(reg, model_id=MODEL, default_threshold=0.5, kind="delta", base_version=7)
    with pytest.raises(RegisterError, match="unit length"):
        reg.add_template("case-0000", np.ones(128), model_id=MODEL, photo_sha256="00" * 32)


def test_encoding_is_canonical_and_round_trips(keys) -> None:
    root, signing, keyset = keys
    emb = samples_of(person_centers(2), 2)
    persons = (
        Person("b-2", (Template(age=3), Template("2020-02-29"))),
        Person("a-1", (Template(age=5),) * 2, name="Ünïcode", priority=2, threshold=0.61),
    )
    offset = emb.mean(axis=0)
    b = Bundle(
        kind="full",
        version=3,
        created_at=1000,
        expires_at=2000,
        model_id=MODEL,
        embedding_dim=128,
        default_threshold=0.5,
        persons=persons,
        embeddings=emb - offset,
        embedding_offset=offset,
    )
    one, two = encode_bundle(b, signing, keyset.envelope), encode_bundle(b, signing, keyset.envelope)
    assert one == two  # Ed25519 is deterministic and the header canonical
    f = frame(one)
    header = bytes(f.header)
    assert header.isascii() and b" " not in header.replace(b"\\u00dcn", b"")
    assert header.startswith(b'{"base_version":null,"created_at":1000,"default_threshold":0.5,')
    back = parse_verified(f)
    assert back.persons == persons and np.array_equal(back.embeddings, (emb - offset).astype(np.float16))
    assert np.array_equal(back.embedding_offset, offset)  # float32 values survive the JSON exactly


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(version=0), "version"),
        (dict(kind="delta"), "base_version"),
        (dict(removed=("x",)), "no base_version"),
        (dict(persons=(Person("a", ()),)), "no templates"),
        (dict(persons=(Person(" a", (Template(),)),)), "edge spaces"),
        (dict(persons=(Person("a" * 65, (Template(),)),)), "longer than 64"),
        (dict(persons=(Person("a", (Template("2021-02-30"),)),)), "not a date"),
        (dict(persons=(Person("a", (Template(age=200),)),)), "age"),
        (dict(persons=(Person("a", (Template(),), priority=10),)), "priority"),
        (dict(expires_at=10), "expires_at"),
    ],
)
def test_bundle_rules(bad: dict, match: str) -> None:
    base = dict(
        kind="full",
        version=1,
        created_at=100,
        expires_at=200,
        model_id=MODEL,
        embedding_dim=128,
        default_threshold=0.5,
        persons=(Person("a", (Template(),)),),
        embeddings=np.zeros((1, 128)),
    )
    args = base | bad
    if "persons" in bad:
        args["embeddings"] = np.zeros((sum(len(p.templates) for p in bad["persons"]), 128))
    with pytest.raises(BundleFormatError, match=match):
        Bundle(**args)


def test_manifest_rows_are_checked_before_any_photo_is_opened(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        "person_id,photo,photo_date,age,name,priority\n"
        "case-1,a.jpg,2019-06-01,,Ann,2\n"
        "case-1,b.jpg,,9,,\n"
        ",a.jpg,2019-06-01,,,\n"
        "case-2,a.jpg,,,,\n"
        "case-3,a.jpg,2019-13-01,,,\n"
        "case-4,a.jpg,,7,,12\n"
    )
    entries, errors = read_manifest(manifest)
    assert [(e.person_id, e.photo.name, e.photo_date, e.age) for e in entries] == [
        ("case-1", "a.jpg", "2019-06-01", None),
        ("case-1", "b.jpg", None, 9),
    ]
    assert entries[0].name == "Ann" and entries[0].priority == 2
    reasons = {e["where"]: e["reason"] for e in errors}
    assert "person id" in reasons["cases.csv:4"]
    assert "photo_date" in reasons["cases.csv:5"] and "age" in reasons["cases.csv:5"]
    assert "not a date" in reasons["cases.csv:6"]
    assert "priority" in reasons["cases.csv:7"]

    folder = tmp_path / "photos"
    (folder / "case-7").mkdir(parents=True)
    for name in ("2016-05-01_front.jpg", "age9.png", "holiday.jpg", "notes.txt"):
        (folder / "case-7" / name).write_bytes(b"x")
    entries, errors = scan_folder(folder)
    assert [(e.photo.name, e.photo_date, e.age) for e in entries] == [
        ("2016-05-01_front.jpg", "2016-05-01", None),
        ("age9.png", None, 9),
    ]
    assert len(errors) == 1 and "holiday.jpg" in errors[0]["where"]


def test_offset_keeps_crowded_embeddings_precise_and_stays_fixed(tmp_path: Path, keys) -> None:
    # Engine-like embeddings share one large direction; float16 around HQ's mean keeps scores closer.
    root, signing, keyset = keys
    reg = Register(tmp_path / "hq.db")
    centers = person_centers(200, seed=3, shared=ENGINE_LIKE["shared"])
    emb = samples_of(centers, 2, seed=4, spread=ENGINE_LIKE["spread"])
    reg.add_persons(make_persons([f"case-{i:04d}" for i in range(200)], 2), emb, model_id=MODEL)
    b1, d1, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.99)
    reg.mark_published(release(reg, b1, d1, signing, keyset).sha256, "test")
    decoded = b1.embedding_offset + b1.embeddings.astype(np.float32)
    plain = emb.astype(np.float16).astype(np.float32)  # what float16 without the offset would give
    probes = samples_of(centers[:20], 1, seed=5, spread=ENGINE_LIKE["spread"])
    err, err_plain = np.abs(probes @ decoded.T - probes @ emb.T), np.abs(probes @ plain.T - probes @ emb.T)
    assert err.max() < 3e-5 and np.median(err) < 5e-6 < 1e-5 < np.median(err_plain)
    reg.add_persons(make_persons(["case-new"], 1), samples_of(centers[:1], 1, seed=9, spread=0.5), model_id=MODEL)
    b2, _, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.99, kind="delta")
    assert np.array_equal(b2.embedding_offset, b1.embedding_offset)
    index = TemplateIndex.build(b1.template_person_ids(), b1.embeddings, offset=b1.embedding_offset)
    assert np.abs(probes @ index.dequantize(np.arange(400)).T - probes @ emb.T).max() < 4e-5


def test_names_stay_at_hq_unless_asked(tmp_path: Path) -> None:
    reg = Register(tmp_path / "hq.db")
    reg.upsert_person("case-1", name="Ann B.")
    reg.add_template("case-1", unit_rows(person_centers(1))[0], model_id=MODEL, photo_sha256="11" * 32, age=4)
    plain, _, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5, now=time.time())
    named, _, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5, with_names=True)
    assert plain.persons[0].name is None and named.persons[0].name == "Ann B."
