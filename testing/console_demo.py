"""A demo data set for the console: a store with hits, units and decisions, a register of
synthetic persons with enrolment photos, and three accounts. Everything is made up; the face
images are public-domain photos shipped with scikit-image where it is installed, else drawn."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from central import accounts
from central.store import open_store

DEMO_USERS = (
    ("ana", "operator", "demo-ana-password"),
    ("ben", "operator", "demo-ben-password"),
    ("sam", "supervisor", "demo-sam-password"),
)
# (person id, name, priority); the last one HQ removed from the list in version 42 (a case closed).
DEMO_PERSONS = (
    ("case-2024-0173", "Mila Novak", 9),
    ("case-2023-0412", "Jonas Berger", 6),
    ("case-2022-0088", "Lea Horvat", 3),
    ("case-2019-0007", None, 0),
)
DEMO_MODEL = "dlib-resnet-v1"
DEMO_DIM = 128
CAMERA_NAMES = {
    "platform-1": "Platform 1, north stairs",
    "platform-2": "Platform 2, lifts",
    "concourse": "Main concourse, ticket hall",
    "entrance": "East entrance",
    "belt-4": "Baggage belt 4",
    "stairs": "Underpass stairs",
}
DEMO_UNITS = (
    # site, unit, cameras up/total, watchlist expires in (days), software, health
    ("station-north", "gate-1", 4, 4, 6.0, "0.4.2", "online"),
    ("station-north", "gate-2", 3, 4, 1.5, "0.4.2", "online"),
    ("station-south", "platform-3", 2, 2, 6.0, "0.4.1", "offline"),
    ("airport", "arrivals-1", 6, 6, 6.0, "0.4.2", "stale"),
)


@dataclass(frozen=True)
class DemoData:
    """Where the demo put things, and the accounts (name, role, password) to log in with."""

    db: Path
    register: Path
    photos: Path
    users: tuple[tuple[str, str, str], ...]


def _faces() -> list[tuple[np.ndarray, np.ndarray]]:
    """Per demo person, a (tight, wide) pair of crops of one face."""
    try:
        from skimage import data

        astro = data.astronaut()
        camera = np.stack([data.camera()] * 3, axis=-1)
        grey = np.stack([astro.mean(axis=-1).astype(np.uint8)] * 3, axis=-1)[:, ::-1]
        return [
            (astro[30:200, 150:300], astro[0:260, 110:350]),
            (camera[60:200, 210:330], camera[20:260, 150:390]),
            (grey[30:200, 212:362], grey[0:260, 162:402]),
            (camera[60:200, 210:330][:, ::-1], camera[20:260, 150:390][:, ::-1]),
        ]
    except ImportError:
        rng = np.random.default_rng(7)
        plain = [np.full((200, 160, 3), rng.integers(80, 200, 3), dtype=np.uint8) for _ in range(4)]
        return [(img, img) for img in plain]


def _scene(face: np.ndarray) -> bytes:
    """A context frame as a unit sends one (edge.hits.encode_context): a 1280x720 scene, the person
    (`face`'s picture) beside a bystander (scikit-image's cameraman, where installed), the face boxed."""
    import cv2

    from edge.hits import CropConfig, encode_context

    frame = np.empty((720, 1280, 3), dtype=np.uint8)
    frame[:] = np.linspace(150, 95, 720, dtype=np.uint8)[:, None, None]  # a hall's grey, lighter above
    frame[560:] = (118, 112, 104)  # the floor
    person = cv2.resize(face, (300, 340), interpolation=cv2.INTER_AREA)
    frame[180:520, 380:680] = person
    try:
        from skimage import data

        bystander = cv2.resize(np.stack([data.camera()] * 3, axis=-1), (320, 320), interpolation=cv2.INTER_AREA)
        frame[240:560, 820:1140] = bystander
    except ImportError:
        frame[240:560, 820:1140] = 70
    return encode_context(frame, (420.0, 200.0, 640.0, 480.0), CropConfig(context_frame=True))


def _jpeg(img: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    import cv2

    if size is not None:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 88])
    return buf.tobytes() if ok else b""


def _register(path: Path, photos: Path, faces: list[tuple[np.ndarray, np.ndarray]], now: float) -> None:
    # Written by HQ's own Register, so the console runs on the layout HQ really writes: release 41
    # lists all four persons; HQ then removes the last (a case closed) and releases 42, the version
    # the sites run. The releases are recorded without signing a bundle (nothing here verifies one).
    from watchlist.format.bundle import Bundle
    from watchlist.hq.register import Register

    rng = np.random.default_rng(11)
    reg = Register(path)
    try:
        for i, (pid, name, priority) in enumerate(DEMO_PERSONS):
            reg.upsert_person(pid, name=name, priority=priority)
            closed = i == len(DEMO_PERSONS) - 1  # HQ deletes a closed case's photos with its record
            for j, (date, age) in enumerate((("2016-05-01", 7), ("2019-09-12", 10))):
                jpeg = _jpeg(faces[i][1 - j], (160, 200))
                if not closed:
                    (photos / pid).mkdir(parents=True, exist_ok=True)
                    (photos / pid / f"{date}_front.jpg").write_bytes(jpeg)
                emb = rng.standard_normal(DEMO_DIM).astype(np.float32)
                reg.add_template(
                    pid,
                    emb / np.linalg.norm(emb),
                    model_id=DEMO_MODEL,
                    photo_sha256=hashlib.sha256(jpeg).hexdigest(),
                    photo_date=date,
                    age=age,
                )
        for version in (41, 42):
            if version == 42:
                reg.remove_persons([DEMO_PERSONS[-1][0]])
            snap = reg.snapshot(DEMO_MODEL)
            created = int(now) - 86400 * (43 - version)
            bundle = Bundle(
                kind="full",
                version=version,
                created_at=created,
                expires_at=created + 7 * 86400,
                model_id=DEMO_MODEL,
                embedding_dim=DEMO_DIM,
                default_threshold=0.6,
                persons=snap.persons,
                embeddings=snap.embeddings,
                embedding_offset=snap.offset,
            )
            digest = hashlib.sha256(f"demo release {version}".encode()).hexdigest()
            reg.record_release(bundle, snap.digests, size=0, sha256=digest, signing_key_id="demo")
    finally:
        reg.close()


def seed_demo(folder: Path, *, now: float | None = None) -> DemoData:
    """Write the demo store, register and photos into `folder` (which should be empty)."""
    now = time.time() if now is None else now
    folder.mkdir(parents=True, exist_ok=True)
    faces = _faces()
    photos = folder / "photos"
    register = folder / "register.sqlite"
    _register(register, photos, faces, now)
    db = folder / "hits.sqlite"
    store = open_store(db)
    try:
        for name, role, password in DEMO_USERS:
            store.add_user(name, role, accounts.hash_password(password), actor="demo")
        for site, unit, up, total, expires_days, software, health in DEMO_UNITS:
            at = now - (120 if health == "stale" else 5)
            state = "offline" if health == "offline" else "online"
            store.set_unit_status(site, unit, state, "connection lost" if state == "offline" else "connected", at, at)
            body = {
                "interval_s": 30.0,
                "software_version": software,
                "unit": {
                    "cameras_up": up,
                    "cameras_total": total,
                    "cameras": [{"id": cid, "name": name, "up": True} for cid, name in CAMERA_NAMES.items()],
                    "watchlist": {"version": 42, "expires_at": now + expires_days * 86400},
                    # The stations state their zone; the airport's unit (older software) does not.
                    **({"timezone": "Europe/Vienna"} if site.startswith("station") else {}),
                },
                "outbox": {"pending": 17 if health == "offline" else 0},
            }
            store.set_heartbeat(site, unit, body, at)
        for site in sorted({u[0] for u in DEMO_UNITS}):
            store.set_publication(site, 42, now - 86400, now - 86400, f"checkpoint/v1/{site}/watchlist/full/manifest")
        plan: list[tuple[int, str, str, str, float, float, list[tuple[str, str, str | None]]]] = [
            (0, "station-north", "gate-1", "platform-1", 0.74, 0.29, []),
            (1, "station-north", "gate-2", "concourse", 0.66, 0.12, [("ana", "confirm", None)]),
            (2, "airport", "arrivals-1", "belt-4", 0.61, 0.04, [("ben", "reject", "different person: older, no scar")]),
            (
                0,
                "station-north",
                "gate-1",
                "platform-2",
                0.79,
                0.33,
                [("ana", "confirm", None), ("ben", "confirm", None)],
            ),
            (3, "station-south", "platform-3", "stairs", 0.63, 0.09, []),
            (1, "station-north", "gate-2", "entrance", 0.69, 0.18, []),
        ]
        # One person lingering in view: five hits 40 s apart, one sighting, waiting for its first confirmation.
        plan += [
            (
                0,
                "station-north",
                "gate-2",
                "concourse",
                0.70 + 0.01 * j,
                0.26,
                [("ana", "confirm", None)] if j == 4 else [],
            )
            for j in range(5)
        ]
        scene = _scene(faces[0][1])  # the lingering person's unit sends context frames
        for k, (person, site, unit, camera, score, margin, decisions) in enumerate(plan):
            hit_id = uuid.UUID(int=0xC0FFEE00 + k).hex
            captured = now - 60 * (6 - k) * 7 if k < 6 else now - 200 + 40 * (k - 6)
            fields = {
                "id": hit_id,
                "site": site,
                "unit_id": unit,
                "camera_id": camera,
                "person_id": DEMO_PERSONS[person][0],
                "captured_at": captured,
                "queued_at": captured + 0.1,
                "score": score,
                "threshold": 0.6,
                "margin": margin,
                "box": [10.0, 10.0, 120.0, 150.0],
                "model_id": DEMO_MODEL,
                "watchlist_version": 42,
                "track_id": k,
                "crop_dropped": None,
                "v": 1,
                "context_jpeg": scene if k >= 6 else None,
                "context_dropped": None,
            }
            store.add_hit(fields, _jpeg(faces[person][0], (128, 160)), received_at=captured + 0.4)
            for user, decision, reason in decisions:
                store.decide(hit_id, user, decision, reason)
        store.audit("ana", "login", None, {"address": "127.0.0.1", "ok": True})
    finally:
        store.close()
    (folder / "README.txt").write_text(json.dumps({"demo": True, "users": [u[:2] for u in DEMO_USERS]}) + "\n")
    return DemoData(db, register, photos, DEMO_USERS)


def serve_demo(http_port: int = 8080) -> None:
    """Seed the demo into a temporary folder and serve the console on it (no receiver) until stopped."""
    import tempfile

    import click

    from central.cli import main as receiver_cli

    with tempfile.TemporaryDirectory(prefix="checkpoint-demo-") as tmp:
        info = seed_demo(Path(tmp))
        click.echo(f"demo store in {tmp}; log in as one of:", err=True)
        for user, role, password in info.users:
            click.echo(f"  {user:<10} {role:<11} password: {password}", err=True)
        args = ["serve", "--no-receiver", "--db", str(info.db), "--register", str(info.register)]
        args += ["--photos", str(info.photos), "--http-port", str(http_port)]
        receiver_cli.main(args, standalone_mode=False)
