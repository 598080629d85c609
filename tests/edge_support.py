"""Shared parts of the edge pipeline and daemon tests: the engine, the people in the clips, a signed watchlist.

People come from the evaluation set (../shared/data/lag-dev) where present: one person enrolled,
one who is not, chosen so the face model tells them apart clearly (these tests are about the
pipeline, not the model's accuracy). Without the set, the astronaut (enrolled from an altered
copy of her photo) and the cameraman from scikit-image stand in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.media import lag_people, load_rgb

THRESHOLD = 0.90


@functools.lru_cache(maxsize=1)
def _engine() -> Any:
    from engines.face_engine import FaceEngine

    return FaceEngine.load()


def engine_or_skip() -> Any:
    """The default face engine, or a skip naming why it cannot load."""
    try:
        import engines.face_engine  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"needs the face engine (engines.face_engine): {exc}")
    try:
        return _engine()
    except Exception as exc:  # the reason is the skip message
        pytest.skip(f"the face engine could not load its models: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class People:
    """Who the clips show: `enrolled_face` (in the watchlist as `enrolled_id`) and `other_face` (not)."""

    source: str
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
        usable: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        for person in candidates:
            face = _pad(load_rgb(person.adult[0]))
            enrol = np.ascontiguousarray(face[:, ::-1])
            e1, e2 = _embedding(engine, face), _embedding(engine, enrol)
            if e1 is None or e2 is None or float(e1 @ e2) < THRESHOLD + 0.05:
                continue
            usable.append((person.name, face, enrol, e1))
            if len(usable) >= 6:
                break
        # The pair the model tells apart best (dlib's cosines between strangers sit around 0.8).
        pairs = sorted((float(x[3] @ y[3]), i, j) for i, x in enumerate(usable) for j, y in enumerate(usable) if i < j)
        if pairs and pairs[0][0] < THRESHOLD - 0.1:
            _, i, j = pairs[0]
            name, face, enrol, _emb = usable[i]
            return People("lag-dev", name.replace(" ", "_")[:60] or "person", face, enrol, usable[j][1])
    from edge.demo import astronaut_photo, cameraman_photo, enrolment_photo

    return People(
        "scikit-image",
        "astronaut",
        astronaut_photo()[0:300, 90:390],
        enrolment_photo(),
        cameraman_photo()[40:300, 120:380],
    )


def people_or_skip() -> People:
    engine_or_skip()
    return _people()


def signed_store(tmp: Path, people: People, threshold: float = THRESHOLD) -> tuple[Path, Path]:
    """Build a signed watchlist holding the enrolled person (as HQ does) and apply it to a unit store.

    Returns (root public key, store path)."""
    from edge.demo import apply_watchlist, build_watchlist

    engine = _engine()
    root_pub, bundle = build_watchlist(
        tmp, engine, {people.enrolled_id: [people.enrolment_photo]}, default_threshold=threshold
    )
    store = tmp / "unit-state" / "watchlist.db"
    apply_watchlist(store, root_pub, bundle, engine.model_id, engine.embedding_dim)
    return root_pub, store


def matcher_for(root_pub: Path, store: Path) -> Any:
    """A matcher loaded from a unit store, as the daemon loads it."""
    from edge.matcher import Matcher
    from sync.apply import Watchlist
    from sync.config import WatchlistConfig

    engine = _engine()
    matcher = Matcher(dim=engine.embedding_dim)
    wl = Watchlist(WatchlistConfig(root_key=root_pub, store=store), matcher, model_id=engine.model_id)
    wl.start()
    wl.close()
    return matcher
