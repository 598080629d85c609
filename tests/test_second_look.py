"""The second look: faces whose score comes near a decision are embedded again with their mirror
image (the flip-averaged embedding), the rest once. Real engine, real calibration, real watchlist."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.decision import DecisionConfig
from edge.pipeline import CameraSpec, Pipeline
from edge.sinks import MemorySink
from testing.media import make_face_clip
from tests.edge_support import People, matcher_for, signed_store
from tests.services import missing_model
from tests.test_pipeline import FPS, SIZE, decode


@pytest.fixture(scope="module")
def items(engine: Any, people: People) -> list[tuple[np.ndarray, Any]]:
    out = []
    for image in (people.enrolled_face, people.other_face, people.enrolment_photo):
        dets = engine.detect(image)
        assert dets, "the test faces must be found"
        out.append((image, dets[0]))
    return out


@pytest.fixture(scope="module")
def flip_engine() -> Any:
    from engines.config import EngineConfig
    from engines.face_engine import FaceEngine

    return FaceEngine.load(EngineConfig(flip_average=True))


def test_second_look_gives_the_flip_averaged_embedding_to_the_faces_asked(
    engine: Any, flip_engine: Any, items: list
) -> None:
    plain = engine.embed(items)
    flipped = flip_engine.embed(items)
    seen: list[np.ndarray] = []
    mask = np.array([True, False, True])

    def near(embeddings: np.ndarray) -> np.ndarray:
        seen.append(embeddings.copy())
        return mask

    got = engine.embed(items, look_again=near)
    assert len(seen) == 1 and np.allclose(seen[0], plain, atol=1e-6)  # it decides on the plain embeddings
    np.testing.assert_allclose(got[mask], flipped[mask], atol=1e-6)
    np.testing.assert_array_equal(got[~mask], plain[~mask])
    assert not np.allclose(got[0], plain[0], atol=1e-4)  # the mirror image does change the embedding
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_second_look_mask_is_checked_and_skipped_when_every_face_is_flipped(
    engine: Any, flip_engine: Any, items: list
) -> None:
    with pytest.raises(ValueError, match="boolean mask of shape"):
        engine.embed(items, look_again=lambda e: np.ones(2, dtype=bool))
    with pytest.raises(ValueError, match="boolean mask"):
        engine.embed(items, look_again=lambda e: np.ones(3))
    calls = []
    flip_engine.embed(items, look_again=lambda e: calls.append(e) or np.ones(len(e), dtype=bool))
    assert calls == []  # flip_average already looks at every face twice


def _pipeline(engine: Any, matcher: Any, second_look_fpir: float) -> tuple[Pipeline, MemorySink]:
    sink = MemorySink()
    pipe = Pipeline(
        unit_id="unit-t",
        cameras=[CameraSpec("cam1", None, 5.0)],  # type: ignore[arg-type]
        engine=engine,
        matcher=matcher,
        sinks=[sink],
        matching=DecisionConfig(cooldown_s=1.0, second_look_fpir=second_look_fpir),
    )
    return pipe, sink


def test_second_look_level_follows_the_calibration_and_the_list(engine: Any, people: People, tmp_path: Path) -> None:
    from engines.calibration import Calibration

    matcher = matcher_for(*signed_store(tmp_path, people, threshold=0.999))
    pipe, _ = _pipeline(engine, matcher, 0.2)
    cal = Calibration.for_engine(engine)
    level = pipe.second_look.level(matcher)
    assert level == pytest.approx(cal.threshold_for_fpir(0.2, 1, 1.0).threshold)
    assert cal.strangers_median < level < 0.999
    # Never above the threshold: a list whose threshold is below the level looks again from the threshold.
    low = matcher_for(*signed_store(tmp_path / "low", people, threshold=cal.strangers_median + 0.001))
    assert pipe.second_look.level(low) == pytest.approx(cal.strangers_median + 0.001)
    assert _pipeline(engine, matcher, 0.0)[0].second_look.level(matcher) is None
    from matching.matcher import Matcher

    assert pipe.second_look.level(Matcher(dim=engine.embedding_dim)) is None  # no list yet


def _stranger(engine: Any, matcher: Any, below: float, people: People) -> np.ndarray:
    """Someone not on the list whom the pipeline embeds and who scores below `below` against everyone on it: the
    other person where the quality gate lets his face through (lag-dev's people), else the first such face of
    scikit-image's LFW sample (scikit-image's cameraman, the other person without lag-dev, is in profile: the
    gate turns him away, and he never reaches the embedder)."""
    import cv2
    from skimage import data

    def lfw() -> Iterator[np.ndarray]:
        for face in data.lfw_subset()[:100]:  # the first 100 are faces (25 x 25 grey, cut tight)
            big = cv2.resize((face * 255).astype(np.uint8), (200, 200), interpolation=cv2.INTER_CUBIC)
            yield np.stack([cv2.copyMakeBorder(big, 60, 60, 60, 60, cv2.BORDER_REPLICATE)] * 3, axis=-1)

    for image in itertools.chain([people.other_face], lfw()):
        faces = engine.analyze(image)
        if len(faces) == 1 and faces[0].quality.ok:
            (match,) = matcher.match(faces[0].embedding[None], misses=True)
            if match is None or match.score < below:
                return image
    missing_model("no face of someone else passes the quality gate")


def test_pipeline_looks_again_only_at_faces_near_a_decision(engine: Any, people: People, tmp_path: Path) -> None:
    from engines.calibration import Calibration

    matcher = matcher_for(*signed_store(tmp_path, people))
    # A stranger far from everyone on the list: below the strangers' median, well under the second look's level.
    stranger = _stranger(engine, matcher, Calibration.for_engine(engine).strangers_median, people)
    clip = make_face_clip(
        tmp_path / "both.mp4",
        [(people.enrolled_face, 0.0, 3.0, 40, 60, 200), (stranger, 0.0, 3.0, 380, 70, 200)],
        size=SIZE,
        fps=FPS,
        seconds=3.0,
    )
    frames = decode(clip, "cam1", 1_700_000_000.0, every=2)
    rows: list[int] = []

    class Counting:
        """The real matcher, counting the rows it is asked to match."""

        def __getattr__(self, name: str) -> Any:
            return getattr(matcher, name)

        def match(self, embeddings: np.ndarray, *, misses: bool = False) -> list:
            rows.append(len(embeddings))
            return matcher.match(embeddings, misses=misses)

    pipe, sink = _pipeline(engine, Counting(), 0.2)
    level = pipe.second_look.level(matcher)
    assert level is not None
    calls = []
    for f in frames:
        before = len(rows)
        pipe.process_frame(f)
        if len(rows) > before:
            calls.append(rows[before:])
    st = pipe.stats()["cam1"]
    # Each face is matched once, and again only when looked at again (besides its track's probe): in a batch
    # with a face far from everyone, the second call (if any) holds fewer rows than the first.
    assert sum(c[0] for c in calls) == st["embedded"]
    assert any(len(c) == 1 or c[1] < c[0] for c in calls), calls
    assert all(len(c) <= 2 and sum(c[1:]) <= c[0] * 2 for c in calls), calls
    assert [h.person_id for h in sink.hits] == [people.enrolled_id]
    # The enrolled person's faces score above the level and are looked at again; the stranger's are not.
    assert 1 <= st["second_looks"] < st["embedded"]
    off, off_sink = _pipeline(engine, matcher, 0.0)
    for f in frames:
        off.process_frame(f)
    assert off.stats()["cam1"]["second_looks"] == 0
    assert [h.person_id for h in off_sink.hits] == [people.enrolled_id]
