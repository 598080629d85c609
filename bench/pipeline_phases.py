"""The pipeline bench's phases; each runs in its own process (bench/pipeline.py starts them) so its
CPU use and peak RSS are its own."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.pipeline_scene import FPS, PEER_TOLERANCE, SIZE, decode, judge

LIVE_FPS = 5.0


def _usage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0


def engine_config(args: argparse.Namespace) -> Any:
    """The EngineConfig of the run: --config's `[engine]` table, else the defaults."""
    from engines.config import EngineConfig, load_engine_config

    return load_engine_config(args.config) if args.config else EngineConfig()


class StageClock:
    """Wall time spent in each stage of a live run, summed over the threads that run it: detection
    (searches and confirmations), and per embed batch the alignment and each model's network, so a run
    says where its time went. Wall, not CPU time: ONNX Runtime runs a network on its own pool threads,
    which the calling thread's CPU time would leave out."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.faces: dict[str, int] = {}
        self._lock = threading.Lock()

    def wrap(self, stage: str, fn: Any, faces_arg: bool = False) -> Any:
        """`fn`, timed under `stage`; `faces_arg`: its first argument's length counts faces."""

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + dt
                    self.calls[stage] = self.calls.get(stage, 0) + 1
                    if faces_arg:
                        self.faces[stage] = self.faces.get(stage, 0) + len(a[0])

        return timed

    def instrument(self, engine: Any) -> None:
        """Time `engine`'s detection, its embed calls, their alignment and each member's network."""
        engine.detect = self.wrap("detect", engine.detect)
        engine.confirm = self.wrap("confirm", engine.confirm)
        engine.embed = self.wrap("embed (all)", engine.embed, faces_arg=True)
        if engine.is_ensemble:
            engine.embedder._align = self.wrap("embed: align", engine.embedder._align, faces_arg=True)
        else:
            engine.align_many = self.wrap("embed: align", engine.align_many, faces_arg=True)
        for m in engine.members:
            m.embedder.outputs = self.wrap(f"embed: network {m.name}", m.embedder.outputs, faces_arg=True)

    def report(self, frames: int) -> dict[str, dict[str, float]]:
        """Per stage: seconds, calls, ms per analysed frame and, where counted, faces and ms per face."""
        out = {}
        for stage, sec in sorted(self.seconds.items()):
            row = {"seconds": round(sec, 2), "calls": self.calls[stage], "ms_per_frame": round(1e3 * sec / frames, 2)}
            if self.faces.get(stage):
                row.update(faces=self.faces[stage], ms_per_face=round(1e3 * sec / self.faces[stage], 2))
            out[stage] = row
        return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- phases (run in child processes) ---------------------------------------------------------------


def _watchlist(plan: dict[str, Any], work: Path, engine: Any, threshold: float | None = None) -> Any:
    from matching.matcher import Matcher
    from testing.demo import apply_watchlist, build_watchlist
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    photos = {pid: [Path(p) for p in ps] for pid, ps in plan["photos"].items()}
    root_pub, bundle = build_watchlist(
        work / "wl", engine, photos, default_threshold=plan["threshold"] if threshold is None else threshold
    )
    store = work / "wl" / "unit.db"
    apply_watchlist(store, root_pub, bundle, engine.model_id, engine.embedding_dim)
    matcher = Matcher(dim=engine.embedding_dim)
    wl = Watchlist(WatchlistConfig(root_key=root_pub, store=store), matcher, model_id=engine.model_id)
    wl.start()
    wl.close()
    return matcher


def _with_distractors(matcher: Any, plan: dict[str, Any]) -> Any:
    """A matcher holding the enrolled people and the distractor children (plan["distractors"])."""
    from matching.matcher import Matcher, TemplateIndex

    index = matcher.index
    d = np.load(plan["distractors"]["path"])
    ids = [p for p in index.persons() for _ in range(len(index.templates_of(p)))] + [str(x) for x in d["ids"]]
    emb = np.vstack([np.vstack([index.templates_of(p) for p in index.persons()]), d["emb"]])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Matcher(
        TemplateIndex.build(
            ids, emb, version=index.version, model_id=index.model_id, default_threshold=index.default_threshold
        ),
        dim=index.dim,
    )


def _variant(name: str, gating: dict[str, str] | None = None) -> tuple[Any, Any]:
    """(DecisionConfig, AnalysisConfig) of a variant: "after" the unit as it is, "before" as it was
    (position-only tracks, any one face decides; testing.gate.LEGACY_*); `gating`: [analysis.gating]
    settings other than the defaults (edge.regions)."""
    from edge.analysis import AnalysisConfig
    from edge.decision import DecisionConfig
    from edge.regions import GatingConfig
    from edge.tracker import TrackerConfig
    from testing.gate import LEGACY_MATCHING, LEGACY_TRACKER

    where = GatingConfig.model_validate(gating or {}, strict=False)
    if name == "before":
        return DecisionConfig(cooldown_s=0.0, **LEGACY_MATCHING), AnalysisConfig(
            tracker=TrackerConfig(**LEGACY_TRACKER), gating=where
        )
    return DecisionConfig(cooldown_s=0.0), AnalysisConfig(gating=where)


def _gating_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """Where the detector looked (edge.regions): frames searched whole, in regions, the mean share of the
    frame searched, and the followed faces confirmed without a search."""
    return {k: stats[k] for k in ("frames_full", "frames_regions", "searched_share", "faces_confirmed")}


def _run_clip(
    engine: Any,
    matcher: Any,
    frames: list[np.ndarray],
    plan: dict[str, Any],
    variant: str,
    gating: dict[str, str] | None = None,
) -> dict:
    from edge.frame import Frame
    from edge.pipeline import CameraSpec, Pipeline
    from edge.sinks import MemorySink

    t0 = 1_700_000_000.0
    sink = MemorySink()

    matching, analysis = _variant(variant, gating)
    pipe = Pipeline(
        unit_id="bench",
        cameras=[CameraSpec("cam", None, float(FPS))],
        engine=engine,  # type: ignore[arg-type]
        matcher=matcher,
        sinks=[sink],
        matching=matching,
        analysis=analysis,
    )
    cpu0, _ = _usage()
    w0 = time.perf_counter()
    for i, img in enumerate(frames):
        pipe.process_frame(Frame("cam", i, t0 + i / FPS, img))
    wall = time.perf_counter() - w0
    cpu1, peak = _usage()
    st = pipe.stats()["cam"]
    return {
        "seconds": wall,
        "cpu": cpu1 - cpu0,
        "peak": peak,
        "stats": st,
        "hits": judge([(h.captured_at - t0, h.person_id, h.box) for h in sink.hits], plan),
    }


def phase_ours(plan: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from engines.face_engine import FaceEngine

    engine = FaceEngine.load(engine_config(args))
    matcher = _watchlist(plan, work, engine, args.threshold)
    frames = decode(plan["clip"])
    engine.analyze(frames[0])  # warm-up, not timed
    r = _run_clip(engine, matcher, frames, plan, "after", dict(kv.split("=", 1) for kv in args.gating))
    wall, st = r["seconds"], r["stats"]
    out = {
        "frames": len(frames),
        "seconds": wall,
        "frames_per_s": len(frames) / wall,
        "faces": st["faces"],
        "faces_per_s": st["faces"] / wall,
        "embedded": st["embedded"],
        **_gating_figures(st),
        "cpu_cores_used": r["cpu"] / wall,
        "peak_rss_mb": r["peak"],
        "hits": r["hits"],
        "threshold": matcher.default_threshold,
        "model_id": engine.model_id,
    }
    if plan.get("distractors"):
        crowded = _with_distractors(matcher, plan)
        variants: dict[str, Any] = {}
        # Before and after, with and without the distractors, on the same frames in the same process.
        for name in ("before", "after", "before+distractors", "after+distractors"):
            m = crowded if name.endswith("+distractors") else matcher
            r = _run_clip(engine, m, frames, plan, name.split("+")[0])
            variants[name] = {**r["hits"], "embedded": r["stats"]["embedded"], "persons_listed": m.index.n_persons}
        out["variants"] = variants
        out["distractors"] = {k: v for k, v in plan["distractors"].items() if k != "path"}
    return out


def phase_gate(plan: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The gate scenario (testing/gate.py) at 5 fps, as the unit was (before) and is (after)."""
    from edge.decision import DecisionConfig
    from edge.tracker import TrackerConfig
    from engines.face_engine import FaceEngine
    from matching.matcher import Matcher
    from testing.demo import apply_watchlist, build_watchlist
    from testing.gate import LEGACY_MATCHING, LEGACY_TRACKER, gate_scene, queue_scene, run_gate_clip
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    engine = FaceEngine.load(engine_config(args))
    out: dict[str, Any] = {"analysis_fps": FPS / 2, "model_id": engine.model_id}
    # The gate scenario, then the case issue 9 measured (six enrolled people, 2.5 s each, 0.5 s apart).
    for key, scene in (
        ("gate", gate_scene(engine, work / "gate.mp4")),
        ("six_in_a_row", queue_scene(engine, work / "six.mp4")),
    ):
        wl_dir = work / f"{key}-wl"
        root, bundle = build_watchlist(
            wl_dir, engine, {p: [i] for p, i in scene.enrolment.items()}, default_threshold=scene.threshold
        )
        store = wl_dir / "unit.db"
        apply_watchlist(store, root, bundle, engine.model_id, engine.embedding_dim)
        matcher = Matcher(dim=engine.embedding_dim)
        wl = Watchlist(WatchlistConfig(root_key=root, store=store), matcher, model_id=engine.model_id)
        wl.start()
        wl.close()
        part: dict[str, Any] = {"scene": scene.plan()}
        for name, matching, tracker in (
            ("before", DecisionConfig(**LEGACY_MATCHING), TrackerConfig(**LEGACY_TRACKER)),
            ("after", DecisionConfig(), TrackerConfig()),
        ):
            result, pipe = run_gate_clip(engine, scene, matcher, matching, tracker)
            result.update(_gating_figures(pipe.stats()["gate"]))
            result["people_checked_of_shown"] = f"{result['people_checked']}/{result['people_shown']}"
            part[name] = result
        if key == "gate":
            out.update(part)
        else:
            out[key] = part
    return out


def phase_peer(plan: dict[str, Any], _work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import face_recognition

    known, names = [], []
    for pid, paths in plan["photos"].items():
        for p in paths:
            encs = face_recognition.face_encodings(face_recognition.load_image_file(p))
            if encs:
                known.append(encs[0])
                names.append(pid)
    frames = decode(plan["clip"])[:: args.peer_every]
    events: list[tuple[float, str, tuple[float, float, float, float]]] = []
    faces = 0
    cpu0, _ = _usage()
    w0 = time.perf_counter()
    for k, rgb in enumerate(frames):
        # As in the package's examples/facerec_from_video_file.py (the frame is already RGB here).
        locations = face_recognition.face_locations(rgb)
        encodings = face_recognition.face_encodings(rgb, locations)
        faces += len(locations)
        for (top, right, bottom, left), enc in zip(locations, encodings):
            match = face_recognition.compare_faces(known, enc, tolerance=PEER_TOLERANCE)
            if any(match):
                # The example names the first known face that matches.
                events.append((k * args.peer_every / FPS, names[match.index(True)], (left, top, right, bottom)))
    wall = time.perf_counter() - w0
    cpu1, peak = _usage()
    return {
        "frames": len(frames),
        "every_nth_frame": args.peer_every,
        "seconds": wall,
        "frames_per_s": len(frames) / wall,
        "faces": faces,
        "faces_per_s": faces / wall,
        "cpu_cores_used": (cpu1 - cpu0) / wall,
        "peak_rss_mb": peak,
        "enrolled_photos_encoded": len(known),
        "hits": judge(events, plan),
    }


def _cameras(plan: dict[str, Any], work: Path, source: str, n: int) -> tuple[list[str], Any, str]:
    """Camera URLs for the live runs: RTSP streams of the clip from the test RTSP server (as a unit
    sees cameras), or the clip file itself, looped, where GStreamer's RTSP server is not installed."""
    if source == "rtsp":
        from testing.rtsp import RtspServer, gst_rtsp_problem

        problem = gst_rtsp_problem()
        if problem is None:
            srv = RtspServer({f"cam{i}": plan["clip"] for i in range(n)}, work).start()
            return [srv.url(f"cam{i}") for i in range(n)], srv, "rtsp (test RTSP server, clip looped)"
        print(f"no RTSP server ({problem}); reading the clip file instead", file=sys.stderr)
    return [plan["clip"]] * n, None, "file (clip looped, reopened at each end)"


def _live(
    plan: dict[str, Any],
    work: Path,
    seconds: float,
    sample_every: float,
    detect_workers: int,
    source: str,
    cameras: int,
    config: Any,
    threshold: float | None,
) -> dict[str, Any]:
    from edge.analysis import AnalysisConfig
    from edge.camera.capture import CameraReader
    from edge.camera.config import CaptureConfig
    from edge.decision import DecisionConfig
    from edge.pipeline import CameraSpec, Pipeline
    from edge.sinks import MemorySink
    from engines.face_engine import FaceEngine

    engine = FaceEngine.load(config)
    matcher = _watchlist(plan, work, engine, threshold)
    clock = StageClock()
    clock.instrument(engine)
    urls, server, source_note = _cameras(plan, work, source, cameras)
    readers = [
        CameraReader(CaptureConfig(id=f"cam{i}", url=url, realtime=True, loop=True)) for i, url in enumerate(urls)
    ]

    counted = MemorySink()

    pipe = Pipeline(
        unit_id="bench",
        cameras=[CameraSpec(r.camera_id, r, LIVE_FPS) for r in readers],
        engine=engine,
        matcher=matcher,
        sinks=[counted],
        matching=DecisionConfig(cooldown_s=0.0),
        analysis=AnalysisConfig(detect_workers=detect_workers),
    )
    for r in readers:
        r.start()
    pipe.start()
    samples: list[dict[str, Any]] = []
    cpu0, _ = _usage()
    w0 = time.monotonic()
    stop = threading.Event()
    try:
        while not stop.wait(sample_every):
            now = time.monotonic() - w0
            st = pipe.stats()
            samples.append(
                {
                    "t": round(now, 1),
                    "rss_mb": round(_rss_mb(), 1),
                    "lag_s": {c: s["lag_s"] for c, s in st.items()},
                    "analysed": {c: s["frames_analysed"] for c, s in st.items()},
                    "fps_in": {r.camera_id: r.state.fps for r in readers},
                }
            )
            if now >= seconds:
                break
    finally:
        wall = time.monotonic() - w0
        cpu1, peak = _usage()
        stats = pipe.stats()
        latencies = [x for an in pipe.analysers.values() for x in an.stats.hit_latency_s]
        pipe.stop()
        for r in readers:
            r.stop()
        if server is not None:
            server.stop()
    return {
        "source": source_note,
        "samples": samples,
        "wall": wall,
        "cpu": cpu1 - cpu0,
        "peak": peak,
        "stats": stats,
        "latencies": latencies,
        "hits": len(counted.hits),
        "model_id": engine.model_id,
        "threshold": matcher.default_threshold,
        "stages": clock.report(max(1, sum(s["frames_analysed"] for s in stats.values()))),
    }


def phase_live(plan: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    r = _live(
        plan,
        work,
        args.live_seconds,
        1.0,
        args.detect_workers,
        args.source,
        args.cameras,
        engine_config(args),
        args.threshold,
    )
    samples = r["samples"]
    # Judge the steady state: skip the first 5 s (models warming, cameras connecting).
    steady = [s for s in samples if s["t"] >= 5.0]
    per_cam: dict[str, dict[str, float]] = {}
    growing = False
    for cam in r["stats"]:
        t = np.array([s["t"] for s in steady])
        lag = np.array([s["lag_s"][cam] for s in steady])
        n = np.array([s["analysed"][cam] for s in steady])
        fps = float((n[-1] - n[0]) / (t[-1] - t[0])) if len(t) > 1 else 0.0
        slope = float(np.polyfit(t, lag, 1)[0]) if len(t) > 2 else 0.0
        third = max(1, len(lag) // 3)
        first, last = float(lag[:third].mean()), float(lag[-third:].mean())
        # Growing: lag rising by more than a frame period over the run, not just jitter.
        grows = slope * (t[-1] - t[0]) > 1.0 / LIVE_FPS and last > first + 0.1 if len(t) > 2 else False
        growing = growing or grows
        per_cam[cam] = {
            "analysed_fps": round(fps, 2),
            "lag_mean_s": round(float(lag.mean()), 3),
            "lag_max_s": round(float(lag.max()), 3),
            "lag_slope_s_per_s": round(slope, 5),
            "lag_first_third_s": round(first, 3),
            "lag_last_third_s": round(last, 3),
            "frames_skipped": r["stats"][cam]["frames_skipped"],
            "embeds_dropped": r["stats"][cam]["embeds_dropped"],
            **{k: r["stats"][cam][k] for k in ("faces", "embedded", "second_looks", "rechecks", "splits")},
            **_gating_figures(r["stats"][cam]),
        }
    lat = np.array(r["latencies"], dtype=np.float64)
    sustained = all(c["analysed_fps"] >= 0.95 * LIVE_FPS for c in per_cam.values()) and not growing
    return {
        "cameras": args.cameras,
        "model_id": r["model_id"],
        "source": r["source"],
        "detect_workers": args.detect_workers,
        "resolution": f"{SIZE[0]}x{SIZE[1]}",
        "stream_fps": FPS,
        "analysis_fps": LIVE_FPS,
        "threshold": r["threshold"],
        "seconds": round(r["wall"], 1),
        "per_camera": per_cam,
        "sustained_without_growing_lag": sustained,
        "hits": r["hits"],
        "frame_to_hit_latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
        "frame_to_hit_latency_p99_s": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
        "cpu_cores_used": round(r["cpu"] / r["wall"], 2),
        # Comparable across loads where rates are not: the process's CPU per frame it analysed.
        "cpu_ms_per_analysed_frame": round(
            1e3 * r["cpu"] / max(1, sum(s["frames_analysed"] for s in r["stats"].values())), 2
        ),
        "stages": r["stages"],
        "peak_rss_mb": round(r["peak"], 1),
        "note": f"CPU includes decoding {args.cameras} H.264 720p streams at 10 fps (a Jetson decodes in hardware)",
    }


def phase_soak(plan: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    r = _live(
        plan,
        work,
        args.soak_minutes * 60.0,
        10.0,
        args.detect_workers,
        args.source,
        args.cameras,
        engine_config(args),
        args.threshold,
    )
    rss = [(s["t"], s["rss_mb"]) for s in r["samples"]]
    # RSS swings by tens of MB as frames and batches come and go: compare averages, not two samples.
    # Start: the second minute (models loaded, caches filled); end: the last tenth of the run.
    start = [m for t, m in rss if 60.0 <= t < 120.0] or [m for _, m in rss[:1]]
    steady = [(t, m) for t, m in rss if t >= 60.0]
    end = [m for _, m in steady[-max(1, len(steady) // 10) :]] or start
    base, last = float(np.mean(start)), float(np.mean(end))
    slope = float(np.polyfit([t for t, _ in steady], [m for _, m in steady], 1)[0]) * 3600 if len(steady) > 2 else 0.0
    return {
        "minutes": args.soak_minutes,
        "source": r["source"],
        "rss_second_minute_mb": round(base, 1),
        "rss_end_mb": round(last, 1),
        "rss_growth_pct": round(100.0 * (last - base) / base, 2),
        "rss_slope_mb_per_hour": round(slope, 1),
        "rss_samples": rss,
        "hits": r["hits"],
        "cpu_cores_used": round(r["cpu"] / r["wall"], 2),
    }


PHASES = {"ours": phase_ours, "peer": phase_peer, "live": phase_live, "soak": phase_soak, "gate": phase_gate}
