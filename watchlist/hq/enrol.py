"""Enrolment at HQ: photos in, templates into the register, and a report of every photo refused.

Each photo goes through the same face engine as the units (detection, alignment, quality gate,
embedder). A photo is refused when no face is found, when two plausible faces compete (crop it
to the person; a face that clearly dominates the others is enrolled with a warning, see
`judge_photo`), or when the face fails the quality gate; each reason names the measured value
and its limit. Several photos of one person (different ages) become separate templates.

Input is a CSV manifest::

    person_id,photo,photo_date,age,name,priority,threshold
    case-2024-0173,photos/0173-a.jpg,2019-06-01,,,2,
    case-2024-0173,photos/0173-b.jpg,,9,,,

(photo paths relative to the manifest; `photo_date` YYYY-MM-DD or `age` in years, at least one;
name, priority 0-9 and a threshold override are optional and taken from the person's first row
that gives them) -- or a folder ``<folder>/<person_id>/<photo>`` whose file names start with the
date (``2019-06-01_front.jpg``) or the age (``age9.jpg``).
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import hashlib
import io
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from watchlist.format.bundle import BundleFormatError, check_person_id
from watchlist.format.errors import EnrolmentError
from watchlist.hq.register import Register
from wire.records import CANARY_PERSON_ID

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_COLUMNS = ("person_id", "photo", "photo_date", "age", "name", "priority", "threshold")
_NAME_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})")
_NAME_AGE = re.compile(r"^age[-_]?(\d{1,3})(?!\d)", re.IGNORECASE)


class EngineLike(Protocol):
    """What enrolment needs from engines.face_engine.FaceEngine."""

    model_id: str

    def analyze(self, image: np.ndarray) -> list[Any]: ...

    def assess(self, image: np.ndarray, detection: Any) -> Any: ...


@dataclass(frozen=True)
class PhotoEntry:
    """One photo to enrol, from a manifest row or a folder."""

    person_id: str
    photo: Path
    photo_date: str | None = None
    age: int | None = None
    name: str | None = None
    priority: int | None = None
    threshold: float | None = None
    where: str = ""  # manifest line or folder path, for the report


@dataclass
class EnrolmentReport:
    """What happened to every photo; `rejected` lists each refused photo with its reason."""

    model_id: str
    dry_run: bool = False
    enrolled: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    persons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verb = "would be enrolled" if self.dry_run else "enrolled"
        return (
            f"{len(self.enrolled)} photos {verb} for {len(self.persons)} persons, "
            f"{len(self.rejected)} rejected, {len(self.duplicates)} already enrolled"
        )

    def exit_status(self) -> int:
        """0: every photo enrolled (or already was); 1: some refused; 2: none enrolled."""
        if not self.enrolled and not self.duplicates:
            return 2
        return 1 if self.rejected else 0


def _entry_error(where: str, msg: str) -> dict:
    return {"where": where, "reason": msg}


def _parse_date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"photo_date {text!r} is not a date (YYYY-MM-DD)") from None


def read_manifest(path: Path) -> tuple[list[PhotoEntry], list[dict]]:
    """Entries of a CSV manifest, and the rows refused (with line and reason) before any photo is opened."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrolmentError(f"cannot read manifest {path}: {exc}") from None
    # Rows end only at CSV line ends: str.splitlines would also split at U+2028 and friends inside a field.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"person_id", "photo"} - set(reader.fieldnames or ())
    if missing:
        raise EnrolmentError(
            f"manifest {path}: header must name the columns {', '.join(_COLUMNS)} "
            f"(person_id and photo are required; missing {', '.join(sorted(missing))})"
        )
    unknown = set(reader.fieldnames or ()) - set(_COLUMNS)
    if unknown:
        raise EnrolmentError(
            f"manifest {path}: unknown columns {', '.join(sorted(unknown))}; allowed: {', '.join(_COLUMNS)}"
        )
    entries: list[PhotoEntry] = []
    errors: list[dict] = []
    for line, row in enumerate(reader, start=2):
        where = f"{path.name}:{line}"
        get = lambda k, row=row: (row.get(k) or "").strip()  # noqa: E731
        try:
            pid = check_person_id(get("person_id"))
            photo = Path(get("photo"))
            if not get("photo"):
                raise ValueError("photo is empty")
            photo = photo if photo.is_absolute() else path.parent / photo
            date = _parse_date(get("photo_date")) if get("photo_date") else None
            age = int(get("age")) if get("age") else None
            if age is not None and not 0 <= age <= 130:
                raise ValueError(f"age {age} is not an age in years")
            if date is None and age is None:
                raise ValueError("give photo_date (YYYY-MM-DD) or age (years in the photo)")
            priority = int(get("priority")) if get("priority") else None
            if priority is not None and not 0 <= priority <= 9:
                raise ValueError(f"priority {priority} must be 0..9")
            threshold = float(get("threshold")) if get("threshold") else None
            if threshold is not None and not -1.0 < threshold < 1.0:
                raise ValueError(f"threshold {threshold} must be a cosine similarity in (-1, 1)")
        except (ValueError, BundleFormatError) as exc:
            errors.append(
                {**_entry_error(where, str(exc)), "person_id": row.get("person_id"), "photo": row.get("photo")}
            )
            continue
        entries.append(PhotoEntry(pid, photo, date, age, get("name") or None, priority, threshold, where))
    return entries, errors


def scan_folder(folder: Path) -> tuple[list[PhotoEntry], list[dict]]:
    """Entries of a folder laid out as ``<folder>/<person_id>/<photo>``; date or age from the file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EnrolmentError(f"{folder} is not a folder")
    entries: list[PhotoEntry] = []
    errors: list[dict] = []
    for person_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for photo in sorted(p for p in person_dir.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES):
            where = str(photo.relative_to(folder))
            try:
                pid = check_person_id(person_dir.name)
                m_date, m_age = _NAME_DATE.match(photo.name), _NAME_AGE.match(photo.name)
                date = _parse_date(m_date.group(1)) if m_date else None
                age = int(m_age.group(1)) if m_age else None
                if date is None and age is None:
                    raise ValueError(
                        "file name must start with the photo date (2019-06-01_x.jpg) or the age "
                        "(age9.jpg); or use a CSV manifest"
                    )
            except (ValueError, BundleFormatError) as exc:
                errors.append({**_entry_error(where, str(exc)), "person_id": person_dir.name, "photo": str(photo)})
                continue
            entries.append(PhotoEntry(pid, photo, date, age, where=where))
    return entries, errors


# A face "clearly dominates" a photo when every other face found is either under this fraction of
# its height (a quarter of its area) or less confident than the quality gate's detector floor.
# Such photos are enrolled with a warning; two faces above both limits compete and the photo is
# refused. docs/watchlist.md says the same.
DOMINANT_HEIGHT_RATIO = 0.5
# MTCNN's smallest window: faces under this many pixels cannot be found at all, whatever the pyramid.
FINEST_FACE_PX = 12


@dataclass
class PhotoVerdict:
    """What enrolment measured on one photo, and whether it can be enrolled."""

    embedding: np.ndarray | None = None
    faces: int = 0
    face_px: float | None = None  # height of the enrolled (or judged) face's box
    eye_distance_px: float | None = None
    quality: float | None = None  # the quality gate's score in [0, 1]
    detector_score: float | None = None
    reasons: list[str] = field(default_factory=list)  # why it is refused (empty: accepted)
    warnings: list[str] = field(default_factory=list)  # accepted, but look at this

    def measured(self) -> dict:
        """The measurements for the report (rounded)."""
        r = lambda v, n=1: None if v is None else round(float(v), n)  # noqa: E731
        return {
            "faces": self.faces,
            "face_px": r(self.face_px),
            "eye_distance_px": r(self.eye_distance_px),
            "quality": r(self.quality, 3),
            "detector_score": r(self.detector_score, 3),
        }


def _failures(quality: Any) -> list[str]:
    """The quality gate's failures, each naming the measured value and the limit (engines.quality)."""
    return list(quality.failures) or [f"quality gate: {', '.join(quality.reasons)}"]


def _below_detector(quality: Any, engine: EngineLike) -> str:
    """Why a face only the finer look found is refused although it may pass the gate: the engine's
    detector does not look for faces that small (a 68.6 px face was refused as a bare 'too small')."""
    least = _detector_config(engine).min_face_size  # _finer_look found the face with it: it is there
    return (
        f"too small: face {quality.face_height_px:.1f} px, the detector looks for faces from {least} px "
        "(engine.detector.min_face_size); use a photo where the face is larger"
    )


def _detector_config(engine: EngineLike) -> Any:
    """The settings of the engine's detector (engines.detector.MtcnnConfig), None where it has none."""
    return getattr(getattr(engine, "detector", None), "config", None)


def _gate_config(engine: EngineLike) -> Any:
    from engines.quality import QualityConfig

    cfg = getattr(engine, "config", None)
    return getattr(cfg, "quality", None) or QualityConfig()


def _height(face: Any) -> float:
    return float(face.box[3]) - float(face.box[1])


def _finer_look(engine: EngineLike, image: np.ndarray) -> list[Any]:
    """Faces the engine's detector skipped as smaller than its min_face_size, judged by the gate.

    Only used to explain a refusal: such faces fail the gate's size floor anyway (the default
    detector minimum equals it), but "face 22 px, needs at least 40" tells the clerk what to do.
    """
    detector = getattr(engine, "detector", None)
    config = _detector_config(engine)
    if detector is None or config is None or getattr(config, "min_face_size", FINEST_FACE_PX) <= FINEST_FACE_PX:
        return []
    fine = copy.copy(detector)
    fine.config = config.model_copy(update={"min_face_size": FINEST_FACE_PX})
    return [(d, engine.assess(image, d)) for d in fine.detect(image)]


def judge_photo(engine: EngineLike, image: np.ndarray) -> PhotoVerdict:
    """Find the face to enrol in `image`: the only face, or the one that clearly dominates.

    Refused (with reasons naming the measured values and limits) when no usable face is found,
    when the face fails the quality gate, or when two plausible faces compete.
    """
    gate = _gate_config(engine)
    faces = sorted(engine.analyze(image), key=_height, reverse=True)
    v = PhotoVerdict(faces=len(faces))
    if not faces:
        small = sorted(_finer_look(engine, image), key=lambda dq: dq[1].face_height_px, reverse=True)
        if not small:
            v.reasons.append(
                f"no face found (the detector finds faces from {FINEST_FACE_PX} px high up; "
                "use a photo where the face is larger and turned to the camera)"
            )
            return v
        det, q = small[0]
        v.faces, v.face_px, v.eye_distance_px = len(small), q.face_height_px, q.eye_distance_px
        v.quality, v.detector_score = q.score, q.detector_score
        v.reasons.append(
            "too small: " + "; ".join(q.failures) if "too_small" in q.reasons else _below_detector(q, engine)
        )
        return v
    main = faces[0]
    q = main.quality
    v.face_px, v.eye_distance_px, v.quality, v.detector_score = _height(main), q.eye_distance_px, q.score, main.score
    competing = [
        f
        for f in faces[1:]
        if _height(f) >= DOMINANT_HEIGHT_RATIO * _height(main) and f.score >= gate.min_detector_score
    ]
    if competing:
        sizes = ", ".join(f"{_height(f):.0f} px ({f.score:.2f})" for f in [main, *competing])
        v.reasons.append(
            f"{1 + len(competing)} plausible faces compete: {sizes}; a face is enrolled only when every other is "
            f"under {DOMINANT_HEIGHT_RATIO:g} of its height or below confidence {gate.min_detector_score:g}: "
            "crop the photo to the missing person"
        )
        return v
    for f in faces[1:]:
        v.warnings.append(
            f"another face ignored: {_height(f):.0f} px (confidence {f.score:.2f}) beside the enrolled "
            f"{v.face_px:.0f} px face; check that the enrolled face is the missing person"
        )
    if not q.ok or main.embedding is None:
        v.reasons.extend(_failures(q))
        return v
    v.embedding = np.asarray(main.embedding, dtype=np.float32)
    return v


def embed_photo(engine: EngineLike, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The embedding of the face to enrol in `image`, or None and the reasons it cannot be enrolled."""
    v = judge_photo(engine, image)
    return v.embedding, ("; ".join(v.reasons) or None)


def enrol(
    register: Register | None,
    engine: EngineLike,
    entries: Sequence[PhotoEntry],
    *,
    load: Callable[[Path], np.ndarray] | None = None,
    report: EnrolmentReport | None = None,
) -> EnrolmentReport:
    """Run every photo through `engine` and add the accepted ones to `register`.

    A person is written only when at least one of their photos is accepted; their name, priority
    and threshold come from their first entry that gives each. With `register` None nothing is
    written (a dry run): the report says what would be enrolled.
    """
    if load is None:
        from engines.image import load_image

        load = load_image
    report = report or EnrolmentReport(model_id=engine.model_id)
    accepted: dict[str, list[tuple[PhotoEntry, np.ndarray, str, dict]]] = {}
    details: dict[str, dict[str, Any]] = {}
    for e in entries:
        d = details.setdefault(e.person_id, {})
        for key in ("name", "priority", "threshold"):
            value = getattr(e, key)
            if value is None:
                continue
            if key in d and d[key] != value:
                report.warnings.append(
                    f"{e.where}: {key} {value!r} differs from the person's earlier {d[key]!r}; the earlier one is kept"
                )
            d.setdefault(key, value)
        base = {"where": e.where, "person_id": e.person_id, "photo": str(e.photo)}
        if e.person_id == CANARY_PERSON_ID:
            # Its hits are hidden from operators: a missing person under this id would never be seen.
            report.rejected.append(
                {
                    **base,
                    "reason": f"{CANARY_PERSON_ID!r} is reserved for the units' canary (`watchlist enrol-canary`): "
                    "give the person another id",
                    "reasons": [],
                }
            )
            continue
        try:
            raw = e.photo.read_bytes()
            image = load(e.photo)
        except Exception as exc:  # a photo that cannot be read is a reported refusal, not a crash
            report.rejected.append({**base, "reason": f"cannot read the photo: {exc}", "reasons": []})
            continue
        v = judge_photo(engine, image)
        row = {**base, **v.measured(), "warnings": v.warnings}
        report.warnings.extend(f"{e.where}: {w}" for w in v.warnings)
        if v.embedding is None:
            report.rejected.append({**row, "reason": "; ".join(v.reasons), "reasons": v.reasons})
            continue
        accepted.setdefault(e.person_id, []).append((e, v.embedding, hashlib.sha256(raw).hexdigest(), row))
    for pid, items in accepted.items():
        d = details[pid]
        if register is not None:
            register.upsert_person(pid, name=d.get("name"), priority=d.get("priority", 0), threshold=d.get("threshold"))
        for e, emb, digest, row in items:
            if register is None:
                new = True
            else:
                new = register.add_template(
                    pid, emb, model_id=engine.model_id, photo_sha256=digest, photo_date=e.photo_date, age=e.age
                )
            if new:
                report.enrolled.append(row)
            else:
                report.duplicates.append({**row, "reason": "this photo is already enrolled for this person"})
        report.persons.append(pid)
    for pid in details:
        if pid not in accepted:
            report.warnings.append(f"person {pid}: no usable photo, not enrolled")
    log.info("enrolment: %s", report.summary())
    return report


def enrol_canary(register: Register, engine: EngineLike, photo: np.ndarray) -> int:
    """Enrol the canary person (wire.records.CANARY_PERSON_ID) from the pinned canary `photo`
    (engines.canary_media) with HQ's engine, so every list built for the engine's model holds it;
    returns how many templates were new (0 when it was enrolled before). Raises EnrolmentError
    when the engine finds no usable face in it (the engine is then broken: the photo is fixed)."""
    from engines.canary_media import enrolment_pictures

    embeddings = []
    for i, picture in enumerate(enrolment_pictures(photo)):
        v = judge_photo(engine, picture)
        if v.embedding is None:
            raise EnrolmentError(
                f"the canary picture {i} is refused by the engine ({'; '.join(v.reasons)}): the pinned picture is "
                "fixed, so the engine or its models are not what they should be (`engines selftest`)"
            )
        embeddings.append((hashlib.sha256(np.ascontiguousarray(picture).tobytes()).hexdigest(), v.embedding))
    register.upsert_person(CANARY_PERSON_ID, name=None, priority=0, threshold=None)
    new = sum(
        register.add_template(CANARY_PERSON_ID, emb, model_id=engine.model_id, photo_sha256=digest)
        for digest, emb in embeddings
    )
    log.info("canary person enrolled for model %s: %d new templates", engine.model_id, new)
    return new


def entries_from(source: Path) -> tuple[list[PhotoEntry], list[dict]]:
    """Entries from a CSV manifest (a file) or a folder."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source)
    if source.is_file():
        return read_manifest(source)
    raise EnrolmentError(f"{source} is neither a CSV manifest nor a folder of photos")
