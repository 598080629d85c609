"""Watchlist at national scale: build, sign, transport and apply times, and bundle sizes.

    python bench/watchlist_scale.py --json OUT.json                       # 100,000 persons x 3 photos
    python bench/watchlist_scale.py --persons 333334 --json OUT-1M.json   # 1,000,000 templates

Everything is real: HQ's register and the unit's store are SQLite files in a temporary folder,
bundles are signed with Ed25519, and (unless --no-mqtt, or mosquitto is missing) the full bundle
and the delta travel through a local Mosquitto to a unit's WatchlistSubscriber. Embeddings are
synthetic (testing.synthetic, engine-like shape), so no face engine runs; enrolment cost is the engine's (bench/throughput.py).

Measured:
  HQ:   register load (bulk), full bundle plan + sign + write, its size; a delta of --delta persons
        (half removed, a quarter re-photographed, a quarter new) likewise, and the full snapshot of
        the delta's version that publishing it signs (watchlist.hq.build.sign_snapshot).
  Unit: full bundle verify, store transaction, index build, and end to end (Watchlist.offer);
        start-up from the store (load_index); the delta end to end and in parts.
  MQTT: publish to applied on the unit, full and delta (the delta goes with its full snapshot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine, machine_summary
from matching.matcher import Matcher
from testing.synthetic import ENGINE_LIKE, Authority, make_persons, person_centers, samples_of
from watchlist.format.keys import parse_keyset
from watchlist.format.verify import UnitTrust, verify_bundle
from watchlist.hq.build import plan_bundle, release, sign_snapshot
from watchlist.hq.register import Register
from watchlist.unit.apply import Watchlist, index_for
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.store import UnitStore

MODEL = "synthetic:v1"


class Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self) -> None:
                self.start = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                timer.t[name] = round(time.perf_counter() - self.start, 3)

        return _Ctx()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--persons", type=int, default=100_000)
    ap.add_argument("--photos", type=int, default=3, help="templates per person")
    ap.add_argument("--delta", type=int, default=1000, help="persons touched by the delta")
    ap.add_argument("--no-mqtt", action="store_true", help="skip the transport through Mosquitto")
    ap.add_argument("--chunk-bytes", type=int, default=1024 * 1024)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tm = Timer()
    work = Path(tempfile.mkdtemp(prefix="watchlist-scale-"))
    hq = Authority(model_id=MODEL, threshold=0.5)
    keyset = parse_keyset(hq.keyset, hq.root.public_key())
    ids = [f"case-{i:07d}" for i in range(args.persons)]
    centers = person_centers(args.persons, seed=1, shared=ENGINE_LIKE["shared"])
    emb = samples_of(centers, args.photos, seed=2, spread=ENGINE_LIKE["spread"])
    persons = make_persons(ids, args.photos)

    reg = Register(work / "hq.db")
    with tm("hq_register_load_s"):
        reg.add_persons(persons, emb, model_id=MODEL)
    with tm("hq_full_plan_s"):
        full_b, full_d, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5)
    with tm("hq_full_sign_write_s"):
        full = release(reg, full_b, full_d, hq.signing, keyset, work / "full.cpwl")
    reg.mark_published(full.sha256, "bench")  # deltas build on published releases only

    # HQ changes: half of the delta found (removed), a quarter re-photographed, a quarter new.
    rng = np.random.default_rng(5)
    touched = rng.choice(args.persons, args.delta // 2 + args.delta // 4, replace=False)
    gone = [ids[i] for i in touched[: args.delta // 2]]
    rephoto = [ids[i] for i in touched[args.delta // 2 :]]
    n_new = args.delta - len(gone) - len(rephoto)
    reg.remove_persons(gone)
    re_emb = samples_of(centers[touched[args.delta // 2 :]], 1, seed=6, spread=ENGINE_LIKE["spread"])
    for pid, e in zip(rephoto, re_emb):
        reg.add_template(pid, e, model_id=MODEL, photo_sha256=os.urandom(32).hex(), age=15)
    new_ids = [f"new-{i:07d}" for i in range(n_new)]
    reg.add_persons(
        make_persons(new_ids, args.photos),
        samples_of(
            person_centers(n_new, seed=7, shared=ENGINE_LIKE["shared"]),
            args.photos,
            seed=8,
            spread=ENGINE_LIKE["spread"],
        ),
        model_id=MODEL,
    )
    with tm("hq_delta_plan_s"):
        delta_b, delta_d, _ = plan_bundle(reg, model_id=MODEL, default_threshold=0.5, kind="delta")
    with tm("hq_delta_sign_write_s"):
        delta = release(reg, delta_b, delta_d, hq.signing, keyset, work / "delta.cpwl")
    with tm("hq_delta_snapshot_sign_s"):
        snapshot = sign_snapshot(reg, delta.data, hq.signing, keyset)

    # Unit, in parts (fresh objects so each part is measured alone).
    root = hq.write_root(work / "root.pub")
    trust = UnitTrust(hq.root.public_key(), MODEL, max_bundle_bytes=2**33)
    with tm("unit_full_verify_s"):
        verified = verify_bundle(full.data, trust, time.time())
    with tm("unit_full_index_build_s"):
        index_for(verified, Matcher().index)
    parts_store = UnitStore(work / "parts.db")
    with tm("unit_full_store_transaction_s"):
        parts_store.apply(verified)
    parts_store.close()

    cfg = WatchlistConfig(root_key=root, store=work / "unit.db", max_bundle_bytes=2**33)
    matcher = Matcher()
    wl = Watchlist(cfg, matcher, MODEL)
    wl.start()
    with tm("unit_full_apply_end_to_end_s"):
        wl.offer(full.data, "bench")
    with tm("unit_startup_load_index_s"):
        UnitStore(work / "unit.db").load_index()

    trust2 = UnitTrust(
        hq.root.public_key(),
        MODEL,
        max_bundle_bytes=2**33,
        applied_version=1,
        applied_model_id=MODEL,
        applied_offset=tuple(float(v) for v in full_b.embedding_offset),
    )
    with tm("unit_delta_verify_s"):
        dv = verify_bundle(delta.data, trust2, time.time())
    with tm("unit_delta_index_s"):
        index_for(dv, wl.current_index)
    with tm("unit_delta_apply_end_to_end_s"):
        wl.offer(delta.data, "bench")
    assert wl.version == 2 and gone[0] not in wl.current_index and new_ids[-1] in wl.current_index
    index_mb = wl.current_index.nbytes / 2**20
    wl.close()

    mqtt = {}
    if not args.no_mqtt:
        mqtt = measure_mqtt(work, cfg, full.data, delta.data, snapshot, args.chunk_bytes)

    result = {
        "persons": args.persons,
        "photos_per_person": args.photos,
        "templates": int(full_b.n_templates),
        "delta_persons": {
            "removed": len(delta_b.removed),
            "upserted": len(delta_b.persons),
            "templates_in": int(delta_b.n_templates),
        },
        "full_bundle_bytes": len(full.data),
        "delta_bundle_bytes": len(delta.data),
        "embedding_bytes_per_template": 2 * 128,
        "index_mb": round(index_mb, 1),
        "times_s": tm.t,
        "mqtt": mqtt,
        "machine": {
            **describe_machine(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        },
    }
    print("\n" + machine_summary(result["machine"]))
    print(
        f"{args.persons:,} persons x {args.photos} photos = {full_b.n_templates:,} templates; index {index_mb:.0f} MB"
    )
    print(
        f"full bundle  {len(full.data) / 2**20:8.1f} MiB   delta ({args.delta} persons) {len(delta.data) / 2**10:8.1f} KiB"
    )
    for k, v in tm.t.items():
        print(f"  {k:34} {v:8.3f} s")
    for k, v in mqtt.items():
        print(f"  mqtt {k:29} {v:8.3f} s" if isinstance(v, float) else f"  mqtt {k:29} {v}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


def measure_mqtt(
    work: Path, cfg: WatchlistConfig, full: bytes, delta: bytes, snapshot: bytes, chunk_bytes: int
) -> dict:
    """Publish both bundles through a local Mosquitto (the delta with its full snapshot); time until
    a subscribed unit has applied each, and until the delta's publish has returned."""
    from testing.broker import MosquittoBroker, find_mosquitto
    from watchlist.hq.publish import publish_bundle
    from watchlist.unit.subscriber import WatchlistSubscriber

    if find_mosquitto() is None:
        return {"skipped": "mosquitto not installed"}
    broker = MosquittoBroker(work / "broker", persistence=False).start()
    topic = "checkpoint/bench/watchlist"
    unit_cfg = cfg.model_copy(update={"store": work / "unit-mqtt.db", "topic": topic})
    wl = Watchlist(unit_cfg, Matcher(), MODEL)
    wl.start()
    sub = WatchlistSubscriber(wl, topic, host=broker.host, port=broker.port, tick_interval_s=0.2)
    sub.start()
    out: dict = {"chunk_bytes": chunk_bytes}
    try:
        for name, data, extra, version in (("full", full, None, 1), ("delta", delta, snapshot, 2)):
            # Published from a thread: a unit in step applies the delta while the snapshot is still going out.
            done: dict = {}

            def send(data: bytes = data, extra: bytes | None = extra, done: dict = done) -> None:
                publish_bundle(
                    data,
                    topic,
                    snapshot=extra,
                    host=broker.host,
                    port=broker.port,
                    chunk_bytes=chunk_bytes,
                    timeout=300,
                )
                done["at"] = time.perf_counter()

            t = time.perf_counter()
            sender = threading.Thread(target=send)
            sender.start()
            while wl.version < version:
                if time.perf_counter() - t > 600:
                    raise RuntimeError(f"the unit did not apply the {name} bundle: {wl.status()}")
                time.sleep(0.01)
            out[f"{name}_publish_to_applied_s"] = round(time.perf_counter() - t, 3)
            sender.join(600)
            if "at" not in done:
                raise RuntimeError(f"publishing the {name} bundle failed (its error is logged above)")
            out[f"{name}_publish_s"] = round(done["at"] - t, 3)
    finally:
        sub.stop()
        wl.close()
        broker.stop()
    return out


if __name__ == "__main__":
    main()
