"""The edge pipeline end to end against the loop most face_recognition users write, on the same clip.

Phases, each in its own process so CPU use and peak RSS are its own:

  ours   the clip's frames through edge.pipeline (detect, track, embed best faces, match, hits),
         every frame, as fast as it goes: analysed frames/s, faces/s, CPU use, peak RSS, hits
         judged against the clip's ground truth (correct / wrong / repeated), and where the detector
         looked (edge.regions: frames searched whole or in regions; --gating KEY=VALUE to compare).
  peer   the per-frame loop of face_recognition's own video example (facerec_from_video_file.py):
         face_locations, face_encodings, compare_faces(tolerance=0.5) on every frame; same figures.
         It has no tracking, so each frame with a match is an alert; appearances are judged as ours.
  gate   the gate scenario (testing/gate.py: seven people in turn at one spot, gaps 0.2-1.5 s, a swap
         between two frames, a walk-out/walk-in) at 5 fps, as the unit was (position-only tracks,
         any one face decides) and is: people checked / shown, enrolled hit, wrong alerts,
         embeddings per person and per second of clip.
  live   --cameras N (4) cameras (the clip served over RTSP by the test RTSP server, looped, 1280x720, 10 fps
         each; or the file itself with --source file) analysed at 5 fps each by the threaded
         pipeline for --live-seconds: analysed fps per camera, lag behind live over time (is it
         growing?), frame-to-hit latency p50/p99, CPU use and CPU per analysed frame, RSS, and where
         the time went (wall time in detection, confirmation, alignment and each model's network).
  soak   (only with --soak-minutes N) the live setup for N minutes: RSS growth after the first minute.

The clip: a still 1280x720 scene where people come and go; from the evaluation set
(../shared/data/lag-dev: enrolled persons are enrolled from one adult photo and appear in the
clip with another) when present, else scikit-image's astronaut (enrolled from an altered copy)
and cameraman. Both pipelines enrol the same photos. The peer runs dlib's ResNet and decides by
Euclidean distance (tolerance 0.5); ours runs the embedder of --config's `[engine]` table (the
default model without it) and decides by cosine. With dlib's ResNet alone our threshold is the
cosine that decides as tolerance 0.5 does, fitted on 40 lag-dev photos in the same run (0.99
without the data); any other model has no cosine equivalent to the peer's distance, so its
threshold is the one `watchlist build --fpir 0.01` would choose from its calibration. --fpir F
sets that for any model (the fair way to compare two models: each at the same false-alert rate),
--threshold a number.

With --distractors, the ours phase also runs the clip before/after (as above), with and without
every other lag-dev identity's young photos enrolled as distractor children, in the same run.

Example:
    python bench/pipeline.py --json bench/results/pipeline.json
    python bench/pipeline.py --no-peer --phases ours,gate --distractors --json /tmp/gate.json
    python bench/pipeline.py --no-peer --phases ours --distractors --fpir 0.01 --json /tmp/crowded.json
    python bench/pipeline.py --json /tmp/soak.json --no-peer --live-seconds 30 --soak-minutes 30
    python bench/pipeline.py --no-peer --phases ours --gating enabled=false   # every frame searched whole
    python bench/pipeline.py --no-peer --phases live --cameras 8 --config bench/configs/dlib.toml --json /tmp/dlib8.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe_machine, machine_summary  # noqa: E402
from bench.pipeline_phases import PHASES, engine_config  # noqa: E402
from bench.pipeline_scene import FPS, PEER_TOLERANCE, SIZE, prepare  # noqa: E402

# The peer's model (face_recognition runs dlib's ResNet): ours has a cosine equivalent to its tolerance only
# when it runs the same model alone.
PEER_MODEL = "dlib-resnet-v1"
# The operating point of any other model: the rate `watchlist build --fpir` is usually given (docs/engine.md).
OTHER_MODEL_FPIR = 0.01

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
        "--cameras",
        str(args.cameras),
        *(["--gating", *args.gating] if args.gating else []),
        *(["--config", str(args.config)] if args.config else []),
    ]
    if args.threshold is not None:
        cmd += ["--threshold", str(args.threshold)]
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def calibrated_threshold(plan: dict[str, Any], fpir: float, config: Any) -> dict[str, Any]:
    """The threshold `watchlist build --fpir` would choose for the run's list: its persons and templates
    (with the distractors when the run has them), the calibration for thresholds of the model `config`
    (an EngineConfig) names, the worst cohort (the enrolled people are enrolled from adult photos, so not
    every template is a child's)."""
    from engines.calibration import Calibration
    from engines.ensemble import calibration_model

    persons = len(plan["photos"])
    templates = sum(len(v) for v in plan["photos"].values())
    if plan.get("distractors"):
        persons += plan["distractors"]["persons"]
        templates += plan["distractors"]["templates"]
    cal = Calibration.for_thresholds(calibration_model(config))
    point = cal.threshold_for_fpir(fpir, persons, templates / persons)
    return {
        "fpir_target": fpir,
        "calibration": cal.model,
        "persons": persons,
        "templates": templates,
        **point.as_dict(),
    }


def _searched(d: dict[str, Any]) -> str:
    """Where the detector looked (edge.regions), in words."""
    if "frames_full" not in d:
        return "-"
    share = d["searched_share"]
    return (
        f"{d['frames_full']} frames searched whole, {d['frames_regions']} in regions, "
        f"{'-' if share is None else f'{100 * share:.0f}%'} of the frame on average, "
        f"{d.get('faces_confirmed', 0)} faces confirmed"
    )


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
    if o:
        lines.append(f"ours: {_searched(o)}")
    for name, v in (results.get("ours") or {}).get("variants", {}).items():
        lines.append(
            f"{name}: {v['correct']}/{v['enrolled_appearances']} appearances found, {v['wrong']} wrong alerts, "
            f"{v['repeats']} repeats, {v['embedded']} embeddings ({v['persons_listed']} persons listed)"
        )
    gt = results.get("gate")
    if gt:
        for name in ("before", "after"):
            g = gt[name]
            lines.append(
                f"gate {name}: people checked {g['people_checked']}/{g['people_shown']}, enrolled hit "
                f"{g['enrolled_hit']}/{g['enrolled']}, wrong {g['wrong']}, repeats {g['repeats']}, "
                f"{g['embeddings']} embeddings ({g['embeddings_per_clip_second']:.2f}/s of clip; per person "
                + ", ".join(str(n) for n in g["embeddings_per_person"].values())
                + f"); {_searched(g)}"
            )
        six = gt.get("six_in_a_row")
        if six:
            lines.append(
                "six enrolled in a row (2.5 s each, 0.5 s apart): hit "
                + ", ".join(f"{n} {six[n]['enrolled_hit']}/{six[n]['enrolled']}" for n in ("before", "after"))
                + f"; embeddings {six['before']['embeddings']} -> {six['after']['embeddings']}"
            )
    lv = results.get("live")
    if lv:
        lines.append(
            f"live: {lv['cameras']} cameras {lv['resolution']} at {lv['analysis_fps']:g} fps "
            f"for {lv['seconds']:.0f} s: "
            + ", ".join(
                f"{c} {v['analysed_fps']:.2f} fps lag {v['lag_mean_s']:.2f}/{v['lag_max_s']:.2f} s"
                for c, v in lv["per_camera"].items()
            )
            + "; "
            + "; ".join(f"{c} {_searched(v)}" for c, v in lv["per_camera"].items())
            + f"; sustained without growing lag: {lv['sustained_without_growing_lag']}; "
            f"frame-to-hit p50 {lv['frame_to_hit_latency_p50_s']} s p99 {lv['frame_to_hit_latency_p99_s']} s; "
            f"CPU {lv['cpu_cores_used']} cores; peak RSS {lv['peak_rss_mb']:.0f} MB"
        )
        lines.append(
            f"live, per analysed frame: CPU {lv['cpu_ms_per_analysed_frame']:.1f} ms; wall time in "
            + ", ".join(
                f"{stage} {v['ms_per_frame']:.1f} ms"
                + (f" ({v['ms_per_face']:.1f} ms/face, {v['faces']} faces)" if "ms_per_face" in v else "")
                for stage, v in lv["stages"].items()
            )
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
    ap.add_argument(
        "--config",
        type=Path,
        help="unit config file; its [engine] table chooses our models, e.g. bench/configs/ensemble.toml "
        "(default: the default models)",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the face_recognition loop (it is slow)")
    ap.add_argument("--peer-every", type=int, default=1, help="the peer analyses every Nth frame (default: all)")
    ap.add_argument("--live-seconds", type=float, default=60.0, help="length of the live run (0: skip)")
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
    ap.add_argument("--cameras", type=int, default=4, help="cameras of the live (and soak) run")
    ap.add_argument(
        "--gating",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="[analysis.gating] settings of the ours phase other than the defaults, to compare "
        "(enabled=false: every frame searched whole)",
    )
    ap.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="the watchlist's threshold for our pipeline (default: with dlib's model alone the cosine equivalent to "
        f"the peer's tolerance, with any other --fpir {OTHER_MODEL_FPIR})",
    )
    ap.add_argument(
        "--fpir",
        type=float,
        default=None,
        help="set the threshold as `watchlist build --fpir F` would for the list the run uses (the enrolled "
        "people, and with --distractors the distractor children too), from the model's calibration",
    )
    ap.add_argument(
        "--distractors",
        action="store_true",
        help="also enrol every other lag-dev identity's young photos as distractor children and run the clip "
        "before/after (position-only tracks, any face decides / the unit now), with and without them",
    )
    ap.add_argument(
        "--phases", default="ours,peer,live,gate", help="which of ours,peer,live,gate to run (soak: --soak-minutes)"
    )
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fpir is not None and (args.threshold is not None or not 0 < args.fpir < 1):
        ap.error("--fpir takes a rate in (0, 1), and not beside --threshold")
    bad = [kv for kv in args.gating if "=" not in kv]
    if bad:
        ap.error(f"--gating wants KEY=VALUE, got {' '.join(bad)}")

    if args.phase:
        from edge.process import tune_malloc

        tune_malloc()  # as `edge run` does
        plan = json.loads(args.plan.read_text())
        result = PHASES[args.phase](plan, args.plan.parent, args)
        print(json.dumps(result, default=float))
        return 0

    config = engine_config(args)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        plan = prepare(work, args.seconds, config, distractors=args.distractors)
        if args.fpir is None and args.threshold is None and plan["engine"]["model_id"].split(":")[0] != PEER_MODEL:
            args.fpir = OTHER_MODEL_FPIR
        if args.fpir is not None:
            plan["threshold_from_fpir"] = calibrated_threshold(plan, args.fpir, config)
            args.threshold = plan["threshold_from_fpir"]["threshold"]
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
        if "gate" in phases:
            results["gate"] = run_phase("gate", plan_path, args, 1800)
        if "live" in phases and args.live_seconds > 0:
            results["live"] = run_phase("live", plan_path, args, args.live_seconds + 300)
        if args.soak_minutes > 0:
            results["soak"] = run_phase("soak", plan_path, args, args.soak_minutes * 60 + 300)
    out = {
        "benchmark": "pipeline",
        "command": "python bench/pipeline.py " + " ".join(sys.argv[1:]),
        "machine": {
            **describe_machine(),
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
        "engine": {"config": str(args.config) if args.config else None, **plan["engine"]},
        "threshold_cosine": plan["threshold"] if args.threshold is None else args.threshold,
        "threshold_from_fpir": plan.get("threshold_from_fpir"),
        "threshold_calibration": plan["threshold_calibration"],
        "peer_tolerance_euclidean": PEER_TOLERANCE,
        **results,
    }
    if "ours" in results and "peer" in results:
        out["speedup_frames_per_s"] = results["ours"]["frames_per_s"] / results["peer"]["frames_per_s"]
    print(machine_summary(out["machine"]))
    if args.fpir is not None:
        source = f"for FPIR {args.fpir:g} from the model's calibration"
    else:
        source = "--threshold" if args.threshold is not None else "equivalent to the peer's tolerance"
    print(
        f"our model: {plan['engine']['model_id']} ({plan['engine']['members']}; {plan['engine']['precision']}); "
        f"threshold {out['threshold_cosine']:g} ({source})"
    )
    print(table(results))
    print(f"load average before/after: {out['machine']['loadavg_before']} / {out['machine']['loadavg_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
