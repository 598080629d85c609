"""`engines compare`: two real photos through the real engine, the faces, their quality, the score
and what it means at the unit's threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engines.cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    skdata = pytest.importorskip("skimage.data")
    d = tmp_path_factory.mktemp("compare")
    a = skdata.astronaut()
    out = {
        "astronaut": d / "astronaut.png",
        "mirrored": d / "mirrored.png",
        "small": d / "small.png",
        "blank": d / "blank.png",
    }
    Image.fromarray(a).save(out["astronaut"])
    Image.fromarray(np.ascontiguousarray(a[:, ::-1])).save(out["mirrored"])
    Image.fromarray(a).resize((200, 200)).save(out["small"])
    Image.fromarray(np.full((200, 200, 3), 127, np.uint8)).save(out["blank"])
    return out


def _run(*args: object):
    return CliRunner().invoke(main, ["compare", *[str(a) for a in args]], catch_exceptions=False)


def test_compare_scores_two_photos_and_judges_at_the_units_threshold(photos: dict[str, Path], tmp_path: Path) -> None:
    from engines.calibration import Calibration
    from engines.config import EngineConfig

    # A threshold below the default model's strangers' median: every passer-by would be an alert.
    default = Calibration.for_engine_config(EngineConfig())
    low = round(default.strangers_median - 0.05, 2)
    conf = tmp_path / "unit.toml"
    conf.write_text(f"[engine]\nthreads = 1\n[matching]\nthreshold = {low}\n")
    r = _run(photos["astronaut"], photos["mirrored"], "--config", conf)
    assert r.exit_code == 0, r.output
    info = json.loads(_run(photos["astronaut"], photos["mirrored"], "--config", conf, "--json").output)
    height = info["images"][str(photos["astronaut"])]["faces"][0]["height_px"]
    assert 100 < height < 130  # the astronaut's face is about 115 px high; the detector's box varies a little
    assert f"{photos['astronaut']}: face {height:.0f} px high" in r.output and "passes the quality gate" in r.output
    score = info["score"]
    assert default.strangers_median < score < 1.0  # the same face mirrored: very close, not identical
    assert f"score {score:.4f}" in r.output
    assert f"at threshold {low:g} ({conf} [matching] threshold): a MATCH (score >= threshold)" in r.output
    assert info["same_person"] is True and info["threshold_source"].endswith("[matching] threshold")

    strict = _run(photos["astronaut"], photos["mirrored"], "--threshold", "0.999")
    assert "at threshold 0.999 (--threshold): NOT a match (score < threshold)" in strict.output
    bare = _run(photos["astronaut"], photos["mirrored"])
    assert "no threshold to judge it by" in bare.output and "watchlist build --fpir" in bare.output

    # The default model has a calibration: the score and the threshold are read as false-alert rates.
    cal = info["calibrated"]
    assert cal["model"] == default.model and set(cal["fpir_if_threshold"]) == {"100", "1000", "10000"}
    fpir = list(cal["fpir_if_threshold"].values())
    assert fpir == sorted(fpir) and 0 <= cal["far_pair"] < 0.5  # a longer list, more false alerts
    assert "two different people score above it with chance" in r.output
    assert "as a watchlist threshold, false alerts per face of someone not on the list:" in r.output
    assert "as a watchlist threshold with 1,000 persons listed: false alerts on nearly every face" in r.output


def test_compare_says_when_a_face_fails_the_gate_or_is_missing(photos: dict[str, Path]) -> None:
    r = _run(photos["astronaut"], photos["small"])
    assert r.exit_code == 0, r.output
    assert f"{photos['small']}: face" in r.output and "FAILS the gate (too_small)" in r.output
    r = _run(photos["astronaut"], photos["blank"])
    assert r.exit_code == 1 and f"{photos['blank']}: no face found" in r.output
    assert "cannot compare: no face found in" in r.output
