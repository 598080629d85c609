"""The face engine's known-answer test: its networks run on fixed check inputs and must give the
answers stored for their models.

Why: ONNX Runtime picks its kernels by CPU (engines/cpu.py), and an integer kernel that is right on
one CPU can be wrong on another (MLAS's AVX2 uint8 x int8 kernels saturate pair sums in int16). A
unit or an HQ workstation that computes wrong embeddings matches nobody, or the wrong person, and
says nothing. So before it trusts its models it runs them on inputs whose right outputs were
recorded (`engines selftest --record`) and stored in `engines/answers/<model>.json`, one file per
converted model (the MTCNN networks; the default embedder), shipped with the package.

The check inputs are made here, bit for bit the same on every machine: smooth face-like patterns
from numpy's PCG64 generator drawn with integer arithmetic only (no floating-point maths that could
round differently from one CPU or libm to another), plus worst-case pictures (large areas at 0 and
255, hard edges) where saturating kernels go wrong first. No media file and no optional package
(scikit-image) is needed.

Tolerances (`TOLERANCES`) let float kernels differ in summation order (AVX2 against AVX-512 FMA,
ARM NEON), int8 and fp16 models differ from the float32 answers as much as their quantisation
does, and fail a kernel that saturates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.cpu import cpu_features
from engines.errors import EngineError

log = logging.getLogger(__name__)

ANSWERS_DIR = Path(__file__).with_name("answers")
# Bump when check_inputs() makes other inputs: stored answers of an older recipe are then refused.
RECIPE = 1
SEED = 20261206
_PIXEL_MEAN = 127.5  # MTCNN's input normalisation (engines/detector.py)
_PIXEL_SCALE = 0.0078125
_PNET_SIDE = 40  # one P-Net map of 15 x 15 cells: every P-Net layer, few stored numbers
_CROPS = 4  # R-Net and O-Net crops, and embedder chips, per check


class SelfTestError(EngineError):
    """A known-answer check gave a wrong answer: this machine computes the models wrongly and must not
    be trusted with faces. The message names the check, expected and measured values, the tolerance
    and the CPU features seen."""


class NoAnswers(EngineError):
    """No stored answers for a model (a custom embedder, or a converter version without a recording)."""


@dataclass(frozen=True)
class Tolerance:
    """How far a network's outputs may stray from the stored float32 answers.

    `abs`: largest absolute difference of the detector's probabilities, box offsets and landmarks
    (all within about [-1, 1]); `cos`: least cosine between the stored and the measured raw embedder
    output; `norm`: largest relative difference of its length.
    """

    abs: float
    cos: float
    norm: float


# float32: the outputs of AVX-512 VNNI and of emulated AVX2 (`qemu-x86_64 -cpu Haswell`) differ by at
# most 1e-6 (`engines selftest` prints the worst figure); the limits leave room for ARM and other
# summation orders. int8: the 7-bit int8 embedder is 8.4e-4 from float32 (1 - cosine) on both CPUs;
# the old 8-bit one, wrong under AVX2, came to 0.977 and 0.94x the length on the harsh chip: the
# limits sit between (that of the engine's own int8 self-check, engines.int8.SELF_CHECK_MIN_COSINE,
# for the cosine). fp16 (TensorRT, GPUs): not measured here; fp16's 3 decimal digits, with margin.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(abs=1e-3, cos=0.9999, norm=1e-3),
    "fp16": Tolerance(abs=2e-2, cos=0.995, norm=2e-2),
    "int8": Tolerance(abs=1e-3, cos=0.99, norm=0.03),
}


@dataclass(frozen=True)
class SelfTestReport:
    """What a passed known-answer test checked, for the log line and the unit's status."""

    checks: tuple[str, ...]  # e.g. ("pnet", "rnet", "onet", "embedder")
    unchecked: tuple[str, ...]  # the parts ("detector", "embedder") without stored answers
    skipped: tuple[str, ...]  # for each of them, why
    precision: str  # the TOLERANCES key the engine was judged by
    worst: dict[str, float]  # per check, its worst figure (abs difference, or 1 - cosine)
    cpu_features: tuple[str, ...]
    duration_s: float


# ---- check inputs --------------------------------------------------------------------------------


def _upsample(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    """Integer bilinear upsampling of (n, gh, gw, c) int64 to (n, h, w, c): exact on every machine."""
    n, gh, gw, c = coarse.shape
    # Source position of each output pixel in 1/256ths of a coarse cell.
    ys = np.arange(h, dtype=np.int64) * (gh - 1) * 256 // max(1, h - 1)
    xs = np.arange(w, dtype=np.int64) * (gw - 1) * 256 // max(1, w - 1)
    y0, x0 = np.minimum(ys // 256, gh - 2), np.minimum(xs // 256, gw - 2)
    fy, fx = ys - y0 * 256, xs - x0 * 256
    top = (
        coarse[:, y0][:, :, x0] * (256 - fx)[None, None, :, None]
        + coarse[:, y0][:, :, x0 + 1] * fx[None, None, :, None]
    )
    bottom = (
        coarse[:, y0 + 1][:, :, x0] * (256 - fx)[None, None, :, None]
        + coarse[:, y0 + 1][:, :, x0 + 1] * fx[None, None, :, None]
    )
    return (top * (256 - fy)[None, :, None, None] + bottom * fy[None, :, None, None] + 32768) >> 16


def _inside_ellipse(h: int, w: int, cy: int, cx: int, ry: int, rx: int) -> np.ndarray:
    """(h, w) mask of the ellipse with centre and radii in pixels (integers)."""
    y = np.arange(h, dtype=np.int64)[:, None] - cy
    x = np.arange(w, dtype=np.int64)[None, :] - cx
    return (y * rx) ** 2 + (x * ry) ** 2 <= (rx * ry) ** 2


def face_patterns(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w, 3) uint8: smooth backgrounds with a face-like layout (a lit oval, darker eyes and
    mouth) at realistic values, the first ones plain, the last one harsh (clipped to 0 and 255,
    hard-edged blocks): the worst case for a kernel that saturates."""
    base = _upsample(rng.integers(40, 216, size=(n, 5, 5, 3)), h, w)
    skin = rng.integers(120, 200, size=(n, 1, 1, 3))
    face = _inside_ellipse(h, w, h * 55 // 100, w // 2, h * 42 // 100, w * 33 // 100)
    eyes = _inside_ellipse(h, w, h * 42 // 100, w * 35 // 100, h // 16, w // 10) | _inside_ellipse(
        h, w, h * 42 // 100, w * 65 // 100, h // 16, w // 10
    )
    mouth = _inside_ellipse(h, w, h * 75 // 100, w // 2, h // 20, w * 15 // 100)
    img = np.where(face[None, :, :, None], (base + 3 * skin) // 4, base)
    img = np.where((eyes | mouth)[None, :, :, None], img // 3, img)
    img = img + rng.integers(-8, 9, size=img.shape)
    harsh = (img[-1] - 128) * 4 + 128
    blocks = rng.integers(0, 2, size=(8, 8, 3)) * 255
    ys, xs = np.arange(h) * 8 // h, np.arange(w) * 8 // w
    img[-1] = np.where(face[:, :, None], harsh, blocks[ys][:, xs])
    return np.clip(img, 0, 255).astype(np.uint8)


def check_inputs(embedder_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The check inputs by network: uint8 RGB pictures (N, H, W, 3) -- pnet (1, 40, 40), rnet (4, 24, 24),
    onet (4, 48, 48), embedder (4, height, width) for the embedder's chip size (height, width)."""
    rng = np.random.Generator(np.random.PCG64(SEED))
    return {
        "pnet": face_patterns(rng, 1, _PNET_SIDE, _PNET_SIDE),
        "rnet": face_patterns(rng, _CROPS, 24, 24),
        "onet": face_patterns(rng, _CROPS, 48, 48),
        "embedder": face_patterns(rng, _CROPS, *embedder_size),
    }


def _mtcnn_input(pictures: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> the networks' float32 NCHW input, as MtcnnDetector feeds them."""
    out = np.ascontiguousarray(pictures.transpose(0, 3, 1, 2), dtype=np.float32)
    return (out - np.float32(_PIXEL_MEAN)) * np.float32(_PIXEL_SCALE)


# ---- running the engine's networks ---------------------------------------------------------------


NETWORKS = ("pnet", "rnet", "onet", "embedder")


def network_outputs(
    engine: Any, inputs: dict[str, np.ndarray] | None = None, nets: Sequence[str] = NETWORKS, member: Any = None
) -> dict[str, list[np.ndarray]]:
    """The check networks' outputs (`nets`) on the check inputs, as float32 arrays: the MTCNN stages'
    (in their session order: box offsets, [landmarks,] probabilities) and the embedder's raw output
    (`member`'s, one of engine.members; default the first)."""
    embedder = (member or engine.members[0]).embedder
    spec = embedder.spec
    inputs = inputs if inputs is not None else check_inputs((spec.input_height, spec.input_width))
    sessions = engine.detector.sessions
    out = {}
    for net in nets:
        if net == "embedder":
            out[net] = [np.asarray(embedder.raw(inputs[net]), dtype=np.float32)]
        else:
            out[net] = [
                np.asarray(a, dtype=np.float32) for a in sessions[net].run(None, {"input": _mtcnn_input(inputs[net])})
            ]
    return out


# ---- stored answers ------------------------------------------------------------------------------


def answers_key(model: str) -> str:
    """The file stem of a model's answers: its id or cache folder name with only [A-Za-z0-9._-]."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in model)


def detector_model(engine: Any) -> str:
    """The converted MTCNN's cache folder name (weights digest and converter version): its answers' key."""
    return engine.detector.model_name


def _precision(session_or_backend: Any, precision: str) -> str:
    """The TOLERANCES key for a network: float32 on ONNX Runtime's CPU provider, int8 for an int8
    embedder (`precision`: the one it runs at), fp16 on a GPU (TensorRT, or ONNX Runtime's CUDA
    provider, may use TF32 or fp16)."""
    if precision == "int8":
        return "int8"
    providers = getattr(session_or_backend, "get_providers", None)
    name = providers()[0] if providers else str(getattr(session_or_backend, "name", ""))
    return "float32" if "CPUExecutionProvider" in name else "fp16"


def _digest(inputs: dict[str, np.ndarray], nets: Sequence[str]) -> str:
    """SHA-256 of the check inputs of `nets`: stored with the answers, so inputs made differently
    elsewhere (another numpy's generator) are told apart from a wrong kernel."""
    h = hashlib.sha256()
    for net in nets:
        h.update(np.ascontiguousarray(inputs[net]).tobytes())
    return h.hexdigest()


def _encode(a: np.ndarray) -> dict[str, Any]:
    return {"shape": list(a.shape), "values": [float(f"{v:.7g}") for v in a.astype(np.float64).ravel()]}


def _decode(d: dict[str, Any]) -> np.ndarray:
    return np.asarray(d["values"], dtype=np.float64).reshape(d["shape"])


def _member_inputs(member: Any) -> dict[str, np.ndarray]:
    spec = member.embedder.spec
    return check_inputs((spec.input_height, spec.input_width))


def _check_name(engine: Any, member: Any) -> str:
    """A member's check in reports: "embedder" for a single model, "embedder:<name>" in an ensemble."""
    return "embedder" if len(engine.members) == 1 else f"embedder:{member.name}"


def record_answers(engine: Any, folder: Path = ANSWERS_DIR) -> list[Path]:
    """Write the engine's outputs on the check inputs as the right answers of its models (one JSON
    file for the MTCNN networks, one for each embedder), and return the files written.

    Record only from float32 models on ONNX Runtime's CPU provider (NoAnswers otherwise): the
    tolerances are measured from float32 answers.
    """
    det_session = engine.detector.sessions["pnet"]
    for m in engine.members:
        if _precision(det_session, "") != "float32" or _precision(m.embedder.backend, m.precision) != "float32":
            raise NoAnswers(
                f"answers are recorded from float32 models on ONNX Runtime's CPU provider; embedder {m.model_id} "
                f"runs on {m.embedder.backend.name} at precision {m.precision}: "
                'record with [engine] backend = "onnxruntime", precision = "fp32"'
            )
    import onnxruntime

    recorded = {
        "by": "engines selftest --record",
        "onnxruntime": onnxruntime.__version__,
        "machine": platform.machine(),
        "cpu_features": cpu_features(),
        "at": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    detector_inputs = _member_inputs(engine.members[0])
    detector_out = network_outputs(engine, detector_inputs, ("pnet", "rnet", "onet"))
    files = {detector_model(engine): (detector_inputs, detector_out)}
    for m in engine.members:
        inputs = _member_inputs(m)
        files[m.model_id] = (inputs, network_outputs(engine, inputs, ("embedder",), m))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model, (inputs, outputs) in files.items():
        path = folder / f"{answers_key(model)}.json"
        body = {
            "model": model,
            "recipe": RECIPE,
            "seed": SEED,
            "inputs_sha256": _digest(inputs, list(outputs)),
            "recorded": recorded,
            "outputs": {net: [_encode(a) for a in arrays] for net, arrays in outputs.items()},
        }
        path.write_text(json.dumps(body, separators=(",", ":")) + "\n")
        written.append(path)
    return written


def load_answers(model: str, folder: Path = ANSWERS_DIR) -> tuple[dict[str, list[np.ndarray]], str]:
    """The stored outputs of `model` by network, and the SHA-256 of the inputs they answer; NoAnswers
    when there are none for it (or for this version of the check inputs)."""
    path = folder / f"{answers_key(model)}.json"
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoAnswers(f"no stored answers for model {model} ({path} is missing)") from None
    except (OSError, ValueError) as exc:
        raise NoAnswers(f"{path}: cannot read the stored answers: {exc}") from None
    if body.get("recipe") != RECIPE or body.get("model") != model:
        raise NoAnswers(
            f"{path} holds answers for model {body.get('model')!r}, check inputs version {body.get('recipe')}; "
            f"this engine needs {model!r}, version {RECIPE}: record them again with `engines selftest --record`"
        )
    return {net: [_decode(a) for a in arrays] for net, arrays in body["outputs"].items()}, body["inputs_sha256"]


# ---- the check -----------------------------------------------------------------------------------


def _features_text(features: Sequence[str]) -> str:
    return ", ".join(features) or "none read"


def _compare_detector(got: list[np.ndarray], want: list[np.ndarray], tol: Tolerance) -> tuple[float, str]:
    """(worst absolute difference, what was wrong or "") of one MTCNN network's outputs."""
    if [a.shape for a in got] != [a.shape for a in want]:
        return float("inf"), f"output shapes {[a.shape for a in got]}, stored {[a.shape for a in want]}"
    worst, where = 0.0, ""
    for k, (g, w) in enumerate(zip(got, want)):
        diff = np.abs(g.astype(np.float64) - w)
        if not np.all(np.isfinite(diff)):
            return float("inf"), f"output {k} holds NaN or infinite values"
        i = int(np.argmax(diff))
        if diff.flat[i] > worst:
            worst = float(diff.flat[i])
            where = f"output {k} at {np.unravel_index(i, w.shape)}: expected {w.flat[i]:.6f}, got {g.flat[i]:.6f}"
    if worst > tol.abs:
        return worst, f"{where}, off by {worst:.2e} (tolerance {tol.abs:g})"
    return worst, ""


def _compare_embedder(got: np.ndarray, want: np.ndarray, tol: Tolerance) -> tuple[float, str]:
    """(worst 1 - cosine, what was wrong or "") of the embedder's raw outputs, chip by chip."""
    if got.shape != want.shape:
        return float("inf"), f"output shape {got.shape}, stored {want.shape}"
    g = got.astype(np.float64)
    if not np.all(np.isfinite(g)):
        return float("inf"), "the output holds NaN or infinite values"
    gn, wn = np.linalg.norm(g, axis=1), np.linalg.norm(want, axis=1)
    cos = (g * want).sum(axis=1) / np.maximum(gn * wn, 1e-30)
    ratio = gn / np.maximum(wn, 1e-30)
    worst = float(1.0 - cos.min())
    for i in range(len(g)):
        if cos[i] < tol.cos or abs(ratio[i] - 1.0) > tol.norm:
            return worst, (
                f"chip {i}: cosine to the stored output {cos[i]:.6f} (tolerance >= {tol.cos:g}), "
                f"length {ratio[i]:.4f} of the stored one (tolerance 1 +- {tol.norm:g})"
            )
    return worst, ""


def check_engine(engine: Any, folder: Path = ANSWERS_DIR) -> SelfTestReport:
    """Run the engine's networks on the check inputs and compare with the stored answers: the MTCNN
    networks and each embedder (every member of an ensemble, by its own model id).

    Raises SelfTestError at the first network whose outputs are outside the tolerance of its
    precision. A model without stored answers (a custom embedder) is skipped, logged at INFO and
    named in the report's `skipped`; the others are still checked.
    """
    started = time.perf_counter()
    features = tuple(cpu_features())
    checks, unchecked, skipped, worst = [], [], [], {}
    precisions = set()
    sessions = engine.detector.sessions
    # (part, model, the member whose embedder it is or None for the detector); members are the engine's (Any)
    parts: list[tuple[str, str, Any]] = [("detector", detector_model(engine), None)]
    parts += [(_check_name(engine, m), m.model_id, m) for m in engine.members]
    for part, model, member in parts:
        try:
            answers, digest = load_answers(model, folder)
        except NoAnswers as exc:
            log.info("the %s has no known answers; it is not checked: %s", part, exc)
            unchecked.append(part)
            skipped.append(f"{part} {model}: {exc}")
            continue
        inputs = _member_inputs(member or engine.members[0])
        if _digest(inputs, list(answers)) != digest:
            raise SelfTestError(
                f"known-answer test failed: the check inputs made here differ from those the answers of {model} "
                f"were recorded with (numpy {np.__version__}'s PCG64 generator gave other values); the answers "
                "cannot be compared. Install the numpy version the project was tested with, or record the answers "
                "again on a trusted machine (`engines selftest --record`)"
            )
        nets = [net for net in NETWORKS if net in answers]
        for net, got in network_outputs(engine, inputs, nets, member).items():
            if net == "embedder":
                precision = _precision(member.embedder.backend, member.precision)
                name = part
                figure, problem = _compare_embedder(got[0], answers[net][0], TOLERANCES[precision])
            else:
                precision = _precision(sessions[net], "")
                name = net
                figure, problem = _compare_detector(got, answers[net], TOLERANCES[precision])
            if problem:
                raise SelfTestError(
                    f"known-answer test failed: {name} ({model}, {precision}) gave a wrong answer on the check "
                    f"inputs: {problem}. CPU features seen: {_features_text(features)}. This machine computes the "
                    "model differently from where its answers were recorded; do not use it for faces until that is "
                    "resolved (docs/edge.md, 'Self-test at start')"
                )
            worst[name] = figure
            checks.append(name)
            precisions.add(precision)
    return SelfTestReport(
        checks=tuple(checks),
        unchecked=tuple(unchecked),
        skipped=tuple(skipped),
        precision="+".join(sorted(precisions)) or "-",
        worst=worst,
        cpu_features=features,
        duration_s=time.perf_counter() - started,
    )
