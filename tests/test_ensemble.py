"""`[engine] ensemble` (issue 22): several embedders as one model, with real models on real photos.

The npm members need `engines build` to have fetched them into the default cache; tests that run
them skip with that reason where they are missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.cache import default_cache_dir, npm_model_dir
from engines.calibration import Calibration, CalibrationError
from engines.config import EngineConfig, EngineConfigError, load_engine_config
from engines.ensemble import DEFAULT_MEMBERS, config_identity, ensemble_model_id, ensemble_name
from engines.known_answers import SelfTestError, check_engine
from engines.model_spec import DEFAULT_EMBEDDER_NAME
from engines.npm_models import NPM_MODELS
from tests.services import missing_model

skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the public-domain test photos")

NPM = [m.key for m in NPM_MODELS]
HAVE_NPM = all((npm_model_dir(default_cache_dir(), m) / "model.onnx").is_file() for m in NPM_MODELS)
needs_npm = pytest.mark.skipif(not HAVE_NPM, reason="the npm embedders are not in the cache: run `engines build`")
WEIGHTS = {DEFAULT_EMBEDDER_NAME: 0.5, NPM[0]: 0.3, NPM[1]: 0.2}


def _config(**kw) -> EngineConfig:
    members = [{"model": n, "weight": w} for n, w in WEIGHTS.items()]
    return EngineConfig(backend="onnxruntime", precision="fp32", ensemble=members, **kw)


@pytest.fixture(scope="module")
def engines():
    """The ensemble and each of its members loaded alone."""
    if not HAVE_NPM:
        missing_model("the npm embedders are not in the cache: run `engines build`")
    from engines.face_engine import FaceEngine

    alone = {n: FaceEngine.load(EngineConfig(backend="onnxruntime", ensemble=[n])) for n in WEIGHTS}
    return FaceEngine.load(_config()), alone


def _faces(engine):
    """(image, detection) of the astronaut, the astronaut at 60%, and the cameraman (another person)."""
    import cv2

    img = skdata.astronaut()
    small = cv2.resize(img, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    camera = np.ascontiguousarray(np.stack([skdata.camera()] * 3, axis=-1))
    return [(im, engine.detect(im)[0]) for im in (img, small, camera)]


def test_members_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "own.onnx").write_bytes(b"")
    path = tmp_path / "unit.toml"
    path.write_text(
        '[[engine.ensemble]]\nmodel = "dlib-resnet-v1"\n\n'
        '[[engine.ensemble]]\nmodel = "expo-mobilefacenet"\nweight = 3\nflip = false\n\n'
        '[[engine.ensemble]]\nembedder = { name = "own", onnx = "own.onnx", input_width = 112, input_height = 112, '
        'alignment = "template", template = [[38, 51], [73, 51], [56, 71], [41, 92], [70, 92]], embedding_size = 8 }\n'
    )
    members = load_engine_config(path).members()
    assert [m.name for m in members] == [DEFAULT_EMBEDDER_NAME, "expo-mobilefacenet", "own"]
    assert [m.weight for m in members] == [1.0, 3.0, 1.0] and [m.flip for m in members] == [True, False, True]
    assert members[2].embedder.onnx == tmp_path / "own.onnx", "a member's relative path starts at the file's folder"
    assert EngineConfig().members() == DEFAULT_MEMBERS


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('ensemble = ["dlib-resnet-v1", "dlib-resnet-v1"]', "dlib-resnet-v1 more than once"),
        ('ensemble = ["arcface"]', "unknown model 'arcface'; built-in models: dlib-resnet-v1"),
        ("ensemble = []", "ensemble lists no member"),
        ('ensemble = [{ model = "dlib-resnet-v1", weight = 0 }]', "engine.ensemble.0.weight"),
        (
            'ensemble = ["dlib-resnet-v1"]\n[engine.embedder]\nname = "x"\ninput_width = 1\ninput_height = 1\n'
            'alignment = "dlib5"\nembedding_size = 1',
            "either [engine.embedder] or [engine] ensemble",
        ),
    ],
)
def test_a_wrong_ensemble_is_refused_naming_file_and_key(tmp_path: Path, table: str, words: str) -> None:
    path = tmp_path / "unit.toml"
    path.write_text(f"[engine]\n{table}\n")
    with pytest.raises(EngineConfigError) as info:
        load_engine_config(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_the_model_id_names_the_members_their_weights_and_weight_files() -> None:
    members = _config().members()
    ids = ["dlib-resnet-v1:aaa", "faceplugin-fr-feature:bbb", "expo-mobilefacenet:ccc"]
    base = ensemble_model_id(members, ids)
    assert base.startswith(ensemble_name(members) + ":")
    # Weights given on another scale are the same model; other weights, weight files or flips are not.
    scaled = EngineConfig(ensemble=[m.model_copy(update={"weight": m.weight * 10}) for m in members]).members()
    assert ensemble_model_id(scaled, ids) == base
    other_weights = EngineConfig(ensemble=[m.model_copy(update={"weight": 1.0}) for m in members]).members()
    no_flip = EngineConfig(ensemble=[*members[:2], members[2].model_copy(update={"flip": False})]).members()
    others = {
        ensemble_model_id(other_weights, ids),
        ensemble_model_id(members, [*ids[:2], "expo-mobilefacenet:ddd"]),
        ensemble_model_id(no_flip, ids),
        ensemble_model_id(members[:2], ids[:2]),
    }
    assert base not in others and len(others) == 4
    assert ensemble_name(other_weights) != ensemble_name(members), "its calibration is filed under another name"


def test_an_ensemble_of_one_is_that_model() -> None:
    assert config_identity(EngineConfig(ensemble=["dlib-resnet-v1"])) == config_identity(
        EngineConfig(ensemble=[{"model": "dlib-resnet-v1", "weight": 0.3}])
    )
    assert config_identity(EngineConfig(ensemble=["dlib-resnet-v1"])).model_id.startswith("dlib-resnet-v1:")


@needs_npm
def test_the_fused_score_is_the_weighted_mean_of_the_members_cosines(engines) -> None:
    ensemble, alone = engines
    faces = _faces(ensemble)
    fused = ensemble.embed(faces)
    assert fused.shape == (3, 129 + 512 + 192) == (3, ensemble.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    cos = {n: e.embed(faces) @ e.embed(faces).T for n, e in alone.items()}
    want = sum(WEIGHTS[n] * c for n, c in cos.items())
    np.testing.assert_allclose(fused @ fused.T, want, atol=1e-5)
    # The same person at two sizes scores above the astronaut against the cameraman, in every member too.
    assert fused[0] @ fused[1] > fused[0] @ fused[2]
    assert ensemble.model_id == config_identity(_config()).model_id, "known without loading the engine"
    assert ensemble.is_ensemble and [m.weight for m in ensemble.members] == list(WEIGHTS.values())


@needs_npm
def test_a_second_look_gives_the_flip_averaged_embedding_of_the_flipping_members(engines) -> None:
    from engines.face_engine import FaceEngine

    ensemble, _ = engines
    faces = _faces(ensemble)
    seen = []

    def look_again(plain: np.ndarray) -> np.ndarray:
        seen.append(plain.copy())
        return np.array([True, False, True])

    second = ensemble.embed(faces, look_again=look_again)
    plain = ensemble.embed(faces)
    np.testing.assert_array_equal(seen[0], plain)
    flipped = FaceEngine.load(_config(flip_average=True)).embed(faces)
    np.testing.assert_allclose(second[[0, 2]], flipped[[0, 2]], atol=1e-6)
    np.testing.assert_array_equal(second[1], plain[1])
    assert np.abs(second[0] - plain[0]).max() > 1e-3, "the mirror image changed the embedding"
    # A member without flip keeps its plain embedding in a second look.
    members = [m.model_copy(update={"flip": m.model == DEFAULT_EMBEDDER_NAME}) for m in _config().members()]
    some = FaceEngine.load(EngineConfig(backend="onnxruntime", ensemble=members))
    again = some.embed(faces, look_again=lambda p: np.ones(len(p), bool))
    dlib_dims = 129
    np.testing.assert_allclose(again[:, dlib_dims:], plain[:, dlib_dims:], atol=1e-6)
    assert np.abs(again[:, :dlib_dims] - plain[:, :dlib_dims]).max() > 1e-4


@needs_npm
def test_known_answers_check_every_member_and_name_the_wrong_one(engines) -> None:
    from tests.faulty_kernel_child import SaturatingBackend

    ensemble, _ = engines
    report = check_engine(ensemble)
    assert report.checks == ("pnet", "rnet", "onet", *(f"embedder:{n}" for n in WEIGHTS)), report.skipped
    member = ensemble.members[1]
    real = member.embedder.backend
    member.embedder.backend = SaturatingBackend(real)
    try:
        with pytest.raises(SelfTestError, match=f"embedder:{NPM[0]} \\({member.model_id}, float32\\)"):
            check_engine(ensemble)
    finally:
        member.embedder.backend = real


def test_an_ensemble_without_calibration_says_how_to_make_one(tmp_path: Path) -> None:
    config = EngineConfig(ensemble=[{"model": "dlib-resnet-v1", "weight": 0.123}, "expo-mobilefacenet"])
    with pytest.raises(CalibrationError, match="no calibration for model 'ensemble-.*engines calibrate"):
        Calibration.for_engine_config(config)
    made = Calibration.from_scores(
        ensemble_name(config.members()), False, {"cross_age": np.linspace(-0.2, 0.6, 1000)}, {}
    )
    made.save(tmp_path / "cal.json")
    own = Calibration.for_engine_config(config.model_copy(update={"ensemble_calibration": tmp_path / "cal.json"}))
    assert own.model == ensemble_name(config.members())
    other = EngineConfig(ensemble=["dlib-resnet-v1", "expo-mobilefacenet"], ensemble_calibration=tmp_path / "cal.json")
    with pytest.raises(CalibrationError, match="calibration is for model"):
        Calibration.for_engine_config(other)


@needs_npm
def test_a_list_built_for_another_set_is_refused(tmp_path: Path) -> None:
    from matching.matcher import Matcher
    from testing.synthetic import Authority, make_persons, person_centers, samples_of
    from watchlist.format.errors import BundleRejected
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    ours = config_identity(_config())
    other = config_identity(EngineConfig(ensemble=list(WEIGHTS)))  # the same models, equal weights
    hq = Authority(model_id=other.model_id, threshold=0.5)
    cfg = WatchlistConfig(root_key=hq.write_root(tmp_path / "root.pub"), store=tmp_path / "wl.db")
    unit = Watchlist(cfg, Matcher(), ours.model_id)
    unit.start()
    try:
        centers = person_centers(3, seed=0)
        with pytest.raises(BundleRejected) as info:
            unit.offer(hq.bundle(1, make_persons(["a", "b", "c"], 2), samples_of(centers, 2, seed=1)), source="t")
        assert info.value.reason == "wrong_model"
    finally:
        unit.close()


def test_the_packaged_calibration_of_the_measured_ensemble_gives_its_thresholds() -> None:
    """bench/configs/ensemble.toml's calibrations ship (engines calibrate, docs/engine.md), so `watchlist build
    --fpir` picks a list's threshold for it from the model id alone, as for dlib's model."""
    config = load_engine_config(Path(__file__).resolve().parents[1] / "bench" / "configs" / "ensemble.toml")
    name = ensemble_name(config.members())
    plain = Calibration.for_engine_config(config)
    flipped = Calibration.for_thresholds(f"{name}:e44786a2324b")
    assert plain.model == flipped.model == name and flipped.flip_average and not plain.flip_average
    small, large = (flipped.threshold_for_fpir(0.01, n, 2).threshold for n in (100, 10_000))
    assert plain.strangers_median < small < large < 1
    # The rule every threshold meets holds for it: below its strangers' median (0.87) is refused.
    assert plain.threshold_problem(0.5) is not None and plain.threshold_problem(small) is None


def test_the_default_model_is_the_measured_ensemble_with_its_calibrations() -> None:
    """The default (DEFAULT_MEMBERS) is the set whose accuracy and speed docs/engine.md gives, under
    bench/configs/ensemble.toml's name, so an empty [engine] table finds its packaged calibrations
    (plain and flip-averaged); a change of weights or members would leave units without one."""
    config = load_engine_config(Path(__file__).resolve().parents[1] / "bench" / "configs" / "ensemble.toml")
    assert config.members() == DEFAULT_MEMBERS
    for flip in (False, True):
        cal = Calibration.for_engine_config(EngineConfig(flip_average=flip))
        assert cal.model == ensemble_name(DEFAULT_MEMBERS) and cal.flip_average is flip
