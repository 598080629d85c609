"""Calibration: stranger-score tails, thresholds for a false-alert rate at a list size, `engines calibrate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.calibration import PACKAGED_DIR, Calibration, CalibrationError, MissCurve
from engines.cli import main as engines_cli
from engines.ensemble import DEFAULT_MEMBERS, ensemble_name
from engines.model_spec import EmbedderSpec


def _normal_calibration(n: int = 200_000, seed: int = 0) -> tuple[Calibration, np.ndarray]:
    scores = np.random.default_rng(seed).normal(0.97, 0.006, n)
    return Calibration.from_scores("test-model", False, {"cross_age": scores}, {"cohort": "normal draws"}), scores


def test_far_follows_the_scores_it_was_made_from() -> None:
    cal, scores = _normal_calibration()
    for t in (0.96, 0.97, 0.98, 0.985):
        far, extrapolated = cal.far(t)
        assert not extrapolated
        assert far == pytest.approx(np.mean(scores > t), rel=0.1, abs=1e-5)
    assert cal.strangers_median == pytest.approx(np.median(scores), abs=1e-4)


def test_threshold_rises_as_fewer_false_alerts_are_allowed_and_as_the_list_grows() -> None:
    cal, _ = _normal_calibration()
    by_fpir = [cal.threshold_for_fpir(f, 600).threshold for f in (0.3, 0.1, 0.03, 0.01, 0.001)]
    assert all(a < b for a, b in zip(by_fpir, by_fpir[1:]))
    by_size = [cal.threshold_for_fpir(0.01, n).threshold for n in (1, 10, 100, 1000, 10_000, 100_000)]
    assert all(a < b for a, b in zip(by_size, by_size[1:]))
    one, two = cal.threshold_for_fpir(0.01, 500, 1), cal.threshold_for_fpir(0.01, 500, 2)
    assert two.threshold > one.threshold


def test_expected_rates_agree_with_the_threshold_chosen() -> None:
    cal, _ = _normal_calibration()
    for fpir, size, per in ((0.01, 600, 2.0), (0.1, 50, 1.0), (0.03, 2000, 1.5)):
        op = cal.threshold_for_fpir(fpir, size, per)
        assert op.fpir == pytest.approx(fpir, rel=0.05)
        again = cal.expected_rates(op.threshold, size, per)
        assert again.fpir == pytest.approx(op.fpir)
        # per face = 1 - (1 - per pair) ** (persons * templates); per person in between
        assert op.far_pair <= op.far_person <= op.fpir
        assert 1 - (1 - op.far_pair) ** (size * per) == pytest.approx(op.fpir, rel=1e-6)


def test_beyond_the_measured_pairs_the_tail_is_extrapolated_on_the_safe_side() -> None:
    cal, scores = _normal_calibration(n=20_000)
    op = cal.threshold_for_fpir(0.01, 100_000)  # needs FAR 1e-7 per pair: far beyond 20,000 pairs
    assert op.extrapolated
    assert op.threshold > scores.max()
    # A normal tail falls faster than the fitted straight line: the true FAR at that threshold is lower.
    true_far = 0.5 * math.erfc((op.threshold - 0.97) / 0.006 / 2**0.5)
    assert true_far < op.far_pair


def test_worst_cohort_sets_the_threshold() -> None:
    rng = np.random.default_rng(1)
    low, high = rng.normal(0.95, 0.01, 50_000), rng.normal(0.97, 0.01, 50_000)
    both = Calibration.from_scores("m", False, {"a": low, "b": high}, {})
    only_high = Calibration.from_scores("m", False, {"b": high}, {})
    assert both.threshold_for_far(1e-3)[0] == pytest.approx(only_high.threshold_for_far(1e-3)[0])
    assert both.strangers_median == pytest.approx(np.median(high), abs=1e-3)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.threshold_for_fpir(0.0, 100),
        lambda c: c.threshold_for_fpir(1.0, 100),
        lambda c: c.threshold_for_fpir(0.01, 0),
        lambda c: c.threshold_for_fpir(0.01, 100, templates_per_person=0.5),
        lambda c: c.threshold_for_far(2.0),
    ],
)
def test_impossible_requests_are_named_errors(call) -> None:
    cal, _ = _normal_calibration(n=1000)
    with pytest.raises(CalibrationError):
        call(cal)


def test_too_few_pairs_cannot_calibrate() -> None:
    with pytest.raises(CalibrationError, match="too few"):
        Calibration.from_scores("m", False, {"all": np.zeros(10)}, {})


def test_save_and_load_round_trip_holds_only_figures(tmp_path) -> None:
    cal, _ = _normal_calibration()
    path = tmp_path / "cal.json"
    cal.save(path)
    d = json.loads(path.read_text())
    assert set(d) == {"format", "model", "flip_average", "description", "cohorts"}
    assert len(d["cohorts"]["cross_age"]["score"]) < 100  # quantiles, not the scores themselves
    back = Calibration.load(path)
    for fpir in (0.01, 0.1):
        assert back.threshold_for_fpir(fpir, 600).threshold == pytest.approx(
            cal.threshold_for_fpir(fpir, 600).threshold, abs=1e-5
        )


def test_bad_files_are_named_errors(tmp_path) -> None:
    with pytest.raises(CalibrationError, match="no such calibration"):
        Calibration.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(CalibrationError, match="not a calibration"):
        Calibration.load(bad)
    with pytest.raises(CalibrationError, match="no calibration for model"):
        Calibration.load_for("no-such-model")


def test_packaged_default_model_calibration() -> None:
    """The shipped figures for dlib's ResNet: strangers score about 0.97, FAR 1e-3 near 0.984."""
    cal = Calibration.load_for("dlib-resnet-v1:0123456789ab")
    assert (PACKAGED_DIR / "dlib-resnet-v1.json").is_file()
    assert set(cal.cohorts) == {"cross_age", "adult_adult"}
    assert 0.95 < cal.strangers_median < 0.98
    thr, extrapolated = cal.threshold_for_far(1e-3)
    assert 0.975 < thr < 0.99 and not extrapolated
    assert cal.threshold_for_fpir(0.01, 1000, 2).threshold > thr


def test_a_calibration_serves_only_the_model_and_flip_setting_it_was_made_with(tmp_path) -> None:
    cal, _ = _normal_calibration(n=1000)
    path = tmp_path / "cal.json"
    cal.save(path)
    assert Calibration.load_for(_spec("test-model", path)).model == "test-model"
    with pytest.raises(CalibrationError, match="flip_average"):
        Calibration.load_for(_spec("test-model", path), flip_average=True)
    with pytest.raises(CalibrationError, match="not 'other'"):
        Calibration.load_for(_spec("other", path))


# ---------------------------------------------------------------- engines calibrate on real photos


def _variants(image: np.ndarray, seed: int) -> list[np.ndarray]:
    """Twelve photos of one face: mirrored, shifted, rescaled, lighter and darker."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for k in range(12):
        img = image[:, ::-1] if k % 2 else image
        h, w = img.shape[:2]
        s = 0.85 + 0.3 * rng.random()
        dx, dy = rng.integers(-20, 21, 2)
        m = np.array([[s, 0, (1 - s) * w / 2 + dx], [0, s, (1 - s) * h / 2 + dy]], np.float32)
        img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), borderMode=cv2.BORDER_REFLECT_101)
        out.append(np.clip(img.astype(np.float32) * (0.8 + 0.4 * rng.random()), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def strangers_folder(tmp_path_factory):
    """Two people from scikit-image's public-domain photos (the astronaut and the cameraman), 12 photos each."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("strangers")
    camera = np.stack([data.camera()] * 3, axis=-1)
    for name, img, seed in (("astronaut", data.astronaut(), 0), ("cameraman", camera, 1)):
        (root / name).mkdir()
        for i, v in enumerate(_variants(img, seed)):
            Image.fromarray(v).save(root / name / f"{i:02d}.png")
    return root


def test_engines_calibrate_writes_a_calibration_of_real_photos(strangers_folder, tmp_path) -> None:
    unit = tmp_path / "unit.toml"
    unit.write_text('[unit]\nname = "ignored here"\n\n[engine]\nbackend = "onnxruntime"\n')
    out = tmp_path / "mine.json"
    res = CliRunner().invoke(
        engines_cli,
        ["calibrate", str(strangers_folder), "--config", str(unit), "--note", "scikit-image photos", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert "2 people, 24 photos with a face" in res.output
    cal = Calibration.load(out)
    # The config names no model, so the calibration is the default ensemble's, filed under its name.
    assert cal.model == ensemble_name(DEFAULT_MEMBERS) and cal.flip_average is False
    assert set(cal.cohorts) == {"all"} and cal.cohorts["all"].pairs == 144
    assert cal.description["command"].startswith("engines calibrate ")
    assert (
        cal.description["note"] == "scikit-image photos"
        and "--note 'scikit-image photos'" in cal.description["command"]
    )
    # Two different people: their pairs score below what the same model gives one person's variants.
    assert cal.strangers_median < 0.99


def test_engines_calibrate_refuses_a_folder_of_one_person(strangers_folder, tmp_path) -> None:
    res = CliRunner().invoke(
        engines_cli, ["calibrate", str(strangers_folder / "astronaut"), "--out", str(tmp_path / "x.json")]
    )
    assert res.exit_code == 1
    assert "needs at least 2" in res.output and not (tmp_path / "x.json").exists()


def test_engines_calibrate_names_a_bad_config_key(strangers_folder, tmp_path) -> None:
    unit = tmp_path / "unit.toml"
    unit.write_text("[engine]\nbackend = 'onnxruntime'\nflip_averaging = true\n")
    res = CliRunner().invoke(
        engines_cli, ["calibrate", str(strangers_folder), "--config", str(unit), "--out", str(tmp_path / "x.json")]
    )
    assert res.exit_code == 1
    assert "engine.flip_averaging" in res.output and str(unit) in res.output


def test_operating_points_are_told_in_words() -> None:
    cal, _ = _normal_calibration()
    assert "about 1 in 100 faces of people not on the list" in cal.threshold_for_fpir(0.01, 600, 2).describe()
    assert "nearly every face" in cal.expected_rates(0.6, 600, 2).describe()
    far_out = cal.threshold_for_fpir(0.01, 10_000_000)
    assert far_out.extrapolated and "estimate on the safe side" in far_out.describe()


def test_a_loaded_engine_finds_its_calibration() -> None:
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine

    engine = FaceEngine.load(EngineConfig(backend="onnxruntime"))
    cal = Calibration.for_engine(engine)
    assert cal.model == engine.model_id.split(":")[0] and cal.flip_average is False


def test_the_engine_table_alone_is_read_from_a_unit_config(tmp_path) -> None:
    from engines.config import EngineConfigError, load_engine_config

    unit = tmp_path / "unit.toml"
    unit.write_text('[unit]\nanything = 1\n\n[engine]\ncache_dir = "models"\nflip_average = true\n')
    cfg = load_engine_config(unit)
    assert cfg.flip_average is True and cfg.cache_dir == tmp_path / "models"
    assert load_engine_config(_write(tmp_path / "empty.toml", "[unit]\n")).flip_average is False
    with pytest.raises(EngineConfigError, match="TOML|cannot read"):
        load_engine_config(_write(tmp_path / "bad.toml", "[engine\n"))
    with pytest.raises(EngineConfigError, match="no such config file"):
        load_engine_config(tmp_path / "absent.toml")


def _write(path, text: str):
    path.write_text(text)
    return path


def test_thresholds_come_from_the_flip_averaged_calibration_where_there_is_one(tmp_path: Path) -> None:
    """Faces near the threshold are judged on flip-averaged embeddings (the second look), so a list's
    threshold follows the flip-averaged calibration; a model with only a plain one uses that."""
    cal = Calibration.for_thresholds("dlib-resnet-v1:0123456789ab")
    assert cal.flip_average and cal.model == "dlib-resnet-v1"
    plain = Calibration.load_for("dlib-resnet-v1")
    assert cal.threshold_for_fpir(0.01, 300, 2).threshold > plain.threshold_for_fpir(0.01, 300, 2).threshold
    path = tmp_path / "own.json"
    Calibration.from_scores("test-model", False, {"cross_age": np.linspace(0.5, 0.99, 1000)}, {}).save(path)
    own = Calibration.for_thresholds(_spec("test-model", path))
    assert not own.flip_average and own.model == "test-model"


def _spec(name: str, calibration: Path) -> EmbedderSpec:
    """A model description naming its own calibration file (as `[engine.embedder] calibration` does)."""
    return EmbedderSpec(
        name=name, input_width=150, input_height=150, alignment="dlib5", embedding_size=128, calibration=calibration
    )


def _misses() -> MissCurve:
    return MissCurve(
        threshold=np.array([0.96, 0.97, 0.98, 0.99, 1.0]),
        fnir=np.array([0.2, 0.3, 0.5, 0.9, 1.0]),
        list_size=309,
        templates_per_person=1.9,
        probes=600,
        splits=20,
        source="cross-age test figures",
        note="made up for the test",
    )


def test_the_miss_rate_is_interpolated_from_the_misses_section(tmp_path) -> None:
    cal, _ = _normal_calibration()
    assert cal.misses is None and cal.expected_miss_rate(0.98) is None
    with_misses = cal.with_misses(_misses())
    assert with_misses.expected_miss_rate(0.975) == pytest.approx(0.4)
    assert with_misses.expected_miss_rate(0.99) == pytest.approx(0.9)
    assert with_misses.expected_miss_rate(0.9) is None  # below the measured grid: not known
    # The section survives a round trip through the file, the strangers' side unchanged.
    path = tmp_path / "cal.json"
    with_misses.save(path)
    back = Calibration.load(path)
    assert back.expected_miss_rate(0.985) == pytest.approx(0.7)
    assert back.misses is not None and back.misses.source == "cross-age test figures" and back.misses.list_size == 309
    assert back.threshold_for_fpir(0.01, 600).threshold == pytest.approx(cal.threshold_for_fpir(0.01, 600).threshold)


def test_the_summary_tells_both_rates_or_that_misses_are_not_calibrated() -> None:
    cal, _ = _normal_calibration()
    fpir = cal.expected_rates(0.98, 12, 2).fpir
    plain = cal.expected_summary(0.98, 12, 2)
    assert plain.startswith(f"expected: about {100 * fpir:.2g}% of strangers' faces alerted at list size 12")
    assert plain.endswith("; miss rate: not calibrated for this model")
    both = cal.with_misses(_misses()).expected_summary(0.98, 12, 2)
    assert "about 50% of listed persons missed (cross-age test figures; measured with 309 persons listed" in both
    low = cal.with_misses(_misses()).expected_summary(0.95, 12, 2)
    assert "miss rate: not measured at this threshold (measured from 0.96 up)" in low


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fnir": [0.5, 0.4, 0.6, 0.9, 1.0]}, "must not fall"),
        ({"threshold": [0.96, 0.96, 0.98, 0.99, 1.0]}, "must rise"),
        ({"fnir": [0.2, 0.3, 0.5, 0.9, 1.5]}, "outside"),
        ({"list_size": None}, "malformed"),
    ],
)
def test_a_malformed_misses_section_is_a_named_error(tmp_path, change, message) -> None:
    cal, _ = _normal_calibration()
    path = tmp_path / "cal.json"
    cal.with_misses(_misses()).save(path)
    d = json.loads(path.read_text())
    d["misses"].update(change)
    path.write_text(json.dumps(d))
    with pytest.raises(CalibrationError, match=message):
        Calibration.load(path)


@pytest.mark.parametrize("name", ["dlib-resnet-v1", ensemble_name(DEFAULT_MEMBERS)])
@pytest.mark.parametrize("flip", [False, True])
def test_the_shipped_calibrations_of_the_default_and_dlib_carry_measured_misses(name, flip) -> None:
    """Measured on lag-dev by bench/openset.py --record-misses: the command and the data's licence are named,
    and more listed persons are missed as the threshold rises, nearly all at 1."""
    m = Calibration.load_for(name, flip_average=flip).misses
    assert m is not None
    assert "lag-dev" in m.source and "cross-age" in m.source
    assert "bench/openset.py" in m.command and "--record-misses" in m.command and "evaluation use only" in m.note
    assert m.list_size > 100 and m.splits >= 10
    assert 0 < m.fnir[0] < 0.5 and m.fnir[-1] > 0.99
