"""Shared parts of the edge pipeline and daemon tests: the engine, the people in the clips, a signed watchlist.

People come from the evaluation set (../shared/data/lag-dev) where present: one person enrolled,
one who is not, chosen so the face model tells them apart clearly (these tests are about the
pipeline, not the model's accuracy). Without the set, the astronaut (enrolled from an altered
copy of her photo) and the cameraman from scikit-image stand in. The watchlist threshold is set
halfway between the two people's similarities to the enrolment photo, so the tests hold whatever
scale the engine's cosine similarities have.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from testing.media import lag_people, load_rgb
from tests.services import missing_model


@functools.lru_cache(maxsize=1)
def _engine() -> Any:
    from engines.face_engine import FaceEngine

    return FaceEngine.load()


def engine_or_skip() -> Any:
    """The default face engine, or a skip when the package that ships the detector's weights is
    absent (a failure under CI=true, which installs it). Any other failure to load is a failure of
    the tests that need it, not a skip."""
    from engines.mtcnn_convert import MtcnnWeightsError

    try:
        return _engine()
    except MtcnnWeightsError as exc:
        missing_model(f"the face engine needs the detector weights: {exc}")


@dataclass(frozen=True)
class People:
    """Who the clips show: `enrolled_face` (in the watchlist as `enrolled_id`) and `other_face` (not)."""

    source: str
    threshold: float  # halfway between the enrolled person's and the other person's similarity to the enrolment
    enrolled_id: str
    enrolled_face: np.ndarray  # as pasted into clips
    enrolment_photo: np.ndarray  # as enrolled (a different rendering of the person)
    other_face: np.ndarray


def _pad(face: np.ndarray, margin: float = 0.35, height: int = 220) -> np.ndarray:
    import cv2

    m = int(face.shape[0] * margin)
    padded = cv2.copyMakeBorder(face, m, m, m, m, cv2.BORDER_REPLICATE)
    w = round(padded.shape[1] * height / padded.shape[0])
    return cv2.resize(padded, (w, height), interpolation=cv2.INTER_CUBIC)


def _embedding(engine: Any, image: np.ndarray) -> np.ndarray | None:
    faces = engine.analyze(image)
    if len(faces) != 1 or not faces[0].quality.ok or faces[0].embedding is None:
        return None
    return faces[0].embedding


@functools.lru_cache(maxsize=1)
def _people() -> People:
    engine = _engine()
    candidates = lag_people(24, seed=3)
    if candidates:
        usable: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for person in candidates:
            face = _pad(load_rgb(person.adult[0]))
            enrol = np.ascontiguousarray(face[:, ::-1])
            e1, e2 = _embedding(engine, face), _embedding(engine, enrol)
            if e1 is not None and e2 is not None:
                usable.append((person.name, face, enrol, e1, e2))
            if len(usable) >= 6:
                break
        # The pair the model tells apart best, measured as the pipeline will: clip face against enrolment.
        pairs = []
        for i, a in enumerate(usable):
            for j, b in enumerate(usable):
                if i != j:
                    genuine, impostor = float(a[3] @ a[4]), float(b[3] @ a[4])
                    pairs.append((genuine - impostor, genuine, impostor, i, j))
        if pairs:
            gap, genuine, impostor, i, j = max(pairs)
            if gap > 0.01:
                name, face, enrol = usable[i][:3]
                pid = name.replace(" ", "_")[:60] or "person"
                return People("lag-dev", (genuine + impostor) / 2, pid, face, enrol, usable[j][1])
    from testing.demo import astronaut_photo, cameraman_photo, enrolment_photo

    face, other, enrol = astronaut_photo()[0:300, 90:390], cameraman_photo()[40:300, 120:380], enrolment_photo()
    e_enrol = _embedding(engine, enrol)
    e_face = _embedding(engine, face)
    other_faces = engine.analyze(other, embed_rejected=True)
    if e_enrol is None or e_face is None or len(other_faces) != 1:
        missing_model("the engine does not find the scikit-image faces the tests fall back on")
    genuine, impostor = float(e_face @ e_enrol), float(other_faces[0].embedding @ e_enrol)
    return People("scikit-image", (genuine + impostor) / 2, "astronaut", face, enrol, other)


def people_or_skip() -> People:
    """The people of the clips, or a skip (a failure under CI=true) when the engine is missing or does
    not find the faces."""
    engine_or_skip()
    return _people()


def signed_store(tmp: Path, people: People, threshold: float | None = None) -> tuple[Path, Path]:
    """Build a signed watchlist holding the enrolled person (as HQ does) and apply it to a unit store.

    Returns (root public key, store path)."""
    from testing.demo import apply_watchlist, build_watchlist

    engine = _engine()
    root_pub, bundle = build_watchlist(
        tmp,
        engine,
        {people.enrolled_id: [people.enrolment_photo]},
        default_threshold=people.threshold if threshold is None else threshold,
    )
    store = tmp / "unit-state" / "watchlist.db"
    apply_watchlist(store, root_pub, bundle, engine.model_id, engine.embedding_dim)
    return root_pub, store


def matcher_for(root_pub: Path, store: Path) -> Any:
    """A matcher loaded from a unit store, as the daemon loads it."""
    from matching.matcher import Matcher
    from watchlist.unit.apply import Watchlist
    from watchlist.unit.config import WatchlistConfig

    engine = _engine()
    matcher = Matcher(dim=engine.embedding_dim)
    wl = Watchlist(WatchlistConfig(root_key=root_pub, store=store), matcher, model_id=engine.model_id)
    wl.start()
    wl.close()
    return matcher
