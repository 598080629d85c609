"""The pipeline bench's scene: who appears when, the clip made from their photos, the threshold the
peer's tolerance corresponds to, and judging alerts against the clip's ground truth."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FPS = 10
SIZE = (1280, 720)
DEFAULT_THRESHOLD = 0.99  # cosine, our matcher, when the equivalence below cannot be measured (as the demo)
PEER_TOLERANCE = 0.5  # Euclidean, as in face_recognition's video example


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


def _usable_people(engine: Any, candidates: list[Any]) -> list[Any]:
    """3 persons whose two adult photos both show one face that passes the quality gate (enrolled
    from one, shown in the other), then 3 persons with one such photo (never enrolled)."""
    from testing.media import load_rgb

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


def equivalent_threshold(engine: Any, photos: list[Path]) -> dict[str, Any]:
    """Our cosine threshold that decides as the peer's Euclidean tolerance does, measured on `photos`.

    The peer compares dlib's raw descriptors by Euclidean distance; ours compares `engine`'s unit-length
    embeddings by cosine. Over every pair of the photos, cosine is fitted as a + b * distance^2; the
    threshold is the fit at the peer's tolerance. With dlib's ResNet (norm-anchored) the fit is close to
    exact; with another model it is a regression (its `corr` says how close), so compare models with
    --fpir instead.
    """
    import face_recognition

    from testing.media import load_rgb

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


def distractor_templates(work: Path, exclude: set[str], config: Any) -> dict[str, Any]:
    """Every lag-dev identity's young photos (but `exclude`'s), embedded as the accuracy bench does by the
    models of `config` (an EngineConfig), saved to `work`/distractors.npz: the watchlist's missing children
    who are not in the clip."""
    from bench.accuracy import run_ours
    from bench.lag import DEFAULT_DATA, list_photos
    from testing.media import LAG_DIR

    root = LAG_DIR if LAG_DIR.is_dir() else DEFAULT_DATA
    if not root.is_dir():
        raise SystemExit(f"--distractors needs the evaluation data at {root} (../shared/data/lag-dev)")
    photos = [p for p in list_photos(root) if p.young and p.identity not in exclude]
    embs, info = run_ours(photos, flip=config.flip_average, config=config)
    kept = [(p.identity, e) for p, e in zip(photos, embs) if e is not None]
    path = work / "distractors.npz"
    np.savez(
        path,
        ids=np.array([f"child-{i}" for i, _ in kept]),
        emb=np.stack([e for _, e in kept]).astype(np.float32),
    )
    return {
        "path": str(path),
        "persons": len({i for i, _ in kept}),
        "templates": len(kept),
        "photos_without_face": info["no_face"],
        "excluded_persons_shown": sorted(exclude),
    }


def prepare(work: Path, seconds: float, config: Any, distractors: bool = False) -> dict[str, Any]:
    """Write the clip and the enrolment photos into `work`; return the plan (ground truth and paths).
    `config`: the EngineConfig of our pipeline; `distractors`: also embed every other lag-dev identity's
    young photos (see distractor_templates)."""
    import cv2

    from engines.ensemble import describe
    from engines.face_engine import FaceEngine
    from testing.media import lag_people, load_rgb, make_face_clip

    engine = FaceEngine.load(config)

    photos: dict[str, list[str]] = {}
    placements = []
    appearances: list[Appearance] = []
    people = _usable_people(engine, lag_people(60, seed=11))
    shown_names = {p.name for p in people}
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
    calibration = equivalent_threshold(engine, [p.adult[0] for p in lag_people(40, seed=5)])
    extra = distractor_templates(work, shown_names, config) if distractors else None
    return {
        "engine": {
            "model_id": engine.model_id,
            "members": describe(config.members()),
            "precision": engine.precision,
            "embedding_dim": engine.embedding_dim,
        },
        "distractors": extra,
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
