"""Choose an ensemble's weights on one half of a LAG-layout folder's identities (engines/ensemble.py).

Every photo of the half is embedded once by each member (bench/openset.py's embed_ours); the fused
score of weights w is sum_i w_i cos_i, so each candidate is scored from the members' score matrices
without embedding again. Candidates: every weight vector on a grid of the simplex (--step). Each is
judged by the open-set protocol of bench/openset.py on that half (random identity splits): FNIR at
FPIR 0.01, 0.03 and 0.1, with one look and with every face flip-averaged; the objective is the mean
of those six figures (lower is better). For each member the JSON also keeps the best candidate that
gives it a weight and the best that leaves it out (`with_and_without`): what that member adds. The
other half (bench/openset.py --half b) is where the chosen weights are reported, so no figure is
measured on the photos the weights were chosen on.

With --add-to-default the grid is replaced by a line search: the default ensemble's weights
(engines.ensemble.DEFAULT_MEMBERS) with each other member of --config added at a few shares, to tell
whether a candidate member adds anything to the default (docs/engine.md).

Example:
    python bench/ensemble_weights.py --data ../shared/data/lag-dev --half a --json out/ensemble-weights.json
    python bench/ensemble_weights.py --data ../shared/data/lag-dev --half a --add-to-default --config bench/configs/ensemble-candidates.toml --json out/ensemble-added.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lag import DEFAULT_DATA, list_photos, require_data
from bench.machine import describe_machine
from bench.openset import FPIRS, Protocol, cosine, embed_ours, person_matrix, select_half

# The candidates' members when no --config is given: the built-in models, each at weight 1.
ALL_BUILT_IN = '[engine]\nensemble = ["dlib-resnet-v1", "faceplugin-fr-feature", "expo-mobilefacenet"]\n'


def simplex(n: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of `n` members on a grid of `step` that sums to 1 (members may get 0)."""
    k = round(1 / step)
    return [tuple(c / k for c in combo) for combo in itertools.product(range(k + 1), repeat=n) if sum(combo) == k]


# --add-to-default: the shares tried for a member added to the default ensemble (the default's own weights
# scaled by 1 - share). Fine at the low end: a member whose scores spread little moves the sum only at a
# large weight, one whose scores spread widely at a small one, and the grid's 0.05 steps can skip past both.
ADDED_SHARES = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


def added_to_default(names: list[str], defaults: dict[str, float]) -> list[tuple[float, ...]]:
    """The default ensemble's weights alone, then with each member outside it added at each of ADDED_SHARES."""
    total = sum(defaults.values())
    base = [defaults.get(n, 0.0) / total for n in names]
    out = [tuple(base)]
    for i, n in enumerate(names):
        if n in defaults:
            continue
        for share in ADDED_SHARES:
            out.append(tuple(share if j == i else b * (1 - share) for j, b in enumerate(base)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder in the LAG layout")
    ap.add_argument("--half", choices=("a", "b"), default="a", help="the identities the weights are chosen on")
    ap.add_argument("--config", type=Path, help="unit config whose [engine] ensemble lists the members")
    ap.add_argument("--step", type=float, default=0.05, help="grid step of the weights")
    ap.add_argument(
        "--add-to-default",
        action="store_true",
        help="instead of the grid: the default ensemble's weights with each other listed member added at "
        "shares from 0.0025 to 0.2 (what a new member adds to the default)",
    )
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    from engines.config import EngineConfigError, load_engine_config

    config_path = args.config
    if config_path is None:
        config_path = Path("/tmp") / "checkpoint-ensemble-candidates.toml"
        config_path.write_text(ALL_BUILT_IN)
    try:
        config = load_engine_config(config_path)
    except EngineConfigError as exc:
        sys.exit(f"error: {exc}")
    if len(config.members()) < 2:
        sys.exit(f"error: {config_path}: [engine] ensemble must list 2 or more members to weigh")
    root = require_data(args.data)
    photos = select_half(list_photos(root), args.half)
    proto = Protocol(photos, args.splits)
    t0 = time.perf_counter()
    ours = embed_ours(photos, config, levers=False)
    names = list(ours.members)
    n_id = len(proto.identities)
    scores = {
        v: np.stack([cosine(ours.members[m][v][proto.adult], ours.members[m][v][proto.young]) for m in names])
        for v in ("plain", "flip")
    }
    defaults: dict[str, float] = {}
    if args.add_to_default:
        from engines.ensemble import DEFAULT_MEMBERS

        defaults = {m.name: m.weight for m in DEFAULT_MEMBERS}
        if not set(defaults) < set(names):
            sys.exit(
                f"error: {config_path}: --add-to-default needs the default's members ({', '.join(defaults)}) and more"
            )
        candidates = added_to_default(names, defaults)
    else:
        candidates = simplex(len(names), args.step)
    rows = []
    for w in candidates:
        figures = {}
        for v, S in scores.items():
            # A photo without a face scores -inf with every member; 0 * -inf would make it NaN.
            fused = np.where(
                np.isfinite(S[0]), np.tensordot(np.asarray(w), np.nan_to_num(S, neginf=0.0), axes=1), -np.inf
            )
            r = proto.run(person_matrix(fused, proto.young_person, n_id))
            figures[v] = [r["fnir_at_fpir"][str(f)] for f in FPIRS]
        rows.append({"weights": dict(zip(names, w)), "objective": float(np.mean(list(figures.values()))), **figures})
    rows.sort(key=lambda r: r["objective"])
    best = rows[0]
    results = {
        "data": str(root),
        "identity_half": args.half,
        "images": len(photos),
        "identities": n_id,
        "splits": args.splits,
        "machine": describe_machine(),
        "citation": "S. Bianco, Large Age-Gap Face Verification by Feature Injection in Deep Networks, PRL 90, 2017",
        "objective": "mean FNIR at FPIR 0.01, 0.03, 0.1, one look and every face flipped",
        "members": ours.info["members"],
        "chosen": best,
        "alone": [r for r in rows if max(r["weights"].values()) == 1.0],
        # What each member adds: the best candidate that gives it a weight against the best that leaves it out.
        "with_and_without": {
            m: {
                "with": next((r for r in rows if r["weights"][m] > 0), None),
                "without": next((r for r in rows if r["weights"][m] == 0), None),
            }
            for m in names
        },
        # --add-to-default: each added member's candidates by its share (the first is the default alone).
        "added": {
            m: sorted((r for r in rows if r["weights"][m] > 0), key=lambda r: r["weights"][m])
            for m in names
            if args.add_to_default and m not in defaults
        },
        "top": rows[:15],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"{len(photos)} images, {n_id} identities (half {args.half}), {args.splits} splits")
    # "with" / "without": the best candidates that give the member whose weight differs a share, or none.
    adds = [(k, r[k]) for r in results["with_and_without"].values() for k in ("with", "without") if r[k]]
    added = [("added", r) for member_rows in results["added"].values() for r in member_rows]
    for label, r in (
        [("chosen", best)] + [("alone", r) for r in results["alone"]] + [("next", r) for r in rows[1:8]] + adds + added
    ):
        w = ", ".join(f"{k} {v:.4g}" for k, v in r["weights"].items())
        plain = " / ".join(f"{x:.3f}" for x in r["plain"])
        flip = " / ".join(f"{x:.3f}" for x in r["flip"])
        print(f"{label:<7} {w:<70} one look {plain}  flip {flip}  objective {r['objective']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
