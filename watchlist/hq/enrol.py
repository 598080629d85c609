"""Enrolment at HQ: photos in, templates into the register, and a report of every photo refused.

Each photo goes through the same face engine as the units (detection, alignment, quality gate,
embedder). A photo is refused when no face is found, when several are (crop it to the person),
or when the face fails the quality gate (the engine's reasons are given). Several photos of one
person (different ages) become separate templates.

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

import csv
import datetime as dt
import hashlib
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

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_COLUMNS = ("person_id", "photo", "photo_date", "age", "name", "priority", "threshold")
_NAME_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})")
_NAME_AGE = re.compile(r"^age[-_]?(\d{1,3})(?!\d)", re.IGNORECASE)


class EngineLike(Protocol):
    """What enrolment needs from engines.face_engine.FaceEngine."""

    model_id: str

    def analyze(self, image: np.ndarray) -> list[Any]: ...


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
    enrolled: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    persons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{len(self.enrolled)} photos enrolled for {len(self.persons)} persons, "
            f"{len(self.rejected)} rejected, {len(self.duplicates)} already enrolled"
        )


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
    reader = csv.DictReader(text.splitlines())
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


def embed_photo(engine: EngineLike, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The embedding of the one face in `image`, or None and the reason it cannot be enrolled."""
    faces = engine.analyze(image)
    if not faces:
        return None, "no face found"
    if len(faces) > 1:
        return None, f"{len(faces)} faces found: crop the photo to the missing person"
    face = faces[0]
    if not face.quality.ok or face.embedding is None:
        reasons = ", ".join(face.quality.reasons) or "quality gate"
        return None, f"face quality too low ({reasons})"
    return np.asarray(face.embedding, dtype=np.float32), None


def enrol(
    register: Register,
    engine: EngineLike,
    entries: Sequence[PhotoEntry],
    *,
    load: Callable[[Path], np.ndarray] | None = None,
    report: EnrolmentReport | None = None,
) -> EnrolmentReport:
    """Run every photo through `engine` and add the accepted ones to `register`.

    A person is written only when at least one of their photos is accepted; their name, priority
    and threshold come from their first entry that gives each.
    """
    if load is None:
        from engines.image import load_image as load
    report = report or EnrolmentReport(model_id=engine.model_id)
    accepted: dict[str, list[tuple[PhotoEntry, np.ndarray, str]]] = {}
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
        try:
            raw = e.photo.read_bytes()
            image = load(e.photo)
        except Exception as exc:  # a photo that cannot be read is a reported refusal, not a crash
            report.rejected.append({**base, "reason": f"cannot read the photo: {exc}"})
            continue
        emb, reason = embed_photo(engine, image)
        if emb is None:
            report.rejected.append({**base, "reason": reason})
            continue
        accepted.setdefault(e.person_id, []).append((e, emb, hashlib.sha256(raw).hexdigest()))
    for pid, items in accepted.items():
        d = details[pid]
        register.upsert_person(pid, name=d.get("name"), priority=d.get("priority", 0), threshold=d.get("threshold"))
        for e, emb, digest in items:
            base = {"where": e.where, "person_id": pid, "photo": str(e.photo)}
            if register.add_template(
                pid, emb, model_id=engine.model_id, photo_sha256=digest, photo_date=e.photo_date, age=e.age
            ):
                report.enrolled.append(base)
            else:
                report.duplicates.append({**base, "reason": "this photo is already enrolled for this person"})
        report.persons.append(pid)
    for pid in details:
        if pid not in accepted:
            report.warnings.append(f"person {pid}: no usable photo, not enrolled")
    log.info("enrolment: %s", report.summary())
    return report


def entries_from(source: Path) -> tuple[list[PhotoEntry], list[dict]]:
    """Entries from a CSV manifest (a file) or a folder."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source)
    if source.is_file():
        return read_manifest(source)
    raise EnrolmentError(f"{source} is neither a CSV manifest nor a folder of photos")
