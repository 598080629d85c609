"""The face engine: image in, faces with landmarks, quality and embeddings out.

One object the daemon, the HQ enrolment tools and the benchmarks share, so a face is found,
aligned, judged and embedded the same way at HQ and on the unit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.align import align_to_template, dlib_chip_transforms, extract_chip
from engines.backends import Backend, create_backend, tensorrt_available
from engines.cache import DefaultModels, ensure_default_models, int8_check_inputs, int8_embedder, sha256_file
from engines.calibration import Calibration, CalibrationError
from engines.config import EngineConfig
from engines.detector import Detection, MtcnnDetector, cpu_session_factory
from engines.embedder import Embedder, LookAgain, preprocess_chips
from engines.ensemble import (
    EnsembleEmbedder,
    EnsembleMember,
    EnsembleSpec,
    Member,
    describe,
    ensemble_model_id,
    ensemble_name,
    normalised_weights,
    npm_member_spec,
)
from engines.errors import ModelError
from engines.image import check_image
from engines.landmarks import ShapePredictor, dlib_box_from_points
from engines.model_spec import DEFAULT_EMBEDDER_NAME, EmbedderSpec, dlib_resnet_spec, model_id_of
from engines.quality import Quality, assess

log = logging.getLogger(__name__)


# TensorRT needs shape bounds for P-Net, which runs on each pyramid level of a frame
# (up to 1080p at min_face_size 12), and for the batched R-Net and O-Net crops.
_PNET_BOUNDS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "input": ((1, 3, 12, 12), (1, 3, 360, 640), (1, 3, 1088, 1920))
}
_DETECTOR_MAX_BATCH = 256


class _BackendSession:
    """onnxruntime's session.run(None, feeds) call shape over any Backend, for the detector."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._names = [o.name for o in backend.outputs]

    def run(self, _outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.backend.run(feeds)
        return [out[n] for n in self._names]


def _detector_sessions(config: EngineConfig, cache_dir: Path):
    """ONNX Runtime sessions on the CPU, or TensorRT engines where the config and machine allow."""
    use_trt = config.backend == "tensorrt" or (config.backend == "auto" and tensorrt_available() is None)
    if not use_trt:
        return cpu_session_factory(config.detector.intra_op_threads)

    def make(path: Path) -> _BackendSession:
        bounds = _PNET_BOUNDS if path.stem == "pnet" else None
        return _BackendSession(
            create_backend(
                path,
                "tensorrt",
                cache_dir=cache_dir,
                max_batch=_DETECTOR_MAX_BATCH,
                # No calibrator for MTCNN: its small PReLU networks gain little from int8.
                precision="fp16" if config.precision == "int8" else config.precision,
                dynamic_bounds=bounds,
            )
        )

    return make


def align_many(
    items: Sequence[tuple[np.ndarray, Detection]], spec: EmbedderSpec, predictor: ShapePredictor | None
) -> np.ndarray:
    """Aligned chips (N, H, W, 3) uint8 RGB in the geometry `spec` describes, one per
    (image, detection) in `items` and in their order; faces may come from any number of images.

    Each image is checked once. With dlib's 5-point alignment the landmarks of all faces are
    found in one pass (ShapePredictor.predict_batch), then each chip is cut.
    """
    chips = np.empty((len(items), spec.input_height, spec.input_width, 3), dtype=np.uint8)
    by_image: dict[int, list[int]] = {}
    for i, (image, _) in enumerate(items):
        by_image.setdefault(id(image), []).append(i)
    for idx in by_image.values():
        check_image(items[idx[0]][0])
    if spec.alignment == "dlib5" and predictor is not None:
        groups = [
            (items[idx[0]][0], [dlib_box_from_points(items[i][1].landmarks) for i in idx]) for idx in by_image.values()
        ]
        order = [i for idx in by_image.values() for i in idx]
        transforms = dlib_chip_transforms(predictor.predict_batch(groups), size=spec.input_width)
        for i, chip in zip(order, transforms, strict=True):
            chips[i] = extract_chip(items[i][0], chip, spec.input_width)
    else:
        template = np.asarray(spec.template, dtype=np.float32)
        size = (spec.input_width, spec.input_height)
        for i, (image, det) in enumerate(items):
            chips[i] = align_to_template(image, det.landmarks, template, size)
    return chips


def _int8_calibration(
    config: EngineConfig, detector: MtcnnDetector, spec: EmbedderSpec, predictor: ShapePredictor | None
) -> tuple[Callable[[], np.ndarray], str, str]:
    """(make_inputs, key, description) of the int8 calibration set: preprocessed chips made lazily,
    since a cached int8 model or TensorRT calibration table needs none."""
    from engines.int8_chips import (
        calibration_chips,
        folder_photos,
        photos_key,
        public_domain_photos,
        public_photos_key,
    )

    count, seed = 256, 0
    folder = config.int8_calibration_photos
    if folder:
        photos = folder_photos(Path(folder))
        key = photos_key(photos, count, seed)
        source = f"{len(photos)} photos under {folder}, {count} jittered chips"
    else:
        photos = None
        key = public_photos_key(count, seed)
        source = f"scikit-image public-domain photos (astronaut, camera), {count} jittered chips"

    def make_inputs() -> np.ndarray:
        chips = calibration_chips(
            photos if photos is not None else public_domain_photos(),
            detector.detect,
            lambda img, dets: align_many([(img, d) for d in dets], spec, predictor),
            count,
            seed,
        )
        return preprocess_chips(chips, spec)

    return make_inputs, key, source


def _self_checked_int8(int8_onnx: Path, float_onnx: Path, threads: int) -> tuple[Backend, str | None]:
    """(backend, None) for the int8 embedder when it agrees with the float32 one on the check chips kept
    beside it, else (the float32 backend, why): a CPU whose integer kernels compute other numbers, or a
    damaged model, must not give wrong embeddings silently."""
    from engines.cpu import cpu_features
    from engines.int8 import SELF_CHECK_MIN_COSINE, lowest_cosine

    inputs = int8_check_inputs(int8_onnx)
    int8 = create_backend(int8_onnx, "onnxruntime", threads=threads)
    float32 = create_backend(float_onnx, "onnxruntime", threads=threads)
    cosine = lowest_cosine(int8, float32, inputs)
    if cosine >= SELF_CHECK_MIN_COSINE:
        log.info("int8 self-check passed: lowest cosine to float32 %.4f on %d check chips", cosine, len(inputs))
        return int8, None
    reason = (
        f"int8 self-check failed: the int8 embedder {int8_onnx} agrees with float32 only to cosine {cosine:.4f} "
        f"(needs {SELF_CHECK_MIN_COSINE}) on {len(inputs)} check chips on this CPU (features: "
        f"{', '.join(cpu_features()) or 'none read'}); running float32 instead. Delete {int8_onnx.parent} to "
        'quantise again; if it fails again, this CPU\'s int8 kernels differ: set precision = "fp32"'
    )
    log.warning(reason)
    return float32, reason


def _resolve_member(
    member: EnsembleMember, models: DefaultModels, cache_dir: Path
) -> tuple[EmbedderSpec, Path, str, str]:
    """(spec, ONNX path, model id, cache key) of one embedder a config names."""
    if member.model == DEFAULT_EMBEDDER_NAME:
        spec = dlib_resnet_spec(models.channel_means)
        return spec, models.embedder, model_id_of(spec.name, models.embedder_source_sha256), models.embedder.parent.name
    if member.model is not None:
        spec, onnx_path = npm_member_spec(member.model, cache_dir)
    else:
        spec = member.embedder  # type: ignore[assignment]
        if spec.onnx is None or not Path(spec.onnx).is_file():
            raise ModelError(f"engine.embedder.onnx: model file {spec.onnx} not found; give the path of the ONNX file")
        onnx_path = Path(spec.onnx)
    digest = sha256_file(onnx_path)
    return spec, onnx_path, model_id_of(spec.name, digest), f"{spec.name}-{digest[:16]}"


def _member_backend(
    config: EngineConfig,
    detector: MtcnnDetector,
    predictor: ShapePredictor | None,
    spec: EmbedderSpec,
    onnx_path: Path,
    model_key: str,
    cache_dir: Path,
    on_onnxruntime: bool,
) -> tuple[Backend, str, str | None]:
    """(backend, precision in use, why int8 fell back or None) of one embedder."""
    calibration = None
    calibration_key = ""
    precision = config.precision
    if config.precision == "int8":
        # int8 embeddings stay comparable with float32 ones (docs/engine.md), so the model id
        # does not change and watchlists enrolled in float32 still match.
        calibration, calibration_key, source = _int8_calibration(config, detector, spec, predictor)
        if on_onnxruntime:
            int8_path = int8_embedder(cache_dir, onnx_path, model_key, calibration_key, calibration, source)
            backend, fallback = _self_checked_int8(int8_path, onnx_path, config.threads)
            return backend, "fp32" if fallback else "int8", fallback
    elif on_onnxruntime:
        precision = "fp32"
    backend = create_backend(
        onnx_path,
        config.backend,
        threads=config.threads,
        cache_dir=cache_dir,
        max_batch=config.max_batch,
        precision=config.precision,
        calibration=calibration,
        calibration_key=calibration_key,
    )
    return backend, precision, None


@dataclass(frozen=True)
class AnalyzedFace:
    """A detected face with its quality verdict and, when it passed, its embedding."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray  # (5, 2) detector landmarks in image pixels
    quality: Quality
    embedding: np.ndarray | None  # (D,) float32, unit length


class FaceEngine:
    """Detector + landmarks + alignment + quality gate + embedder.

    Example::

        engine = FaceEngine.load()
        for face in engine.analyze(load_image("photo.jpg")):
            print(face.box, face.quality.ok, face.embedding[:4])
    """

    def __init__(
        self,
        config: EngineConfig,
        detector: MtcnnDetector,
        embedder: Embedder | EnsembleEmbedder,
        model_id: str,
        shape_predictor: ShapePredictor | None,
        precision: str | None = None,
        precision_fallback: str | None = None,
        members: Sequence[Member] = (),
    ) -> None:
        self.config = config
        self.detector = detector
        self.embedder = embedder
        self.model_id = model_id
        self.shape_predictor = shape_predictor
        # The embedder's precision in use: "fp32" where ONNX Runtime runs a float model (fp16 is
        # TensorRT's) and after an int8 fallback; config.precision otherwise. An ensemble whose members
        # run at different precisions (one fell back) names both, e.g. "fp32+int8".
        self.precision = precision or config.precision
        # Why the embedder runs float32 although int8 was asked for (the self-check failed), else None.
        self.precision_fallback = precision_fallback
        # The embedders a face goes through: one for a single model, each member of an ensemble.
        self.members: list[Member] = list(members) or [
            Member(embedder.spec.name, model_id, embedder, 1.0, True, self.precision, precision_fallback)
        ]

    @property
    def is_ensemble(self) -> bool:
        """Whether faces are embedded by several models (engines/ensemble.py)."""
        return isinstance(self.embedder, EnsembleEmbedder)

    @classmethod
    def load(cls, config: EngineConfig | None = None) -> FaceEngine:
        """Load the models named by `config` (the defaults when None), converting them on first use."""
        config = config or EngineConfig()
        models = ensure_default_models(config.cache_dir)
        cache_dir = Path(config.cache_dir) if config.cache_dir else models.embedder.parent.parent
        detector = MtcnnDetector(
            models.detector, config.detector, session_factory=_detector_sessions(config, cache_dir)
        )
        choices = config.members()
        resolved = [_resolve_member(m, models, cache_dir) for m in choices]
        needs_landmarks = any(spec.alignment == "dlib5" for spec, *_ in resolved)
        predictor = ShapePredictor.load(models.landmarks) if needs_landmarks else None
        on_onnxruntime = config.backend == "onnxruntime" or (
            config.backend == "auto" and tensorrt_available() is not None
        )
        members = []
        weights = normalised_weights(choices) if len(choices) > 1 else [1.0]
        for choice, weight, (spec, onnx_path, model_id, model_key) in zip(choices, weights, resolved, strict=True):
            backend, precision, fallback = _member_backend(
                config, detector, predictor, spec, onnx_path, model_key, cache_dir, on_onnxruntime
            )
            embedder = Embedder(spec, backend, max_batch=config.max_batch, flip_average=config.flip_average)
            members.append(Member(spec.name, model_id, embedder, weight, choice.flip, precision, fallback))
            log.info("embedder %s on %s (%s, weight %g)", model_id, backend.name, precision, weight)
        if len(members) == 1:
            m = members[0]
            log.info("face engine ready: model %s", m.model_id)
            return cls(config, detector, m.embedder, m.model_id, predictor, m.precision, m.precision_fallback)
        ids = [m.model_id for m in members]
        ensemble_spec = EnsembleSpec(ensemble_name(choices), config.ensemble_calibration)
        ensemble = EnsembleEmbedder(
            members, ensemble_spec, lambda items, s: align_many(items, s, predictor), flip_average=config.flip_average
        )
        model_id = ensemble_model_id(choices, ids)
        precision = "+".join(sorted({m.precision for m in members}))
        fallback = "; ".join(f"{m.name}: {m.precision_fallback}" for m in members if m.precision_fallback) or None
        log.info("face engine ready: ensemble %s of %s", model_id, describe(choices))
        return cls(config, detector, ensemble, model_id, predictor, precision, fallback, members)

    @property
    def embedding_dim(self) -> int:
        return self.embedder.dim

    @functools.cached_property
    def calibration(self) -> Calibration | None:
        """The calibration of this model and flip setting (Calibration.for_engine), or None when the model has
        none (logged once): what places a unit's second look and `engines compare`'s calibrated meaning."""
        try:
            return Calibration.for_engine(self)
        except CalibrationError as exc:
            log.info("model %s has no calibration: %s", self.model_id, exc)
            return None

    @property
    def min_face_size(self) -> int:
        """The smallest face the detector looks for, px."""
        return self.config.detector.min_face_size

    def detect(self, image: np.ndarray, exclude: Sequence[tuple[float, float, float, float]] = ()) -> list[Detection]:
        """Faces in an RGB uint8 image, each with a box, a score and 5 landmarks; `exclude`: boxes of faces
        already found there (MtcnnDetector.detect)."""
        return self.detector.detect(image, exclude)

    def confirm(self, image: np.ndarray, boxes: Sequence[tuple[float, float, float, float]]) -> list[Detection | None]:
        """The face at each box (where one was a moment ago), or None: MtcnnDetector.confirm."""
        return self.detector.confirm(image, boxes)

    def assess(self, image: np.ndarray, detection: Detection) -> Quality:
        """The quality gate's verdict on one detected face."""
        return assess(image, detection.box, detection.landmarks, detection.score, self.config.quality)

    def align(self, image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
        """Aligned chips (N, H, W, 3) uint8 RGB in the embedder's geometry."""
        return self.align_many([(image, det) for det in detections])

    def align_many(self, items: Sequence[tuple[np.ndarray, Detection]]) -> np.ndarray:
        """Aligned chips (N, H, W, 3) uint8 RGB for faces of any number of images, in the order of `items`,
        in the embedder's geometry (an ensemble's first member's; `member_chips` gives each member's)."""
        return align_many(items, self.members[0].embedder.spec, self.shape_predictor)

    def member_chips(self, items: Sequence[tuple[np.ndarray, Detection]]) -> list[np.ndarray]:
        """Each member's aligned chips for `items` (one array for a single model), aligned once per geometry."""
        if isinstance(self.embedder, EnsembleEmbedder):
            return self.embedder.chips(items)
        return [self.align_many(items)]

    def embed(
        self, items: Sequence[tuple[np.ndarray, Detection]], *, look_again: LookAgain | None = None
    ) -> np.ndarray:
        """Embeddings (N, D) for faces from any number of images (for example several cameras), in one batch.

        `look_again`: a second look for some faces (see Embedder.embed_chips): given the plain
        embeddings, a boolean mask of the faces to embed with their mirror image too. An ensemble
        embeds them with each member and joins the members' embeddings (engines/ensemble.py)."""
        if isinstance(self.embedder, EnsembleEmbedder):
            return self.embedder.embed(items, look_again)
        return self.embedder.embed_chips(self.align_many(items), look_again=look_again)

    def analyze(self, image: np.ndarray, embed_rejected: bool = False) -> list[AnalyzedFace]:
        """Detect, judge and embed every face in one image; faces that fail the quality gate
        get no embedding unless `embed_rejected`."""
        image = check_image(image)
        dets = self.detector.detect(image)
        verdicts = [self.assess(image, d) for d in dets]
        todo = [i for i, q in enumerate(verdicts) if q.ok or embed_rejected]
        embs = self.embed([(image, dets[i]) for i in todo]) if todo else np.zeros((0, self.embedding_dim), np.float32)
        by_index = dict(zip(todo, embs))
        return [
            AnalyzedFace(d.box, d.score, d.landmarks, q, by_index.get(i))
            for i, (d, q) in enumerate(zip(dets, verdicts))
        ]
