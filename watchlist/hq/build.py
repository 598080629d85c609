"""Build a signed bundle from HQ's register: a full snapshot, or a delta against a released version."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.files import atomic_write
from watchlist.format.bundle import Bundle, Person, encode_bundle, frame, parse_verified, sha256_hex
from watchlist.format.errors import RegisterError
from watchlist.format.keys import KeySet, key_id
from watchlist.hq.register import Register

if TYPE_CHECKING:
    from engines.calibration import OperatingPoint

DEFAULT_VALID_FOR_S = 7 * 24 * 3600
DEFAULT_FPIR = 0.01
# An explicit threshold whose expected false alerts per stranger's face exceed this is warned about loudly.
LOUD_FPIR = 0.10
CHILD_AGE = 18


class ThresholdRefused(RegisterError):
    """A threshold HQ must not ship: below the strangers' median, or none given for an uncalibrated model."""


class CanaryRefused(RegisterError):
    """A list that would lack the canary person, which this machine cannot enrol: build refuses it
    unless told --no-canary."""


@dataclass(frozen=True)
class ThresholdChoice:
    """The list's default threshold and why: a calibrated operating point, or an operator's number."""

    threshold: float
    fpir_target: float | None  # None: an explicit --threshold
    point: OperatingPoint | None  # None where the model has no calibration
    cohort: str | None
    warning: str | None  # a loud warning to print (expected false alerts far above the usual)
    summary: str | None = None  # both expected rates in words (Calibration.expected_summary); None uncalibrated

    def as_dict(self) -> dict:
        """What the register keeps with the release."""
        return {
            "threshold": round(self.threshold, 6),
            "fpir_target": self.fpir_target,
            "cohort": self.cohort,
            "expected": self.point.as_dict() if self.point is not None else None,
        }


def list_shape(register: Register, model_id: str) -> tuple[int, float, bool]:
    """(persons on the list, templates per person, whether every template with a known age is a child's)."""
    persons, templates, children, aged = register.db.execute(
        "SELECT count(DISTINCT person_id), count(*), coalesce(sum(age < ?), 0), count(age) "
        "FROM templates WHERE model_id = ?",
        [CHILD_AGE, model_id],
    ).fetchone()
    per = templates / persons if persons else 1.0
    return max(int(persons), 1), max(float(per), 1.0), bool(aged) and children == aged


def choose_threshold(
    register: Register,
    model_id: str,
    *,
    fpir: float | None = None,
    threshold: float | None = None,
    calibration_path: Path | None = None,
) -> ThresholdChoice:
    """The list's default threshold: from the model's calibration at the false-alert rate per face
    `fpir` (default 1%) and the list's size, or an explicit `threshold` checked against it.

    A threshold below the strangers' median is refused (ThresholdRefused); a model with no
    calibration needs an explicit threshold (given now, or remembered from an earlier build).
    """
    from engines.calibration import Calibration, CalibrationError

    if fpir is not None and threshold is not None:
        raise ThresholdRefused("give --fpir or --threshold, not both")
    try:
        cal = Calibration.load(calibration_path) if calibration_path else Calibration.for_thresholds(model_id)
    except CalibrationError as exc:
        if threshold is None:
            stored = register.get_meta(f"threshold:{model_id}")  # what an earlier build was given
            threshold = float(stored) if isinstance(stored, (int, float)) else None
        if threshold is None or fpir is not None:
            raise ThresholdRefused(
                f"model {model_id} has no calibration ({exc}), so no threshold follows from a false-alert rate: "
                "give --threshold, or make a calibration from photos of strangers with "
                "`engines calibrate DIR --out FILE` and pass it with --calibration FILE"
            ) from None
        return ThresholdChoice(float(threshold), None, None, None, None)
    if cal.model != model_id.split(":", 1)[0]:
        raise ThresholdRefused(
            f"{calibration_path}: the calibration is for model {cal.model!r}, the list holds {model_id!r}: "
            "give the calibration of the list's model"
        )
    median = cal.threshold_range[0]
    low = register.db.execute(
        "SELECT person_id, threshold FROM persons WHERE threshold IS NOT NULL AND threshold <= ? AND person_id IN "
        "(SELECT person_id FROM templates WHERE model_id = ?) ORDER BY person_id",
        [median, model_id],
    ).fetchall()
    if low:
        # The units would refuse the whole bundle (bad_threshold): say so at HQ, naming the persons.
        named = ", ".join(f"{pid} ({thr:g})" for pid, thr in low[:10]) + (" ..." if len(low) > 10 else "")
        raise ThresholdRefused(
            f"{len(low)} persons have their own threshold at or below the strangers' median score {median:.4f} for "
            f"model {cal.model}, which units refuse: {named}; clear or raise them in the manifest and enrol again"
        )
    persons, per, children = list_shape(register, model_id)
    cohort = "cross_age" if children and "cross_age" in cal.cohorts else None
    if threshold is None:
        target = DEFAULT_FPIR if fpir is None else float(fpir)
        try:
            point = cal.threshold_for_fpir(target, persons, per, cohort)
        except CalibrationError as exc:
            raise ThresholdRefused(f"--fpir {target}: {exc}") from None
        summary = cal.expected_summary(point.threshold, persons, per, cohort)
        return ThresholdChoice(point.threshold, target, point, cohort, None, summary)
    problem = cal.threshold_problem(float(threshold), persons, per)
    if problem is not None:
        raise ThresholdRefused(
            f"--threshold {problem}. Or leave --threshold out and give the false-alert rate per face instead "
            f"(--fpir, default {DEFAULT_FPIR})"
        )
    point = cal.expected_rates(float(threshold), persons, per, cohort)
    warning = None
    if point.fpir > LOUD_FPIR:
        warning = (
            f"--threshold {threshold} expects false alerts on {point.fpir:.0%} of the faces of people not on the "
            f"list ({persons} persons): far above the usual 1%; `--fpir 0.01` gives "
            f"{cal.threshold_for_fpir(DEFAULT_FPIR, persons, per, cohort).threshold:.4f}"
        )
    summary = cal.expected_summary(float(threshold), persons, per, cohort)
    return ThresholdChoice(float(threshold), None, point, cohort, warning, summary)


def bundle_expectation(header: dict) -> str:
    """Both expected rates of a full bundle, in words, from its model's packaged calibration (the one
    `watchlist build` chooses from), its default threshold and its persons; a delta holds only the
    changes, so its list's size and rates are not known from it."""
    from engines.calibration import Calibration, CalibrationError

    if header.get("kind") == "delta":
        return "expected rates: not known from a delta (it holds only the changes): inspect a full list"
    model_id = str(header.get("model_id"))
    try:
        cal = Calibration.for_thresholds(model_id)
    except CalibrationError:
        return f"expected rates: model {model_id} has no packaged calibration"
    persons = header.get("persons", [])
    n = max(len(persons), 1)
    per = max(sum(len(p.get("templates", [])) for p in persons) / n, 1.0)
    ages = [t["age"] for p in persons for t in p.get("templates", []) if t.get("age") is not None]
    # As list_shape: a list of children's photos meets adults' faces, the cross-age strangers.
    children = bool(ages) and all(a < CHILD_AGE for a in ages)
    cohort = "cross_age" if children and "cross_age" in cal.cohorts else None
    return cal.expected_summary(float(header["default_threshold"]), n, per, cohort)


def has_canary(register: Register, model_id: str) -> bool:
    """Whether the register holds the canary person (wire.records.CANARY_PERSON_ID) for `model_id`."""
    from wire.records import CANARY_PERSON_ID

    row = register.db.execute(
        "SELECT 1 FROM templates WHERE person_id = ? AND model_id = ? LIMIT 1", [CANARY_PERSON_ID, model_id]
    ).fetchone()
    return row is not None


def canary_problem(register: Register, model_id: str) -> str | None:
    """Why a list of `model_id` built now would hold no canary person (units with their canary on
    refuse it), or None."""
    if has_canary(register, model_id):
        return None
    return (
        f"the register holds no canary person for model {model_id}, so this list has none and units with their "
        "canary on refuse it (no_canary)"
    )


def ensure_canary(
    register: Register,
    model_id: str,
    *,
    cache_dir: Path | None = None,
    check: Callable[[Any], None] | None = None,
) -> int:
    """Put the canary person into the register for `model_id` if it is not there, so every release
    holds it: enrolled as `watchlist enrol-canary` does (watchlist.hq.enrol.enrol_canary), with this
    machine's engine, after `check(engine)` (the known-answer self-test). Returns the templates
    added (0: it was there). Raises CanaryRefused when this machine has no engine of `model_id`
    (none at all, as on a signing machine, or another model's): the message names enrol-canary and
    --no-canary."""
    if has_canary(register, model_id):
        return 0
    from engines.cache import default_cache_dir
    from engines.canary_media import ensure_canary_picture, load_canary_picture
    from engines.errors import EngineError
    from engines.face_engine import FaceEngine
    from watchlist.hq.enrol import enrol_canary

    way_out = (
        "run `watchlist enrol-canary --register ...` where HQ enrols with that model, or give --no-canary for a "
        "list that will never reach a unit with its canary on ([canary] enabled)"
    )
    try:
        engine = FaceEngine.load()
    except EngineError as exc:
        raise CanaryRefused(
            f"the register holds no canary person for model {model_id}, and this machine cannot enrol it "
            f"(no face engine: {exc}): {way_out}"
        ) from None
    if engine.model_id != model_id:
        raise CanaryRefused(
            f"the register holds no canary person for model {model_id}, and this machine's engine is of model "
            f"{engine.model_id}, so it cannot enrol it: {way_out}"
        )
    if check is not None:
        check(engine)
    try:
        photo = load_canary_picture(ensure_canary_picture(cache_dir or default_cache_dir()))
    except EngineError as exc:
        raise CanaryRefused(f"the canary person for model {model_id} cannot be enrolled: {exc}") from None
    return enrol_canary(register, engine, photo)


def describe_changes(register: Register, bundle: Bundle, digests: dict[str, str]) -> dict:
    """What `bundle` changes on a unit holding the latest published release (a delta: its base):
    the ids it adds, changes and removes."""
    base = bundle.base_version if bundle.kind == "delta" else register.latest_published_version()
    old = register.release_digests(base) if base else {}
    return {
        "base_version": base,
        "added": sorted(set(digests) - set(old)),
        "changed": sorted(p for p in set(digests) & set(old) if digests[p] != old[p]),
        "removed": sorted(set(old) - set(digests)),
        "unchanged": sum(1 for p in set(digests) & set(old) if digests[p] == old[p]),
    }


@dataclass(frozen=True)
class Release:
    """A bundle built, signed, written and recorded in the register."""

    bundle: Bundle
    data: bytes
    sha256: str
    path: Path | None
    skipped: tuple[str, ...]  # persons left out: no template of the bundle's model


def plan_bundle(
    register: Register,
    *,
    model_id: str,
    default_threshold: float,
    kind: str = "full",
    base_version: int | None = None,
    valid_for_s: int = DEFAULT_VALID_FOR_S,
    now: float | None = None,
    with_names: bool = False,
) -> tuple[Bundle, dict[str, str], tuple[str, ...]]:
    """The next bundle from the register's current state, with the per-person digests it leaves on units.

    A delta (kind "delta") holds the persons added or changed since `base_version` (default: the
    latest *published* release, so that a build nobody published never becomes a base units lack)
    and the ids removed since.
    """
    created = int(time.time() if now is None else now)
    version = register.latest_version() + 1
    snap = register.snapshot(model_id, with_names=with_names)
    if not snap.persons and kind == "full" and not register.model_ids():
        raise RegisterError("the register holds no templates: enrol persons first (`watchlist enrol`)")
    dim = snap.embeddings.shape[1] if snap.persons else _dim_of(register, model_id)

    def make(
        kind: Literal["full", "delta"],
        persons: tuple[Person, ...],
        embeddings: np.ndarray,
        base_version: int | None = None,
        removed: tuple[str, ...] = (),
    ) -> Bundle:
        return Bundle(
            kind=kind,
            version=version,
            created_at=created,
            expires_at=created + int(valid_for_s),
            model_id=model_id,
            embedding_dim=dim,
            default_threshold=float(default_threshold),
            persons=persons,
            embeddings=embeddings,
            base_version=base_version,
            removed=removed,
            embedding_offset=snap.offset,
        )

    if kind == "full":
        return (
            make("full", snap.persons, snap.embeddings),
            snap.digests,
            snap.skipped,
        )
    if kind != "delta":
        raise RegisterError(f"kind must be 'full' or 'delta', got {kind!r}")
    if base_version is None:
        published = register.latest_published_version()
        if published is None:
            raise RegisterError(
                "no release was published yet, so no unit holds a base for a delta: publish a full bundle "
                "first (`watchlist publish`), or give --base"
            )
        base = published
    else:
        base = int(base_version)
    base_release = register.release(base)
    if base_release is None:
        raise RegisterError(
            f"version {base} was never released: give --base one of the released versions "
            f"({', '.join(str(r['version']) for r in register.releases()) or 'none yet: build a full bundle first'})"
        )
    if base_release["model_id"] != model_id:
        raise RegisterError(
            f"version {base} is of model {base_release['model_id']!r}, not {model_id!r}: build a full bundle"
        )
    old = register.release_digests(base)
    changed = [i for i, p in enumerate(snap.persons) if old.get(p.person_id) != snap.digests[p.person_id]]
    removed = tuple(sorted(set(old) - set(snap.digests)))
    persons = tuple(snap.persons[i] for i in changed)
    offsets = np.concatenate([[0], np.cumsum([len(p.templates) for p in snap.persons])])
    rows = [snap.embeddings[offsets[i] : offsets[i + 1]] for i in changed]
    emb = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
    bundle = make("delta", persons, emb, base_version=base, removed=removed)
    return bundle, snap.digests, snap.skipped


def _dim_of(register: Register, model_id: str) -> int:
    row = register.db.execute(
        "SELECT length(embedding) FROM templates WHERE model_id = ? LIMIT 1", [model_id]
    ).fetchone()
    if row is None:
        dim = register.get_meta(f"dim:{model_id}")
        if not isinstance(dim, int):  # None: never set (each release records its model's dimension)
            raise RegisterError(f"no template of model {model_id!r} was ever enrolled")
        return dim
    return int(row[0]) // 4


def release(
    register: Register,
    bundle: Bundle,
    digests: dict[str, str],
    signing_key: Ed25519PrivateKey,
    keyset: KeySet,
    out: Path | None = None,
    skipped: tuple[str, ...] = (),
    choice: ThresholdChoice | None = None,
) -> Release:
    """Sign `bundle`, write it to `out` (atomically: a unit copying the folder never sees half a
    file), and record the release in the register (with `choice`, how its threshold was chosen)."""
    kid, data = _sign(bundle, signing_key, keyset)
    digest = sha256_hex(data)
    if out is not None:
        atomic_write(out, data)
    register.record_release(bundle, digests, size=len(data), sha256=digest, signing_key_id=kid)
    register.set_meta(f"dim:{bundle.model_id}", bundle.embedding_dim)
    if choice is not None:
        register.set_meta(f"operating_point:{bundle.version}", choice.as_dict())
    if bundle.embedding_offset is not None and register.offset(bundle.model_id) is None:
        # Fixed from the first release on: a delta must encode rows the way the units' lists do.
        register.set_meta(f"offset:{bundle.model_id}", [float(v) for v in bundle.embedding_offset])
    return Release(bundle, data, digest, out, skipped)


def _sign(bundle: Bundle, signing_key: Ed25519PrivateKey, keyset: KeySet) -> tuple[str, bytes]:
    kid = key_id(signing_key.public_key())
    if kid not in keyset.signing_keys:
        raise RegisterError(
            f"signing key {kid} is not in key set {keyset.serial}: rotate (`watchlist rotate`) "
            "or use the current signing key"
        )
    return kid, encode_bundle(bundle, signing_key, keyset.envelope)


def sign_snapshot(register: Register, delta: bytes, signing_key: Ed25519PrivateKey, keyset: KeySet) -> bytes:
    """The full bundle of the list that the released `delta` leaves on units, signed: the same
    version, times, model, offset and threshold, every person as the release recorded them. It
    travels with the delta so that a unit that missed a delta (or cannot apply one) catches up.

    The register keeps digests, not old embeddings, so the snapshot comes from its current state:
    RegisterError when that state is no longer the release's (persons enrolled, changed or
    removed since the delta was built), naming them.

    Example: ``sign_snapshot(Register("hq.db"), Path("v12.cpwl").read_bytes(), key, keyset)``
    """
    b = parse_verified(frame(delta))
    if b.kind != "delta":
        raise RegisterError(f"version {b.version} is a full bundle: it is its own snapshot")
    released = register.release_digests(b.version)
    # Names travel only with --with-names, and they are part of each person's digest: a delta that
    # carries persons says which; an empty one leaves both to try.
    names = [any(p.name is not None for p in b.persons)] if b.persons else [False, True]
    tries = []
    for with_names in names:
        snap = register.snapshot(b.model_id, with_names=with_names, offset=b.embedding_offset)
        moved = sorted(p for p in set(snap.digests) | set(released) if snap.digests.get(p) != released.get(p))
        tries.append((len(moved), moved, snap))
        if not moved:
            break
    _, moved, snap = min(tries, key=lambda t: t[0])
    if moved:
        named = ", ".join(moved[:10]) + (" ..." if len(moved) > 10 else "")
        raise RegisterError(
            f"the register changed since version {b.version} was built ({len(moved)} persons enrolled, changed or "
            f"removed since: {named}), so the full snapshot of version {b.version} cannot be made from it: build a "
            "new delta (`watchlist build --delta`) and publish that"
        )
    full = Bundle(
        kind="full",
        version=b.version,
        created_at=b.created_at,
        expires_at=b.expires_at,
        model_id=b.model_id,
        embedding_dim=b.embedding_dim,
        default_threshold=b.default_threshold,
        persons=snap.persons,
        embeddings=snap.embeddings,
        embedding_offset=snap.offset,
    )
    return _sign(full, signing_key, keyset)[1]
