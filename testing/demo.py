"""`python -m testing.demo` (from the checkout; testing/ is in no install): the whole loop on generated data, with nothing but the installed packages.

1. A video (MPEG-4, 960x540, 10 fps) of a still scene in which two people come and go, made from
   public-domain photos that ship with scikit-image: the NASA astronaut (Eileen Collins), who
   appears twice, and the cameraman, who appears once in between.
2. A signed watchlist, built the way HQ builds one (sync: keys, register, enrolment, signed
   bundle), holding the astronaut enrolled from an altered copy of her photo (mirrored, turned and
   darkened; not from the video), then verified and applied on the unit's side.
3. A unit config whose only camera is the video file (played at its own pace, as a camera would
   deliver it) and whose only sink is a JSON-lines file.
4. The unit runs until the video ends; each hit is printed as it happens.

Expected: one hit for each of the astronaut's two appearances (the cooldown outlasts one appearance
and ends before the next), none for the cameraman.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from wire.records import Hit

log = logging.getLogger(__name__)

SIZE = (960, 540)
FPS = 10
ASTRONAUT = "astronaut"
# Demo threshold: cosine similarity. With the default ensemble (engines/ensemble.py) the astronaut
# scores about 0.995 against her enrolment, the cameraman about 0.88; with dlib's ResNet alone (norm
# anchor, so cosine follows dlib's Euclidean distance d: about 1 - d^2 / 22.5; 0.99 is a distance of
# about 0.45, stricter than dlib's own 0.6) 0.998 and 0.97. Both models tell them apart at 0.99.
DEMO_THRESHOLD = 0.99


class DemoError(RuntimeError):
    """The demo could not be prepared (a package or model is missing); the message says which."""


@dataclass(frozen=True)
class Appearance:
    """One person on screen: which picture, when, where (top-left corner moves from start to end), how big."""

    who: str
    image: np.ndarray
    t0: float
    t1: float
    start: tuple[int, int]
    end: tuple[int, int]
    height: int

    def position(self, t: float) -> tuple[int, int]:
        a = (t - self.t0) / max(self.t1 - self.t0, 1e-6)
        return (
            round(self.start[0] + a * (self.end[0] - self.start[0])),
            round(self.start[1] + a * (self.end[1] - self.start[1])),
        )


@dataclass
class DemoResult:
    """What the demo saw: the hits, and which appearance each belongs to."""

    hits: list[Hit] = field(default_factory=list)
    correct: int = 0
    wrong: int = 0
    appearances_of_enrolled: int = 0
    hits_file: Path | None = None

    @property
    def ok(self) -> bool:
        return self.wrong == 0 and self.correct == self.appearances_of_enrolled


def astronaut_photo() -> np.ndarray:
    """The astronaut photo (512x512 RGB; NASA, public domain; ships with scikit-image)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise DemoError("the demo takes its pictures from scikit-image: pip install scikit-image") from exc
    return np.ascontiguousarray(data.astronaut())


def cameraman_photo() -> np.ndarray:
    """The cameraman photo (512x512, grey turned RGB; ships with scikit-image)."""
    from skimage import data

    return np.ascontiguousarray(np.stack([data.camera()] * 3, axis=-1))


def enrolment_photo() -> np.ndarray:
    """The astronaut as a different picture than the video uses: mirrored, turned 6 degrees, darker, smaller."""
    import cv2

    img = astronaut_photo()[:, ::-1]
    h, w = img.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 3), 6.0, 0.8)
    img = cv2.warpAffine(np.ascontiguousarray(img), turn, (w, h), borderMode=cv2.BORDER_REFLECT)
    return np.clip(img.astype(np.float32) * 0.8 + 10, 0, 255).astype(np.uint8)


def timeline(seconds: float) -> list[Appearance]:
    """Who is on screen when, scaled to a video `seconds` long."""
    s = seconds / 16.0
    head = astronaut_photo()[0:300, 90:390]
    man = cameraman_photo()[40:300, 120:380]
    return [
        Appearance(ASTRONAUT, head, 1.0 * s, 5.0 * s, (80, 120), (300, 140), 300),
        Appearance("cameraman", man, 5.5 * s, 9.5 * s, (560, 100), (520, 120), 340),
        Appearance(ASTRONAUT, head, 10.0 * s, 14.5 * s, (600, 160), (420, 130), 260),
    ]


def background(size: tuple[int, int]) -> np.ndarray:
    """A plain scene: a soft gradient with a few boxes."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([70 + 70 * xx / w, 90 + 50 * yy / h, 120 - 40 * xx / w], axis=-1).astype(np.uint8)
    for x, y, c in ((40, 380, (150, 60, 60)), (700, 40, (60, 120, 80)), (820, 420, (90, 90, 160))):
        img[y : y + 100, x : x + 120] = c
    return img


def make_video(path: Path, seconds: float, appearances: Sequence[Appearance], size: tuple[int, int] = SIZE) -> Path:
    """Write the demo video (MPEG-4 Part 2 in MP4, which OpenCV's FFmpeg can always write)."""
    import cv2

    bg = background(size)
    resized = {id(a): _resize_h(a.image, a.height) for a in appearances}
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FPS, size)
    if not writer.isOpened():
        raise DemoError(f"cannot write the demo video {path} with OpenCV")
    try:
        for i in range(round(seconds * FPS)):
            t = i / FPS
            frame = bg.copy()
            for a in appearances:
                if a.t0 <= t < a.t1:
                    _paste(frame, resized[id(a)], *a.position(t))
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    finally:
        writer.release()
    return path


def _resize_h(img: np.ndarray, height: int) -> np.ndarray:
    import cv2

    width = round(img.shape[1] * height / img.shape[0])
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if height < img.shape[0] else cv2.INTER_CUBIC)


def _paste(frame: np.ndarray, img: np.ndarray, x: int, y: int) -> None:
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + img.shape[1], w), min(y + img.shape[0], h)
    if x1 > x0 and y1 > y0:
        frame[y0:y1, x0:x1] = img[y0 - y : y1 - y, x0 - x : x1 - x]


def build_watchlist(
    out_dir: Path,
    engine: Any,
    photos: dict[str, Sequence[np.ndarray | Path]],
    *,
    default_threshold: float = DEMO_THRESHOLD,
) -> tuple[Path, Path]:
    """Do what HQ does: keys, register, enrolment, a signed full bundle. Returns (root public key, bundle file).

    `photos` maps a person id to their photos (arrays are written out as PNG first, as HQ
    enrols from files). Raises DemoError if a photo is refused by the enrolment's checks.
    """
    import cv2

    from watchlist.format.keys import generate_key, make_keyset, parse_keyset, save_public_key
    from watchlist.hq.build import plan_bundle, release
    from watchlist.hq.enrol import PhotoEntry, enrol
    from watchlist.hq.register import Register

    hq = out_dir / "hq"
    hq.mkdir(parents=True, exist_ok=True)
    root, signing = generate_key(), generate_key()
    keyset = parse_keyset(make_keyset(root, 1, [signing.public_key()], issued_at=int(time.time())), root.public_key())
    root_pub = out_dir / "hq-root.pub"
    save_public_key(root.public_key(), root_pub)
    entries = []
    for pid, items in photos.items():
        for k, item in enumerate(items):
            if isinstance(item, np.ndarray):
                path = hq / f"{pid}-{k}.png"
                cv2.imwrite(str(path), np.ascontiguousarray(item[:, :, ::-1]))
            else:
                path = Path(item)
            entries.append(PhotoEntry(pid, path, age=30, where=str(path)))
    register_path = hq / "register.db"
    register_path.unlink(missing_ok=True)
    register = Register(register_path)
    try:
        report = enrol(register, engine, entries)
        if report.rejected:
            raise DemoError(
                "enrolment refused photos: " + "; ".join(f"{r['photo']}: {r['reason']}" for r in report.rejected)
            )
        bundle, digests, skipped = plan_bundle(register, model_id=engine.model_id, default_threshold=default_threshold)
        release(register, bundle, digests, signing, keyset, out=out_dir / "watchlist-v1.cpwl", skipped=skipped)
    finally:
        register.close()
    return root_pub, out_dir / "watchlist-v1.cpwl"


def apply_watchlist(store: Path, root_pub: Path, bundle: Path, model_id: str, dim: int) -> int:
    """Verify and apply a bundle into a unit's store, as `edge watchlist apply` does; the version applied."""
    from matching.matcher import Matcher
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    store.unlink(missing_ok=True)
    wl = Watchlist(WatchlistConfig(root_key=root_pub, store=store), Matcher(dim=dim), model_id=model_id)
    try:
        return wl.offer_file(bundle)
    finally:
        wl.close()


CONFIG_TEMPLATE = """# Written by `python -m testing.demo`. Check it with: edge check-config {name}
[unit]
id = "demo-unit"
site = "demo-site"

[[cameras]]
id = "demo-cam"
name = "Demo video"
url = "{video}"
realtime = true          # deliver frames at the video's own pace, as a camera would
analysis_fps = 5

[engine.quality]
max_pitch = 0.3          # the astronaut looks slightly down

[matching]
cooldown_s = {cooldown}

[watchlist]
root_key = "hq-root.pub"
store = "unit-state/watchlist.db"

[sinks.jsonl]
path = "hits.jsonl"

[logging]
stats_interval_s = 5

[canary]
# Off: the demo's listed person is the canary's own picture (scikit-image's astronaut), which the unit
# would rightly refuse to report as anyone but the canary.
enabled = false
"""


class _ConsoleSink:
    """Prints each hit as it is made."""

    name = "console"

    def __init__(self, echo: Callable[[str], None], t0: Callable[[], float | None]) -> None:
        self.echo = echo
        self.t0 = t0
        self.hits: list[Hit] = []

    def submit(self, hit: Hit) -> None:
        self.hits.append(hit)
        start = self.t0()
        at = (
            f"{hit.captured_at - start:5.1f} s" if start else time.strftime("%H:%M:%S", time.localtime(hit.captured_at))
        )
        self.echo(
            f"  HIT at {at}: person {hit.person_id}, score {hit.score:.3f} (threshold {hit.threshold:.2f}, "
            f"{'only person on the list' if hit.margin > 1.0 else f'margin {hit.margin:.2f} over the next'}), "
            f"camera {hit.camera_id}, track {hit.track_id}, "
            f"box {tuple(round(v) for v in hit.box)}, crop {len(hit.crop_jpeg or b'')} bytes JPEG"
        )

    def stats(self) -> dict[str, int | float | str]:
        return {"printed": len(self.hits)}

    def close(self, timeout: float = 5.0, reason: str = "shutdown") -> None:
        return None


def run_demo(
    out_dir: Path, *, seconds: float = 16.0, verbose: bool = False, echo: Callable[[str], None] = print
) -> DemoResult:
    """Prepare everything in `out_dir` and run the unit on it; see the module doc."""
    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.process import configure_logging, tune_malloc
    from engines.face_engine import FaceEngine

    tune_malloc()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    from edge.config import LoggingConfig

    # Quiet unless asked: the demo prints what matters; --verbose shows the unit's own log.
    configure_logging(LoggingConfig(level="INFO" if verbose else "ERROR"))
    echo(f"demo: working in {out_dir}")
    apps = timeline(seconds)
    video = make_video(out_dir / "demo.mp4", seconds, apps)
    echo(
        f"  video {video.name}: {seconds:g} s, {SIZE[0]}x{SIZE[1]}, {FPS} fps; "
        + ", ".join(f"{a.who} {a.t0:.1f}-{a.t1:.1f} s" for a in apps)
    )
    echo("  loading the face models (converted into the cache on first use; this takes a while once)")
    engine = FaceEngine.load()
    root_pub, bundle = build_watchlist(out_dir, engine, {ASTRONAUT: [enrolment_photo()]})
    version = apply_watchlist(
        out_dir / "unit-state" / "watchlist.db", root_pub, bundle, engine.model_id, engine.embedding_dim
    )
    echo(f"  watchlist {bundle.name}: signed bundle version {version} holding '{ASTRONAUT}', verified and applied")
    # One hit per appearance however fast the machine: the cooldown outlasts her first appearance (analysis that
    # falls behind real time, on a slow or busy machine, may lose her track and start another), yet ends before
    # her second begins, however late in the first she was found.
    first, second = apps[0], apps[-1]
    cooldown = 0.5 * ((first.t1 - first.t0) + (second.t0 - first.t1))
    config_path = out_dir / "unit.toml"
    config_path.write_text(CONFIG_TEMPLATE.format(name=config_path, video=video.name, cooldown=f"{cooldown:.1f}"))
    hits_file = out_dir / "hits.jsonl"
    hits_file.unlink(missing_ok=True)
    cfg = load_config(config_path)
    echo(f"  config {config_path.name}; running the unit on the video (hits go to {hits_file.name}):")

    from edge.sinks import JsonlSink, JsonlSinkConfig

    started = time.time()
    console = _ConsoleSink(echo, lambda: started)
    daemon = Daemon(
        cfg,
        engine=engine,
        sinks=[JsonlSink(cfg.sinks.jsonl or JsonlSinkConfig(path=hits_file), cfg.unit.site), console],
    )
    daemon.start()
    try:
        daemon.run(until_sources_finished=True, max_seconds=seconds * 3 + 30)
    finally:
        daemon.stop()
    result = _judge(console.hits, apps, started, hits_file)
    echo(
        f"  done: {len(result.hits)} hits ({result.correct} of {result.appearances_of_enrolled} appearances of "
        f"'{ASTRONAUT}' found, {result.wrong} wrong); every hit is a line of {hits_file}"
    )
    if not result.ok:
        echo(
            "  UNEXPECTED: the demo should give exactly one hit per appearance of the astronaut and none else; "
            "run it again with --verbose to see the unit's log"
        )
    return result


def _judge(hits: list[Hit], apps: Sequence[Appearance], started: float, hits_file: Path) -> DemoResult:
    """Assign each hit to the appearance whose place and time it fits."""
    res = DemoResult(hits=list(hits), hits_file=hits_file)
    enrolled = [a for a in apps if a.who == ASTRONAUT]
    res.appearances_of_enrolled = len(enrolled)
    found: set[int] = set()
    for hit in hits:
        t = hit.captured_at - started
        cx = (hit.box[0] + hit.box[2]) / 2
        # The clip starts playing a moment after `started`; allow a second of slack either side.
        match = [
            i
            for i, a in enumerate(apps)
            if a.t0 - 1.0 <= t <= a.t1 + 2.0
            and min(a.start[0], a.end[0]) - 50 <= cx <= max(a.start[0], a.end[0]) + a.height + 50
        ]
        mine = [i for i in match if apps[i].who == hit.person_id]
        if mine and mine[0] not in found:
            found.add(mine[0])
            res.correct += 1
        else:
            res.wrong += 1
    if hits_file.is_file():
        lines = [json.loads(x) for x in hits_file.read_text().splitlines() if x.strip()]
        if len(lines) != len(hits):
            log.warning("hits file holds %d hits, the console saw %d", len(lines), len(hits))
    return res


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("edge-demo"),
    show_default=True,
    help="folder for the generated video, watchlist, config and hits file",
)
@click.option("--seconds", type=click.FloatRange(6.0, 300.0), default=16.0, show_default=True, help="video length")
@click.option("--verbose", is_flag=True, help="show the unit's log lines too")
@click.option(
    "--console",
    is_flag=True,
    help="instead: serve the operators' console on made-up hits, units and a register (no broker needed)",
)
@click.option("--http-port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="with --console")
def main(out_dir: Path, seconds: float, verbose: bool, console: bool, http_port: int) -> None:
    """Run the whole loop, HQ and unit, on generated data: no camera, no broker, nothing downloaded.

    Makes a video from public-domain pictures that ship with scikit-image (the NASA astronaut
    photo, the cameraman photo), a signed watchlist holding the astronaut (enrolled from an
    altered copy of her photo: mirrored, turned, darkened; not from the video), and a config whose
    only camera is the video file and whose sink is a JSON-lines file. Then runs the unit on it and prints each hit:
    the astronaut once per appearance, the cameraman never.

    \b
    With --console, serves the operators' web console on a temporary store seeded with made-up
    hits, four units, a register of three persons and three accounts (printed), until Ctrl-C.

    \b
    Examples:
      python -m testing.demo --out /tmp/edge-demo
      python -m testing.demo --console   # then open http://127.0.0.1:8080
    """
    if console:
        from testing.console_demo import serve_demo

        serve_demo(http_port)
        return
    try:
        result = run_demo(out_dir, seconds=seconds, verbose=verbose, echo=click.echo)
    except DemoError as exc:
        click.echo(f"demo failed: {exc}", err=True)
        sys.exit(1)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
