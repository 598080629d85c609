"""The edge pipeline end to end against the loop most face_recognition users write, on the same clip.

Phases, each in its own process so CPU use and peak RSS are its own:

  ours   the clip's frames through edge.pipeline (detect, track, embed best faces, match, hits),
         every frame, as fast as it goes: analysed frames/s, faces/s, CPU use, peak RSS, hits
         judged against the clip's ground truth (correct / wrong / repeated).
  peer   the per-frame loop of face_recognition's own video example (facerec_from_video_file.py):
         face_locations, face_encodings, compare_faces(tolerance=0.5) on every frame; same figures.
         It has no tracking, so each frame with a match is an alert; appearances are judged as ours.
  live   4 cameras (the clip served over RTSP by the test RTSP server, looped, 1280x720, 10 fps
         each; or the file itself with --source file) analysed at 5 fps each by the threaded
         pipeline for --live-seconds: analysed fps per camera, lag behind live over time (is it
         growing?), frame-to-hit latency p50/p99, CPU use, RSS.
  soak   (only with --soak-minutes N) the live setup for N minutes: RSS growth after the first minute.

The clip: a still 1280x720 scene where people come and go; from the evaluation set
(../shared/data/lag-dev: enrolled persons are enrolled from one adult photo and appear in the
clip with another) when present, else scikit-image's astronaut (enrolled from an altered copy)
and cameraman. Both pipelines enrol the same photos. Both run dlib's ResNet; the peer decides by
Euclidean distance (tolerance 0.5), ours by cosine: our threshold is the cosine that decides as
tolerance 0.5 does, fitted on 40 lag-dev photos in the same run (0.99 without the data).

Example:
    python bench/pipeline.py --json bench/results/pipeline.json
    python bench/pipeline.py --json /tmp/soak.json --no-peer --live-seconds 30 --soak-minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FPS = 10
SIZE = (1280, 720)
DEFAULT_THRESHOLD = 0.99  # cosine, our matcher, when the equivalence below cannot be measured (as the demo)
PEER_TOLERANCE = 0.5  # Euclidean, as in face_recognition's video example
LIVE_CAMERAS = 4
LIVE_FPS = 5.0


@dataclass(frozen=True)
class Appearance:
    person: str
    enrolled: bool
    t0: float
    t1: float
    x: int
    y: int
    height: int


# -- the clip and the watchlist photos ------------------------------------------------------------


def _pad(face: np.ndarray, margin: float = 0.35) -> np.ndarray:
    import cv2

    m = int(face.shape[0] * margin)
    return cv2.copyMakeBorder(face, m, m, m, m, cv2.BORDER_REPLICATE)


def _usable_people(candidates: list[Any]) -> list[Any]:
    """3 persons whose two adult photos both show one face that passes the quality gate (enrolled
    from one, shown in the other), then 3 persons with one such photo (never enrolled)."""
    from engines.face_engine import FaceEngine
    from testing.media import load_rgb

    engine = FaceEngine.load()

    def good(path: Path) -> bool:
        faces = engine.analyze(_pad(load_rgb(path)))
        return len(faces) == 1 and faces[0].quality.ok

    enrolled, others = [], []
    for person in candidates:
        if len(enrolled) < 3 and len(person.adult) >= 2 and good(person.adult[0]) and good(person.adult[1]):
            enrolled.append(person)
        elif len(others) < 3 and good(person.adult[0]):
            others.append(person)
        if len(enrolled) == 3 and len(others) == 3:
            return enrolled + others
    return []


def equivalent_threshold(photos: list[Path]) -> dict[str, Any]:
    """Our cosine threshold that decides as the peer's Euclidean tolerance does, measured on `photos`.

    Both pipelines run dlib's ResNet; ours compares unit-length (norm-anchored) embeddings by
    cosine, the peer raw descriptors by Euclidean distance. Over every pair of the photos, cosine
    is fitted as a + b * distance^2; the threshold is the fit at the peer's tolerance.
    """
    import face_recognition

    from engines.face_engine import FaceEngine
    from testing.media import load_rgb

    engine = FaceEngine.load()
    ours, peer = [], []
    for path in photos:
        img = _pad(load_rgb(path))
        faces = engine.analyze(img)
        if len(faces) != 1 or faces[0].embedding is None:
            continue
        x1, y1, x2, y2 = (int(v) for v in faces[0].box)
        enc = face_recognition.face_encodings(img, [(y1, x2, y2, x1)])
        if enc:
            ours.append(faces[0].embedding)
            peer.append(enc[0])
    if len(ours) < 8:
        return {"threshold": DEFAULT_THRESHOLD, "fit": None, "photos": len(ours)}
    o, p = np.array(ours), np.array(peer)
    iu = np.triu_indices(len(o), 1)
    cos = (o @ o.T)[iu]
    d2 = (np.linalg.norm(p[:, None] - p[None], axis=2) ** 2)[iu]
    b, a = np.polyfit(d2, cos, 1)
    return {
        "threshold": round(float(a + b * PEER_TOLERANCE**2), 5),
        "fit": {"a": float(a), "b": float(b), "pairs": int(len(cos)), "corr": float(np.corrcoef(cos, d2)[0, 1])},
        "photos": len(ours),
    }


def prepare(work: Path, seconds: float) -> dict[str, Any]:
    """Write the clip and the enrolment photos into `work`; return the plan (ground truth and paths)."""
    import cv2

    from testing.media import lag_people, load_rgb, make_face_clip

    photos: dict[str, list[str]] = {}
    placements = []
    appearances: list[Appearance] = []
    people = _usable_people(lag_people(60, seed=11))
    slots = [(80, 140), (520, 120), (940, 160)]
    if len(people) == 6:
        source = "lag-dev: 3 enrolled persons (enrolled from one adult photo, shown in another) and 3 others"
        span = seconds / 4.0
        for k, person in enumerate(people):
            enrolled = k < 3
            shown = load_rgb(person.adult[1] if enrolled else person.adult[0])
            if enrolled:
                p = work / f"enrol-{k}.png"
                cv2.imwrite(str(p), _pad(load_rgb(person.adult[0]))[:, :, ::-1])
                photos[f"person-{k}"] = [str(p)]
            # Two appearances each, three faces on screen at most; a place stays empty for more than
            # the tracker's max_age between two people, as when people walk past.
            for rep in range(2):
                t0 = (k % 3) * 0.4 + rep * 2 * span + (k // 3) * span
                t1 = min(seconds, t0 + span * 0.55)
                x, y = slots[(k + rep) % 3]
                h = 170 + 20 * ((k + rep) % 3)
                face = _pad(shown, 0.2)
                placements.append((face, t0, t1, x, y, h))
                appearances.append(Appearance(f"person-{k}", enrolled, t0, t1, x, y, h))
    else:
        from testing.demo import astronaut_photo, cameraman_photo, enrolment_photo

        source = "scikit-image: the astronaut (enrolled from an altered copy) and the cameraman"
        p = work / "enrol-astronaut.png"
        cv2.imwrite(str(p), enrolment_photo()[:, :, ::-1])
        photos["astronaut"] = [str(p)]
        head, man = astronaut_photo()[0:300, 90:390], cameraman_photo()[40:300, 120:380]
        q = seconds / 4.0
        for i, (who, img, x) in enumerate(
            [("astronaut", head, 100), ("cameraman", man, 700), ("astronaut", head, 500)]
        ):
            t0, t1 = i * q + 0.5, i * q + q * 0.9 + 0.5
            placements.append((img, t0, t1, x, 150, 300))
            appearances.append(Appearance(who, who == "astronaut", t0, t1, x, 150, 300))
    clip = make_face_clip(work / "clip.mp4", placements, size=SIZE, fps=FPS, seconds=seconds)
    calibration = equivalent_threshold([p.adult[0] for p in lag_people(40, seed=5)])
    return {
        "clip": str(clip),
        "photos": photos,
        "appearances": [asdict(a) for a in appearances],
        "source": source,
        "threshold": calibration["threshold"],
        "threshold_calibration": calibration,
    }


def decode(clip: str) -> list[np.ndarray]:
    import av

    with av.open(clip) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def judge(events: list[tuple[float, str, tuple[float, float, float, float]]], plan: dict[str, Any]) -> dict[str, int]:
    """Score alerts (time in clip, person, box) against the appearances.

    correct: enrolled appearances that got an alert naming the right person; missed: the other
    enrolled appearances; wrong: alerts naming a person who is not there (or not at that place);
    repeats: alerts beyond the first for the same appearance (what an operator would get more).
    """
    apps = [Appearance(**a) for a in plan["appearances"]]
    found: set[int] = set()
    wrong = repeats = 0
    for t, person, box in events:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        here = [
            i
            for i, a in enumerate(apps)
            if a.t0 - 0.05 <= t < a.t1 + 0.05
            and a.x - 20 <= cx <= a.x + 2 * a.height
            and a.y - 20 <= cy <= a.y + a.height + 20
        ]
        mine = [i for i in here if apps[i].person == person and apps[i].enrolled]
        if not mine:
            wrong += 1
        elif mine[0] in found:
            repeats += 1
        else:
            found.add(mine[0])
    enrolled = sum(a.enrolled for a in apps)
    return {
        "correct": len(found),
        "missed": enrolled - len(found),
        "wrong": wrong,
        "repeats": repeats,
        "enrolled_appearances": enrolled,
        "alerts": len(events),
    }


def _usage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- phases (run in child processes) ---------------------------------------------------------------


def _watchlist(plan: dict[str, Any], work: Path, engine: Any) -> Any:
    from matching.matcher import Matcher
    from testing.demo import apply_watchlist, build_watchlist
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    photos = {pid: [Path(p) for p in ps] for pid, ps in plan["photos"].items()}
    root_pub, bundle = build_watchlist(work / "wl", engine, photos, default_threshold=plan["threshold"])
    store = work / "wl" / "unit.db"
    apply_watchlist(store, root_pub, bundle, engine.model_id, engine.embedding_dim)
    matcher = Matcher(dim=engine.embedding_dim)
    wl = Watchlist(WatchlistConfig(root_key=root_pub, store=store), matcher, model_id=engine.model_id)
    wl.start()
    wl.close()
    return matcher


def phase_ours(plan: dict[str, Any], work: Path, _args: argparse.Namespace) -> dict[str, Any]:
    from edge.frame import Frame
    from edge.pipeline import CameraSpec, MatchingConfig, Pipeline
    from engines.face_engine import FaceEngine

    engine = FaceEngine.load()
    matcher = _watchlist(plan, work, engine)
    frames = decode(plan["clip"])
    events: list[tuple[float, str, tuple[float, float, float, float]]] = []

    class Collect:
        name = "bench"

        def submit(self, hit: Any) -> None:
            events.append((hit.captured_at - t0, hit.person_id, hit.box))

        def stats(self) -> dict[str, int]:
            return {}

        def close(self, timeout: float = 5.0) -> None:
            return None

    pipe = Pipeline(
        unit_id="bench",
        cameras=[CameraSpec("cam", None, float(FPS))],
        engine=engine,  # type: ignore[arg-type]
        matcher=matcher,
        sinks=[Collect()],
        matching=MatchingConfig(cooldown_s=0.0),
    )
    engine.analyze(frames[0])  # warm-up, not timed
    t0 = 1_700_000_000.0
    cpu0, _ = _usage()
    w0 = time.perf_counter()
    for i, img in enumerate(frames):
        pipe.process_frame(Frame("cam", i, t0 + i / FPS, img))
    wall = time.perf_counter() - w0
    cpu1, peak = _usage()
    st = pipe.stats()["cam"]
    return {
        "frames": len(frames),
        "seconds": wall,
        "frames_per_s": len(frames) / wall,
        "faces": st["faces"],
        "faces_per_s": st["faces"] / wall,
        "embedded": st["embedded"],
        "cpu_cores_used": (cpu1 - cpu0) / wall,
        "peak_rss_mb": peak,
        "hits": judge(events, plan),
        "model_id": engine.model_id,
    }


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


def _cameras(plan: dict[str, Any], work: Path, source: str) -> tuple[list[str], Any, str]:
    """Camera URLs for the live runs: RTSP streams of the clip from the test RTSP server (as a unit
    sees cameras), or the clip file itself, looped, where GStreamer's RTSP server is not installed."""
    if source == "rtsp":
        from testing.rtsp import RtspServer, gst_rtsp_problem

        problem = gst_rtsp_problem()
        if problem is None:
            srv = RtspServer({f"cam{i}": plan["clip"] for i in range(LIVE_CAMERAS)}, work).start()
            return [srv.url(f"cam{i}") for i in range(LIVE_CAMERAS)], srv, "rtsp (test RTSP server, clip looped)"
        print(f"no RTSP server ({problem}); reading the clip file instead", file=sys.stderr)
    return [plan["clip"]] * LIVE_CAMERAS, None, "file (clip looped, reopened at each end)"


def _live(
    plan: dict[str, Any], work: Path, seconds: float, sample_every: float, detect_workers: int, source: str
) -> dict[str, Any]:
    from edge.camera.capture import CameraReader
    from edge.camera.config import CaptureConfig
    from edge.pipeline import AnalysisConfig, CameraSpec, MatchingConfig, Pipeline
    from engines.face_engine import FaceEngine

    engine = FaceEngine.load()
    matcher = _watchlist(plan, work, engine)
    urls, server, source_note = _cameras(plan, work, source)
    readers = [
        CameraReader(CaptureConfig(id=f"cam{i}", url=url, realtime=True, loop=True)) for i, url in enumerate(urls)
    ]

    class Count:
        name = "bench"
        hits = 0

        def submit(self, hit: Any) -> None:
            Count.hits += 1

        def stats(self) -> dict[str, int]:
            return {}

        def close(self, timeout: float = 5.0) -> None:
            return None

    pipe = Pipeline(
        unit_id="bench",
        cameras=[CameraSpec(r.camera_id, r, LIVE_FPS) for r in readers],
        engine=engine,
        matcher=matcher,
        sinks=[Count()],
        matching=MatchingConfig(cooldown_s=0.0),
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
        "hits": Count.hits,
    }


def phase_live(plan: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    r = _live(plan, work, args.live_seconds, 1.0, args.detect_workers, args.source)
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
        }
    lat = np.array(r["latencies"], dtype=np.float64)
    sustained = all(c["analysed_fps"] >= 0.95 * LIVE_FPS for c in per_cam.values()) and not growing
    return {
        "cameras": LIVE_CAMERAS,
        "source": r["source"],
        "detect_workers": args.detect_workers,
        "resolution": f"{SIZE[0]}x{SIZE[1]}",
        "stream_fps": FPS,
        "analysis_fps": LIVE_FPS,
        "seconds": round(r["wall"], 1),
        "per_camera": per_cam,
        "sustained_without_growing_lag": sustained,
        "hits": r["hits"],
        "frame_to_hit_latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
        "frame_to_hit_latency_p99_s": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
        "cpu_cores_used": round(r["cpu"] / r["wall"], 2),
        "peak_rss_mb": round(r["peak"], 1),
        "note": "CPU includes decoding 4 H.264 720p streams at 10 fps (a Jetson decodes in hardware)",
    }


def phase_soak(plan: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    r = _live(plan, work, args.soak_minutes * 60.0, 10.0, args.detect_workers, args.source)
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


PHASES = {"ours": phase_ours, "peer": phase_peer, "live": phase_live, "soak": phase_soak}


# -- driver ----------------------------------------------------------------------------------------


def run_phase(name: str, plan_path: Path, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--plan",
        str(plan_path),
        "--peer-every",
        str(args.peer_every),
        "--live-seconds",
        str(args.live_seconds),
        "--soak-minutes",
        str(args.soak_minutes),
        "--detect-workers",
        str(args.detect_workers),
        "--source",
        args.source,
    ]
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict[str, Any]) -> str:
    rows = [("", "ours", "face_recognition loop")]
    o, p = results.get("ours", {}), results.get("peer", {})

    def f(d: dict[str, Any], k: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(d[k]) if k in d and d[k] is not None else "-"

    def h(d: dict[str, Any], k: str) -> str:
        return str(d["hits"][k]) if "hits" in d else "-"

    rows += [
        ("analysed frames/s", f(o, "frames_per_s"), f(p, "frames_per_s")),
        ("faces/s", f(o, "faces_per_s"), f(p, "faces_per_s")),
        ("CPU cores used", f(o, "cpu_cores_used"), f(p, "cpu_cores_used")),
        ("peak RSS MB", f(o, "peak_rss_mb", "{:.0f}"), f(p, "peak_rss_mb", "{:.0f}")),
        (
            "appearances found",
            f"{h(o, 'correct')}/{h(o, 'enrolled_appearances')}",
            f"{h(p, 'correct')}/{h(p, 'enrolled_appearances')}",
        ),
        ("wrong alerts", h(o, "wrong"), h(p, "wrong")),
        ("alerts (total)", h(o, "alerts"), h(p, "alerts")),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(width[i]) for i, c in enumerate(r)).rstrip() for r in rows] if o or p else []
    if "ours" in results and "peer" in results:
        lines.append(f"speed-up: {o['frames_per_s'] / p['frames_per_s']:.1f}x frames/s")
    lv = results.get("live")
    if lv:
        lines.append(
            f"live: {lv['cameras']} cameras {lv['resolution']} at {lv['analysis_fps']:g} fps "
            f"for {lv['seconds']:.0f} s: "
            + ", ".join(
                f"{c} {v['analysed_fps']:.2f} fps lag {v['lag_mean_s']:.2f}/{v['lag_max_s']:.2f} s"
                for c, v in lv["per_camera"].items()
            )
            + f"; sustained without growing lag: {lv['sustained_without_growing_lag']}; "
            f"frame-to-hit p50 {lv['frame_to_hit_latency_p50_s']} s p99 {lv['frame_to_hit_latency_p99_s']} s; "
            f"CPU {lv['cpu_cores_used']} cores; peak RSS {lv['peak_rss_mb']:.0f} MB"
        )
    sk = results.get("soak")
    if sk:
        lines.append(
            f"soak: {sk['minutes']:g} min, RSS {sk['rss_second_minute_mb']:.0f} MB in the second minute -> "
            f"{sk['rss_end_mb']:.0f} MB at the end ({sk['rss_growth_pct']:+.2f}%, trend "
            f"{sk['rss_slope_mb_per_hour']:+.0f} MB/h)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--seconds", type=float, default=16.0, help="clip length (10 fps, 1280x720)")
    ap.add_argument("--no-peer", action="store_true", help="skip the face_recognition loop (it is slow)")
    ap.add_argument("--peer-every", type=int, default=1, help="the peer analyses every Nth frame (default: all)")
    ap.add_argument("--live-seconds", type=float, default=60.0, help="length of the 4-camera live run (0: skip)")
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="also run the live setup this long, watching RSS")
    ap.add_argument(
        "--detect-workers",
        type=int,
        default=2,
        help="[analysis] detect_workers for the live run (one per CPU core suits a CPU-only unit)",
    )
    ap.add_argument(
        "--source",
        choices=["rtsp", "file"],
        default="rtsp",
        help="live/soak cameras: RTSP streams of the clip or the file",
    )
    ap.add_argument("--phases", default="ours,peer,live", help="which of ours,peer,live to run (soak: --soak-minutes)")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase:
        from edge.daemon import tune_malloc

        tune_malloc()  # as `edge run` does
        plan = json.loads(args.plan.read_text())
        result = PHASES[args.phase](plan, args.plan.parent, args)
        print(json.dumps(result, default=float))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        plan = prepare(work, args.seconds)
        plan_path = work / "plan.json"
        plan_path.write_text(json.dumps(plan))
        print(f"clip: {args.seconds:g} s {SIZE[0]}x{SIZE[1]} {FPS} fps; {plan['source']}", file=sys.stderr)
        results: dict[str, Any] = {}
        phases = {p.strip() for p in args.phases.split(",") if p.strip()}
        load_before = os.getloadavg()
        if "ours" in phases:
            results["ours"] = run_phase("ours", plan_path, args, 1800)
        if "peer" in phases and not args.no_peer:
            results["peer"] = run_phase("peer", plan_path, args, 3600)
        if "live" in phases and args.live_seconds > 0:
            results["live"] = run_phase("live", plan_path, args, args.live_seconds + 300)
        if args.soak_minutes > 0:
            results["soak"] = run_phase("soak", plan_path, args, args.soak_minutes * 60 + 300)
    out = {
        "benchmark": "pipeline",
        "command": "python bench/pipeline.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            # Other work on the machine skews every figure; the load averages say how much there was.
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "clip": {
            "seconds": args.seconds,
            "size": list(SIZE),
            "fps": FPS,
            "source": plan["source"],
            "appearances": plan["appearances"],
        },
        "threshold_cosine": plan["threshold"],
        "threshold_calibration": plan["threshold_calibration"],
        "peer_tolerance_euclidean": PEER_TOLERANCE,
        **results,
    }
    if "ours" in results and "peer" in results:
        out["speedup_frames_per_s"] = results["ours"]["frames_per_s"] / results["peer"]["frames_per_s"]
    print(table(results))
    print(f"load average before/after: {out['machine']['loadavg_before']} / {out['machine']['loadavg_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
