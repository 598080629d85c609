"""The list's threshold from the model's calibration: HQ chooses it from a false-alert rate per face
(`watchlist build --fpir`), refuses one below the strangers' median, and the unit refuses such a bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edge.cli import main as edge_main
from engines.calibration import Calibration
from testing.synthetic import Authority, make_persons, person_centers, samples_of
from watchlist.cli import main
from watchlist.format.bundle import Person, Template
from watchlist.format.errors import BundleRejected
from watchlist.hq.register import Register

# Synthetic templates filed under the default model's name: its packaged calibration applies.
MODEL = "dlib-resnet-v1:test"
# Synthetic embeddings: no engine here could enrol the canary person for this model.
BUILD = ("build", "--no-canary")
CAL = Calibration.for_thresholds("dlib-resnet-v1")  # what `watchlist build` chooses from


def run(*args: object, code: int = 0, command=main):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def edge_wl(*args: object, code: int = 0):
    """`edge watchlist ...`: the unit's side."""
    return run("watchlist", *args, code=code, command=edge_main)


@pytest.fixture()
def hq(tmp_path: Path) -> dict:
    keys, reg = tmp_path / "keys", tmp_path / "hq.db"
    run("keygen", "--dir", keys)
    # 12 children, 2 photos each (ages 4 and 9): a list of child photos, so the cross-age strangers count.
    Register(reg).add_persons(
        make_persons([f"case-{i}" for i in range(12)], 2), samples_of(person_centers(12), 2), model_id=MODEL
    )
    return {"dir": tmp_path, "reg": reg, "build": (*BUILD, "--register", reg, "--keys", keys)}


def _default_threshold(path: Path) -> float:
    return float(json.loads(run("inspect", path, "--json").output)["default_threshold"])


def test_build_chooses_the_threshold_from_the_false_alert_rate(hq: dict) -> None:
    d = hq["dir"]
    expected = CAL.threshold_for_fpir(0.01, 12, 2, cohort="cross_age")
    out = run(*hq["build"], "--out", d / "v1.cpwl").output  # default --fpir 0.01
    assert f"threshold {expected.threshold:.4f} (chosen for at most 0.01 false alerts per face" in out
    assert f"calibrated: FPIR per face {expected.fpir:.3g} at 12 listed" in out
    assert "cross_age strangers" in out and "faces of people not on the list raises a false alert" in out
    assert _default_threshold(d / "v1.cpwl") == pytest.approx(expected.threshold, abs=1e-6)
    assert expected.threshold > CAL.strangers_median

    # A stricter rate gives a higher threshold; --dry-run shows it and records nothing.
    strict = CAL.threshold_for_fpir(0.001, 12, 2, cohort="cross_age").threshold
    assert strict > expected.threshold
    dry = run(*hq["build"], "--out", d / "v2.cpwl", "--fpir", "0.001", "--dry-run").output
    assert f"threshold {strict:.4f}" in dry and "nothing signed, written or recorded" in dry
    run(*hq["build"], "--out", d / "v2.cpwl", "--fpir", "0.001")

    # The release remembers the threshold and the rate it was chosen for.
    rel = json.loads(run("releases", "--register", hq["reg"], "--json").output)
    assert [r["fpir_target"] for r in rel] == [0.01, 0.001]
    assert rel[1]["threshold"] == pytest.approx(strict, abs=1e-6)
    table = run("releases", "--register", hq["reg"]).output.splitlines()
    assert table[2].split()[-3:-1] == [f"{strict:.4f}", "0.001"]


def test_build_and_inspect_tell_both_expected_rates(hq: dict) -> None:
    """HQ sees the false alerts at the list's size and the listed persons missed at the same threshold,
    the latter from the calibration's misses section (measured on lag-dev), with its source."""
    d = hq["dir"]
    op = CAL.threshold_for_fpir(0.01, 12, 2, cohort="cross_age")
    miss = CAL.expected_miss_rate(op.threshold)
    assert miss is not None and 0 < miss < 1
    line = CAL.expected_summary(op.threshold, 12, 2, "cross_age")
    assert f"of listed persons missed ({CAL.misses.source}" in line and "lag-dev" in line
    assert f"expected: about {100 * op.fpir:.2g}% of strangers' faces alerted at list size 12;" in line
    assert f"about {100 * miss:.2g}% of listed persons missed" in line
    assert line in run(*hq["build"], "--out", d / "v1.cpwl").output
    assert line in run("inspect", d / "v1.cpwl").output
    assert json.loads(run("inspect", d / "v1.cpwl", "--json").output)["expected"] == line

    # A stricter rate: a higher threshold, more listed persons missed.
    strict = CAL.threshold_for_fpir(0.001, 12, 2, cohort="cross_age").threshold
    assert CAL.expected_miss_rate(strict) > miss
    assert (
        CAL.expected_summary(strict, 12, 2, "cross_age")
        in run(*hq["build"], "--out", d / "v2.cpwl", "--fpir", "0.001").output
    )

    # A delta holds only the changes: its list's size, so its rates, are not known from it.
    Register(hq["reg"]).upsert_person("case-3", priority=2)
    run(*hq["build"], "--out", d / "v3.cpwl", "--delta", "--base", "2")
    assert "expected rates: not known from a delta" in run("inspect", d / "v3.cpwl").output


def test_a_calibration_without_misses_says_the_miss_rate_is_not_calibrated(hq: dict) -> None:
    d = hq["dir"]
    bare = Calibration.for_thresholds("dlib-resnet-v1")
    Calibration(bare.model, bare.flip_average, bare.cohorts, bare.description).save(d / "bare.json")
    out = run(*hq["build"], "--out", d / "v1.cpwl", "--calibration", d / "bare.json").output
    assert "of strangers' faces alerted at list size 12; miss rate: not calibrated for this model" in out
    # An uncalibrated model's list: inspect says there is no calibration to tell any rate.
    keys, reg = d / "keys", d / "own.db"
    Register(reg).add_persons(make_persons(["case-1"], 1), samples_of(person_centers(1), 1), model_id="own-model:1")
    run(*BUILD, "--register", reg, "--keys", keys, "--out", d / "own.cpwl", "--threshold", "0.5")
    assert "expected rates: model own-model:1 has no packaged calibration" in run("inspect", d / "own.cpwl").output


def test_an_adult_list_takes_the_worst_cohort(tmp_path: Path) -> None:
    keys, reg = tmp_path / "keys", tmp_path / "hq.db"
    run("keygen", "--dir", keys)
    adults = tuple(Person(f"case-{i}", (Template(age=35),)) for i in range(30))
    Register(reg).add_persons(adults, samples_of(person_centers(30), 1), model_id=MODEL)
    run(*BUILD, "--register", reg, "--keys", keys, "--out", tmp_path / "v1.cpwl")
    worst = CAL.threshold_for_fpir(0.01, 30, 1).threshold
    assert _default_threshold(tmp_path / "v1.cpwl") == pytest.approx(worst, abs=1e-6)


def test_a_threshold_below_the_strangers_median_is_refused(hq: dict) -> None:
    d = hq["dir"]
    r = run(*hq["build"], "--out", d / "v1.cpwl", "--threshold", "0.6", code=2)
    assert "below the strangers' median score" in r.output and "--fpir" in r.output
    assert not (d / "v1.cpwl").exists()
    assert (
        "not both" in run(*hq["build"], "--out", d / "v1.cpwl", "--threshold", "0.99", "--fpir", "0.01", code=2).output
    )

    # Above the median but far too low for the list: built, with a loud warning.
    low = CAL.strangers_median + 0.002
    assert CAL.expected_rates(low, 12, 2, "cross_age").fpir > 0.1
    r = run(*hq["build"], "--out", d / "v1.cpwl", "--threshold", low)
    assert "WARNING:" in r.stderr and "far above the usual 1%" in r.stderr
    assert _default_threshold(d / "v1.cpwl") == pytest.approx(low)
    rel = json.loads(run("releases", "--register", hq["reg"], "--json").output)
    assert rel[0]["fpir_target"] is None and rel[0]["threshold"] == pytest.approx(low)


def test_a_persons_own_threshold_below_the_median_is_named_at_hq(hq: dict) -> None:
    Register(hq["reg"]).upsert_person("case-3", threshold=0.6)  # units would refuse the whole bundle
    r = run(*hq["build"], "--out", hq["dir"] / "v1.cpwl", code=2)
    assert "1 persons have their own threshold" in r.output and "case-3 (0.6)" in r.output
    Register(hq["reg"]).upsert_person("case-3", threshold=0.995)
    run(*hq["build"], "--out", hq["dir"] / "v1.cpwl")


def test_a_model_without_calibration_needs_a_threshold(tmp_path: Path) -> None:
    keys, reg = tmp_path / "keys", tmp_path / "hq.db"
    run("keygen", "--dir", keys)
    Register(reg).add_persons(make_persons(["case-1"], 1), samples_of(person_centers(1), 1), model_id="own-model:1")
    r = run(*BUILD, "--register", reg, "--keys", keys, "--out", tmp_path / "v1.cpwl", code=2)
    assert "give --threshold" in r.output and "engines calibrate" in r.output
    out = run(*BUILD, "--register", reg, "--keys", keys, "--out", tmp_path / "v1.cpwl", "--threshold", "0.5").output
    assert "no calibration: no rates known" in out
    other = Calibration.load_for("dlib-resnet-v1")
    other.save(tmp_path / "other.json")
    r = run(
        *BUILD,
        "--register",
        reg,
        "--keys",
        keys,
        "--out",
        tmp_path / "v2.cpwl",
        "--calibration",
        tmp_path / "other.json",
        code=2,
    )
    assert "the calibration is for model 'dlib-resnet-v1'" in r.output


def test_the_unit_refuses_a_bundle_below_the_strangers_median(engine: Any, tmp_path: Path) -> None:
    from edge.config import load_config
    from edge.daemon import Daemon

    auth = Authority(model_id=engine.model_id, dim=int(engine.embedding_dim))
    auth.write_root(tmp_path / "root.pub")
    conf = tmp_path / "unit.toml"
    conf.write_text(
        '[unit]\nid = "u1"\nsite = "s1"\n[[cameras]]\nid = "gate"\nurl = "rtsp://127.0.0.1:1/none"\n'
        f'[watchlist]\nroot_key = "{tmp_path / "root.pub"}"\nstore = "{tmp_path / "unit.db"}"\n'
        f'[sinks.jsonl]\npath = "{tmp_path / "hits.jsonl"}"\n'
    )
    daemon = Daemon(load_config(conf), engine=engine)
    daemon._open_watchlist()
    try:
        median = Calibration.for_engine(engine).strangers_median
        assert daemon.watchlist.threshold_range == (median, 1.0)
        emb = samples_of(person_centers(1, dim=auth.dim), 1)
        persons = make_persons(["case-1"], 1)
        auth.threshold = 0.6
        with pytest.raises(BundleRejected) as exc:
            daemon.watchlist.offer(auth.bundle(1, persons, emb, canary=True))
        assert exc.value.reason == "bad_threshold" and "default_threshold 0.6" in str(exc.value)
        auth.threshold = CAL.threshold_for_fpir(0.01, 1, 1).threshold
        assert daemon.watchlist.offer(auth.bundle(2, persons, emb, canary=True)) == 2
    finally:
        daemon.watchlist.close()


def test_watchlist_apply_checks_thresholds_against_the_calibration_too(tmp_path: Path) -> None:
    """USB (`edge watchlist apply`) refuses what the running unit refuses: a threshold below the strangers' median."""
    auth = Authority(model_id=MODEL)
    root = auth.write_root(tmp_path / "root.pub")
    emb = samples_of(person_centers(1, dim=auth.dim), 1)
    persons = make_persons(["case-1"], 1)
    where = ("--store", tmp_path / "unit.db", "--root-key", root, "--model-id", MODEL)
    auth.threshold = 0.6
    low = tmp_path / "low.cpwl"
    low.write_bytes(auth.bundle(1, persons, emb))
    r = edge_wl("apply", low, *where, code=1)
    assert "rejected (bad_threshold)" in r.output and "default_threshold 0.6" in r.output
    auth.threshold = CAL.threshold_for_fpir(0.01, 1, 1).threshold
    ok = tmp_path / "ok.cpwl"
    ok.write_bytes(auth.bundle(2, persons, emb))
    assert "applied: watchlist version 2" in edge_wl("apply", ok, *where).output
    # A model without a calibration: checked against (0, 1), with a warning that says so.
    other = Authority(model_id="someone-elses-model:1", root=auth.root, signing=auth.signing, threshold=0.6)
    odd = tmp_path / "odd.cpwl"
    odd.write_bytes(other.bundle(1, persons, emb))
    r = edge_wl(
        "apply", odd, "--store", tmp_path / "other.db", "--root-key", root, "--model-id", "someone-elses-model:1"
    )
    assert "checked against (0, 1) only" in r.output and "applied: watchlist version 1" in r.output
