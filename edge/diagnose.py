"""Why a face did or did not hit: run a clip through the unit's analysis and tell each track's story.

`edge analyse --config unit.toml CLIP` uses it. The clip goes through the same pipeline as a
camera (the config's [engine], [matching], [analysis] and watchlist store), synchronously, at the
first camera's analysis rate; hits are printed, never sent or stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.analysis import TrackReport
from edge.sinks import MemorySink


class DiagnoseError(RuntimeError):
    """The clip could not be read or the unit's models or watchlist could not be opened."""


@dataclass
class ClipDiagnosis:
    """What the analysis of a clip found: every track's story and the hits it would have sent."""

    clip: Path
    fps: float
    frames: int
    tracks: list[TrackReport]
    hits: list[Any]
    watchlist_version: int
    persons: int


def analyse_clip(cfg: Any, clip: Path, fps: float | None = None, engine: Any = None) -> ClipDiagnosis:
    """Run `clip` through the analysis of unit config `cfg` (an edge.config.UnitConfig) at `fps`
    (default: the first camera's analysis_fps); return the tracks and would-be hits."""
    import av

    from edge.frame import Frame
    from edge.pipeline import CameraSpec, Pipeline
    from matching.matcher import Matcher

    if not clip.is_file():
        raise DiagnoseError(f"{clip}: no such video file")
    rate = float(fps or cfg.cameras[0].analysis_fps)
    if rate <= 0:
        raise DiagnoseError(f"--fps must be positive, got {rate}")
    if engine is None:
        from engines.errors import EngineError
        from engines.face_engine import FaceEngine

        try:
            engine = FaceEngine.load(cfg.engine)
        except EngineError as exc:
            raise DiagnoseError(f"face models could not be loaded: {exc}") from exc
    matcher = Matcher(threshold=cfg.matching.threshold, dim=int(engine.embedding_dim))
    _load_watchlist(cfg, matcher, engine.model_id)

    sink = MemorySink()
    pipe = Pipeline(
        unit_id=cfg.unit.id,
        cameras=[CameraSpec("clip", None, rate)],  # type: ignore[arg-type]
        engine=engine,
        matcher=matcher,
        sinks=[sink],
        matching=cfg.matching,
        analysis=cfg.analysis,
        keep_reports=True,
    )
    frames = 0
    next_t = 0.0
    try:
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            for i, f in enumerate(container.decode(stream)):
                t = float(f.time) if f.time is not None else i / float(stream.average_rate or 25)
                if t + 1e-6 < next_t:
                    continue
                next_t = t + 1.0 / rate
                pipe.process_frame(Frame("clip", i, t, f.to_ndarray(format="rgb24")))
                frames += 1
    except av.error.FFmpegError as exc:
        raise DiagnoseError(f"{clip}: cannot decode the video: {exc}") from exc
    return ClipDiagnosis(
        clip=clip,
        fps=rate,
        frames=frames,
        tracks=pipe.analysers["clip"].finish_all(),
        hits=sink.hits,
        watchlist_version=matcher.version,
        persons=matcher.index.n_persons,
    )


def _load_watchlist(cfg: Any, matcher: Any, model_id: str) -> None:
    from watchlist.format.errors import WatchlistError
    from watchlist.unit.apply import Watchlist

    try:
        wl = Watchlist(cfg.watchlist, matcher, model_id=model_id)
        wl.start()
        wl.close()
    except WatchlistError as exc:
        raise DiagnoseError(f"the watchlist could not be opened: {exc}") from exc


def format_diagnosis(d: ClipDiagnosis) -> str:
    """A table: one line per track (time span in the clip, embeddings, best person and score, decision)."""
    lines = [
        f"{d.clip}: {d.frames} frames analysed at {d.fps:g} fps; watchlist version {d.watchlist_version} "
        f"({d.persons} persons); {len(d.tracks)} tracks, {len(d.hits)} hits",
        f"{'track':>5}  {'from-to s':>11}  {'embeds':>8}  {'best person':<24} {'score/threshold':<17}  decision",
    ]
    for r in d.tracks:
        span = f"{r.first_seen:5.1f}-{r.last_seen:5.1f}"
        emb = f"{r.embeds}+{r.rechecks}" if r.rechecks else str(r.embeds)
        score = f"{r.best_score:.4f}/{r.threshold:.4f}" if r.best_score is not None and r.threshold is not None else "-"
        decision = r.decision
        if r.embeds == 0 and r.not_embedded:
            why = max(r.not_embedded.items(), key=lambda kv: kv[1])[0]
            decision = f"not embedded: {why}"
        split = f" (split from {r.split_from})" if r.split_from is not None else ""
        lines.append(
            f"{r.track_id:>5}  {span:>11}  {emb:>8}  {(r.best_person or '-')[:24]:<24} {score:<17}  {decision}{split}"
        )
    for h in d.hits:
        lines.append(f"hit at {h.captured_at:.1f} s: {h.person_id} score {h.score:.4f} (track {h.track_id})")
    return "\n".join(lines)
