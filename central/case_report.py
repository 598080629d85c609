"""A printable case report of one sighting, for an investigator: the person (HQ's register), the
sighting's hits with their crops and context frames, HQ's enrolment photos, the decisions under the
two-person rule and the audit lines about it, as one HTML page that stands alone (images as data:
URIs, the style inline, no script), laid out for A4.

The console's /sighting/report and `checkpoint-receiver report` render the same body
(templates/_report.html); opening one is entered in the audit chain as `view_report`, once, and the
images inside it are not entered one by one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from central import review
from central.register_view import PHOTO_TYPES, PersonInfo, RegisterView
from central.store import HitStore, StoreError

IMAGE_MAX_BYTES = 2 * 1024 * 1024
"""An image larger than this is named, not embedded: a unit's crop is some tens of kB and a context
frame one or two hundred, but an enrolment photo straight from a camera can be several MB."""
IMAGES_MAX_BYTES = 32 * 1024 * 1024
"""All embedded images together, so that a sighting of hundreds of hits still gives a page a browser
opens and prints; past it crops come before context frames (`build`)."""
PHOTOS_MAX = 12
AUDIT_MAX_LINES = 2000
_CSS = Path(__file__).resolve().parent / "static" / "report.css"


class NoSuchSighting(StoreError):
    """No sighting, and no hit, has the id a report was asked for."""


@dataclass(frozen=True)
class Embedded:
    """An image as a data: URI (`src`), or why it is not in the report (`note`)."""

    src: str | None
    note: str | None = None


@dataclass(frozen=True)
class Closure:
    """A case HQ closed: the release that removed the person, and when (`exact`: HQ's own date of
    that release from its register, or the centre's record of its publication; otherwise `on` is
    when HQ published the later list the centre judged against)."""

    version: int
    on: float | None
    exact: bool


@dataclass(frozen=True)
class CaseReport:
    """Everything the report shows; `hits` in capture order, each with `camera_name`, `crop` and
    `context` (Embedded, or None where the hit came without one)."""

    sighting: dict[str, Any]
    person: PersonInfo | None
    photos: list[tuple[str, Embedded]]
    hits: list[dict[str, Any]]
    best: dict[str, Any]
    reviews: list[dict[str, Any]]
    state: str
    closed: Closure | None
    audit: list[dict[str, Any]]
    audit_more: bool
    audit_head: str
    zone: str | None
    cameras: list[str]
    generated_by: str
    generated_at: float
    via: str
    images_left_out: int


class _Budget:
    """What is left of IMAGES_MAX_BYTES, spent image by image."""

    def __init__(self) -> None:
        self.left = IMAGES_MAX_BYTES
        self.left_out = 0

    def embed(self, data: bytes | None, media: str, what: str) -> Embedded:
        if data is None:
            return Embedded(None, f"the {what} is no longer stored")
        refused = self.refuse(len(data), what)
        if refused is not None:
            return refused
        self.left -= len(data)
        return Embedded(f"data:{media};base64,{base64.b64encode(data).decode('ascii')}")

    def refuse(self, size: int, what: str) -> Embedded | None:
        """Why an image of `size` bytes is left out, or None when it fits."""
        if size <= IMAGE_MAX_BYTES and size <= self.left:
            return None
        self.left_out += 1
        if size > IMAGE_MAX_BYTES:
            why = f"one image may take {IMAGE_MAX_BYTES >> 20} MiB"
        else:
            why = f"the report's {IMAGES_MAX_BYTES >> 20} MiB of images are taken"
        return Embedded(None, f"the {what} ({size / 1e6:.1f} MB) is not embedded: {why}")


@functools.cache
def css() -> Markup:
    """The report's style sheet (static/report.css), inlined into every report."""
    return Markup(_CSS.read_text(encoding="utf-8"))


def _style_hash() -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(str(css()).encode("utf-8")).digest()).decode("ascii") + "'"


def console_csp() -> str:
    """The console's policy with data: images and the report's inline style (by its hash) allowed."""
    return (
        "default-src 'self'; img-src 'self' data:; script-src 'self'; "
        f"style-src 'self' {_style_hash()}; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )


def file_csp() -> str:
    """The policy a report written to a file carries in a meta tag: its images and style, nothing
    else, and no script at all, even if text from a unit were ever left unescaped."""
    return f"default-src 'none'; img-src data:; style-src {_style_hash()}; form-action 'none'; base-uri 'none'"


def find_sighting(store: HitStore, key: str) -> dict[str, Any]:
    """The sighting named by `key`: a sighting id, else a hit id (or its first characters) whose
    sighting it is. NoSuchSighting when neither is stored."""
    sighting = store.sighting(key) if key else None
    if sighting is not None:
        return sighting
    try:
        hit = store.hit(store.resolve_hit_id(key))
    except StoreError as e:
        raise NoSuchSighting(f"no sighting with id {key!r}; {e}") from None
    sighting = store.sighting(hit["sighting_id"]) if hit else None
    if sighting is None:  # purged between the reads
        raise NoSuchSighting(f"no sighting with id {key!r} in {store.location}")
    return sighting


def build(
    store: HitStore, register: RegisterView, key: str, *, actor: str, via: str, detail: dict | None = None
) -> CaseReport:
    """The case report of the sighting `key` names (`find_sighting`), generated by `actor` `via` the
    console or the command line; its opening is entered in the audit chain first (`view_report`,
    with `detail`), so the report's audit lines end with it."""
    sighting = find_sighting(store, key)
    sid = sighting["id"]
    hits = store.sighting_hits(sid)
    store.audit(actor, "view_report", sid, {"via": via, "hits": len(hits), **(detail or {})})
    site, unit = sighting["site"], sighting["unit_id"]
    names, zones = store.unit_labels((site, unit))
    budget = _Budget()
    person = register.person(sighting["person_id"])
    photos = [(p.name, _photo(p, budget)) for p in (person.photos[:PHOTOS_MAX] if person else [])]
    # Crops first, then context frames: past the budget, the scenes are what is left out.
    for h in hits:
        h["camera_name"] = names.get((site, unit, h["camera_id"]))
        h["crop"] = budget.embed(store.crop(h["id"]), "image/jpeg", "crop") if h["has_crop"] else None
    for h in hits:
        frame = store.context_frame(h["id"]) if h["has_context"] else None
        h["context"] = budget.embed(frame, "image/jpeg", "context frame") if h["has_context"] else None
    best = next((h for h in hits if h["id"] == sighting["best_hit_id"]), hits[0])
    reviews = store.reviews(best["id"])
    closed = _closure(register, store, sighting)
    audit = store.sighting_audit(sid, AUDIT_MAX_LINES + 1)
    head = store.audit_head()
    return CaseReport(
        sighting=sighting,
        person=person,
        photos=photos,
        hits=hits,
        best=best,
        reviews=reviews,
        state=state_in_words(sighting["review_state"], reviews, closed is not None),
        closed=closed,
        audit=audit[:AUDIT_MAX_LINES],
        audit_more=len(audit) > AUDIT_MAX_LINES,
        audit_head=f"{head.count}:{head.hash}",
        zone=zones.get((site, unit)),
        cameras=list(dict.fromkeys(h["camera_name"] or h["camera_id"] for h in hits)),
        generated_by=actor,
        generated_at=time.time(),
        via=via,
        images_left_out=budget.left_out,
    )


def _photo(path: Path, budget: _Budget) -> Embedded:
    try:
        # Not read at all past the limit: a 50 MB scan in HQ's folder does not slow the report down.
        refused = budget.refuse(path.stat().st_size, "photo")
        if refused is not None:
            return refused
        data = path.read_bytes()
    except OSError as e:
        return Embedded(None, f"the photo cannot be read ({e.strerror})")
    return budget.embed(data, PHOTO_TYPES[path.suffix.lower()], "photo")


def _closure(register: RegisterView, store: HitStore, sighting: dict[str, Any]) -> Closure | None:
    """Whether HQ closed the case, asked for every sighting (a confirmed one too: the investigator
    learns the person was found or withdrawn since), against the list HQ last published for the site."""
    published = store.publications().get(sighting["site"])
    removal = register.removal(sighting["person_id"], published["version"] if published else None)
    if removal is None:
        return None
    version, released = removal
    if released is not None:
        return Closure(version, float(released), True)
    if published is None:
        return Closure(version, None, False)
    return Closure(version, published["published_at"] or published["seen_at"], published["version"] == version)


def state_in_words(state: str, reviews: list[dict[str, Any]], closed: bool) -> str:
    """Where the sighting stands under the two-person rule (central/review.py), in one sentence."""
    if state not in review.REVIEW_STATES:
        return f"Unknown state {state!r}."
    confirmers = list(dict.fromkeys(r["username"] for r in reviews if r["decision"] == "confirm"))
    if state == "confirmed":
        return f"Confirmed by two different operators ({', '.join(confirmers)}): the two-person rule is met."
    if state == "rejected":
        who = next((r["username"] for r in reviews if r["decision"] == "reject"), "an operator")
        return f"Rejected by {who}: one rejection with a reason closes a sighting; nobody acts on it."
    if closed:
        return "Pending, and the case is closed at HQ: this sighting cannot be confirmed; nobody acts on it."
    if confirmers:
        return (
            f"Pending: confirmed by {confirmers[0]} only; a second, different operator must confirm "
            "before anyone acts on it."
        )
    return "Pending: no decision yet; two different operators must confirm before anyone acts on it."


def render_file(env: jinja2.Environment, report: CaseReport) -> str:
    """The report as a page of its own (for `checkpoint-receiver report`): no console header, the
    file's policy in a meta tag."""
    return env.get_template("report_file.html").render(r=report, css=css(), csp=file_csp())
