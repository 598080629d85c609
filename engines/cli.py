"""`engines`: prepare and inspect the face models on a unit or an HQ workstation."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import click

from engines.errors import EngineError


@click.group()
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
def build(cache_dir: Path | None, rebuild: bool, backend: str) -> None:
    """Convert the default models to ONNX (and TensorRT engines where TensorRT is present).

    Run once by the installer; later starts reuse the cache.

    Example: engines build --cache-dir /var/cache/checkpoint
    """
    from engines.cache import ensure_default_models
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine

    try:
        models = ensure_default_models(cache_dir, rebuild=rebuild)
        engine = FaceEngine.load(EngineConfig(cache_dir=cache_dir, backend=backend))
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"detector: {', '.join(str(p) for p in models.detector.values())}")
    click.echo(f"embedder: {models.embedder} ({engine.model_id}, {engine.embedder.backend.name})")
    click.echo(f"landmarks: {models.landmarks}")


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
