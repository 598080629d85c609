"""`engines`: prepare and inspect the face models on a unit or an HQ workstation."""

from __future__ import annotations

import json
import logging
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
@click.option(
    "--precision",
    type=click.Choice(["fp16", "fp32", "int8"]),
    default="fp16",
    show_default=True,
    help="int8 also quantises (ONNX Runtime) or calibrates (TensorRT) the embedder",
)
def build(cache_dir: Path | None, rebuild: bool, backend: str, precision: str) -> None:
    """Convert the default models to ONNX (and TensorRT engines where TensorRT is present).

    Run once by the installer; later starts reuse the cache.

    Example: engines build --cache-dir /var/cache/checkpoint --precision int8
    """
    from engines.cache import ensure_default_models
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine

    try:
        models = ensure_default_models(cache_dir, rebuild=rebuild)
        engine = FaceEngine.load(EngineConfig(cache_dir=cache_dir, backend=backend, precision=precision))
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"detector: {', '.join(str(p) for p in models.detector.values())}")
    click.echo(f"embedder: {models.embedder} ({engine.model_id}, {engine.embedder.backend.name}, {precision})")
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
