"""A model's calibration: how it scores strangers, and the thresholds that follow from it.

A watchlist alert is raised when a face's best score over the list exceeds a threshold. For a
face of someone NOT on the list (a stranger) that best score is the highest of many stranger
scores, so the false-alert rate per face (FPIR) grows with the list. With FAR(t) the share of
stranger pairs (one face, one template) scoring above t, and a list of N persons holding m
templates each, the first approximation, treating the N*m stranger scores of a face as independent:

    FPIR(t) = 1 - (1 - FAR(t)) ** (N * m)

Real faces are not independent draws: some faces look like many people, most like nobody in
particular, and the measured FPIR (bench/openset.py) falls below this figure, so a threshold chosen
with it errs on the safe side (fewer false alerts, a few more misses); docs/engine.md gives the
measured comparison.

The calibration file (JSON, made by `engines calibrate`) holds only figures: score quantiles of
stranger pairs for each cohort (for example adult probes against child templates, and adult
against adult), how many pairs and people they came from, and the command and date that made it.

It may also hold the other side, `misses` (MissCurve, written by `bench/openset.py --record-misses`):
the share of listed persons missed (FNIR) at a grid of thresholds, measured open-set on a labelled set
(a listed person is found only when their own person ranks first over the list AND scores above the
threshold). At a fixed threshold that share does not depend on the FPIR wanted, and on the list's size
only through the rank-1 requirement (more persons, more rivals), so it is recorded with the list size
it was measured at. Files without the section still load: the miss rate is then unknown.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "checkpoint-calibration/1"
PACKAGED_DIR = Path(__file__).resolve().parent / "calibrations"
# Tail points per decade of FAR stored in the file; the threshold is interpolated between them.
_POINTS_PER_DECADE = 8
# The false-alert rate per face a threshold is usually chosen for (`watchlist build`'s default), named
# where a threshold is refused so the operator sees a usable one.
USUAL_FPIR = 0.01
# Beyond the measured pairs the tail is extrapolated by a straight line in log10(FAR) fitted over
# this FAR range; a stranger-score tail falls off faster than that, so the threshold errs high.
_FIT_RANGE = (1e-2, 1e-5)


class CalibrationError(ValueError):
    """A calibration is missing, unreadable, or asked for something it cannot give."""


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and the rates the calibration expects from it at one list size."""

    threshold: float
    fpir: float  # false alerts per face of a stranger, at this list size
    far_pair: float  # a stranger's face against one template
    far_person: float  # a stranger's face against one person (best of the person's templates)
    list_size: int
    templates_per_person: float
    extrapolated: bool  # the pair FAR lies beyond the measured stranger pairs

    def describe(self) -> str:
        """One line for an operator: the threshold and what it means at this list size."""
        per = f"{self.templates_per_person:g} photo{'s' if self.templates_per_person != 1 else ''} each"
        note = " (beyond the measured strangers: an estimate on the safe side)" if self.extrapolated else ""
        return f"threshold {self.threshold:.4f}: with {self.list_size} persons on the list ({per}), {_rate_words(self.fpir)}{note}"

    def as_dict(self) -> dict:
        return {
            "threshold": round(self.threshold, 6),
            "fpir": self.fpir,
            "far_pair": self.far_pair,
            "far_person": self.far_person,
            "list_size": self.list_size,
            "templates_per_person": self.templates_per_person,
            "extrapolated": self.extrapolated,
        }


@dataclass(frozen=True)
class ScoreTail:
    """The distribution of stranger-pair scores as (FAR, score) points, FAR falling."""

    far: np.ndarray  # decreasing, far[0] = 1.0
    score: np.ndarray  # non-decreasing
    pairs: int
    median: float
    tail_slope: float  # d log10(FAR) / d score beyond the measured pairs (negative)
    tail_intercept: float

    @classmethod
    def from_scores(cls, scores: np.ndarray) -> ScoreTail:
        """Summarise stranger-pair scores (any number; at least 100)."""
        s = np.sort(np.asarray(scores, np.float64)[np.isfinite(scores)])[::-1]
        n = len(s)
        if n < 100:
            raise CalibrationError(f"{n} stranger pairs are too few to calibrate; give photos of more people")
        decades = math.log10(n)
        far = 10.0 ** (-np.arange(0, int(decades * _POINTS_PER_DECADE) + 1) / _POINTS_PER_DECADE)
        # The body (every 2%) for rates and medians, the tail on a log scale for thresholds.
        far = np.unique(np.concatenate([far, np.linspace(0.02, 0.98, 49), [1.0 / n]]))[::-1]
        # The score exceeded by a share `f` of pairs: the (floor(f*n))-th highest, accepting strictly above.
        idx = np.minimum(np.floor(far * n).astype(int), n - 1)
        score = s[idx]
        lo, hi = _FIT_RANGE
        sel = (far <= lo) & (far >= max(hi, 10.0 / n))
        if sel.sum() < 3:
            sel = far <= 0.1
        slope, intercept = np.polyfit(score[sel], np.log10(far[sel]), 1)
        if not slope < 0:
            raise CalibrationError("stranger scores do not fall off in the tail; the cohort is too small or odd")
        return cls(far, score, n, float(np.median(s)), float(slope), float(intercept))

    def far_at(self, threshold: float) -> tuple[float, bool]:
        """(share of stranger pairs scoring above `threshold`, whether extrapolated beyond the data)."""
        if threshold <= self.score[0]:
            return 1.0, False
        if threshold <= self.score[-1]:
            # score is non-decreasing along far's decreasing order; interpolate log10(far) in score.
            s, lf = _strictly_increasing(self.score, np.log10(self.far))
            return float(10 ** np.interp(threshold, s, lf)), False
        tail_lf = self.tail_intercept + self.tail_slope * threshold
        return float(min(10**tail_lf, self.far[-1])), True

    def threshold_at(self, far: float) -> tuple[float, bool]:
        """(the threshold at which a share `far` of stranger pairs scores above it, extrapolated?)."""
        if not 0 < far <= 1:
            raise CalibrationError(f"a false-accept rate must lie in (0, 1], got {far}")
        if far >= self.far[-1]:
            s, lf = _strictly_increasing(self.score, np.log10(self.far))
            return float(np.interp(math.log10(far), lf[::-1], s[::-1])), False
        t = (math.log10(far) - self.tail_intercept) / self.tail_slope
        return float(max(t, self.score[-1])), True

    def as_dict(self) -> dict:
        return {
            "pairs": self.pairs,
            "median": round(self.median, 6),
            "far": [float(f"{f:.6g}") for f in self.far],
            "score": [round(float(s), 6) for s in self.score],
            "tail_fit": {"log10_far_slope": self.tail_slope, "log10_far_intercept": self.tail_intercept},
        }

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ScoreTail:
        try:
            far, score = np.asarray(d["far"], np.float64), np.asarray(d["score"], np.float64)
            fit = d["tail_fit"]
            out = cls(
                far,
                score,
                int(d["pairs"]),
                float(d["median"]),
                float(fit["log10_far_slope"]),
                float(fit["log10_far_intercept"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"{where}: a cohort entry is malformed ({exc}); make it again with engines calibrate"
            ) from None
        if len(far) != len(score) or len(far) < 2 or np.any(np.diff(far) >= 0) or np.any(np.diff(score) < 0):
            raise CalibrationError(
                f"{where}: far/score lists are not a falling tail; make it again with engines calibrate"
            )
        return out


def _strictly_increasing(score: np.ndarray, log_far: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse tied scores (keep the smallest FAR at each score) so interpolation is well defined."""
    s, first = np.unique(score, return_index=True)
    last = len(score) - 1 - np.unique(score[::-1], return_index=True)[1]
    return s, log_far[np.maximum(first, last)]


@dataclass(frozen=True)
class MissCurve:
    """Listed persons' miss rate (FNIR) measured open-set at fixed thresholds, and where it comes from."""

    threshold: np.ndarray  # increasing
    fnir: np.ndarray  # non-decreasing, the mean over the measurement's identity splits
    list_size: int  # persons on the list it was measured with
    templates_per_person: float
    probes: int  # listed persons' probes per split
    splits: int
    source: str  # the data and protocol, in words
    note: str = ""  # the data's licence and citation
    command: str = ""
    date: str = ""

    def at(self, threshold: float) -> float | None:
        """FNIR at `threshold`, interpolated linearly between grid points; None below the grid (not measured).
        Above the grid's top the top value holds (the grid ends at 1.0, where nobody is found)."""
        if threshold < self.threshold[0]:
            return None
        return float(np.interp(threshold, self.threshold, self.fnir))

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "note": self.note,
            "command": self.command,
            "date": self.date or _dt.date.today().isoformat(),
            "list_size": self.list_size,
            "templates_per_person": self.templates_per_person,
            "probes": self.probes,
            "splits": self.splits,
            "threshold": [round(float(t), 6) for t in self.threshold],
            "fnir": [round(float(f), 5) for f in self.fnir],
        }

    @classmethod
    def from_dict(cls, d: dict, where: str) -> MissCurve:
        try:
            out = cls(
                np.asarray(d["threshold"], np.float64),
                np.asarray(d["fnir"], np.float64),
                int(d["list_size"]),
                float(d["templates_per_person"]),
                int(d["probes"]),
                int(d["splits"]),
                str(d["source"]),
                str(d.get("note", "")),
                str(d.get("command", "")),
                str(d.get("date", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{where}: malformed ({exc}); measure it again with bench/openset.py") from None
        t, f = out.threshold, out.fnir
        if len(t) != len(f) or len(t) < 2 or np.any(np.diff(t) <= 0) or np.any(np.diff(f) < 0):
            raise CalibrationError(f"{where}: thresholds must rise and miss rates must not fall along them")
        if np.any((f < 0) | (f > 1)):
            raise CalibrationError(f"{where}: a miss rate lies outside [0, 1]")
        return out


@dataclass(frozen=True)
class Calibration:
    """A model's stranger scores, per cohort, and the operating points they give.

    Example::

        cal = Calibration.load_for("dlib-resnet-v1")
        op = cal.threshold_for_fpir(0.01, list_size=600, templates_per_person=2)
        print(op.threshold, op.far_pair)
    """

    model: str
    flip_average: bool
    cohorts: dict[str, ScoreTail]
    description: dict  # where the scores came from: data, people, photos, command, date
    misses: MissCurve | None = None  # listed persons' miss rate by threshold, where measured

    # ---- loading and saving
    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration JSON file written by `engines calibrate`."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no such calibration file; make one with `engines calibrate`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"{path}: cannot read the calibration: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CalibrationError(f"{path}: not a calibration file (format must be {FORMAT!r})")
        cohorts = {k: ScoreTail.from_dict(v, f"{path}: cohorts.{k}") for k, v in (d.get("cohorts") or {}).items()}
        if not cohorts:
            raise CalibrationError(f"{path}: the calibration holds no cohort")
        misses = MissCurve.from_dict(d["misses"], f"{path}: misses") if d.get("misses") is not None else None
        return cls(
            str(d.get("model", "")),
            bool(d.get("flip_average", False)),
            cohorts,
            dict(d.get("description", {})),
            misses,
        )

    @staticmethod
    def packaged_path(name: str, flip_average: bool = False) -> Path:
        """Where the calibration packaged for model `name` and flip setting lies (it may not exist)."""
        return PACKAGED_DIR / f"{name}{'+flip' if flip_average else ''}.json"

    @classmethod
    def load_for(cls, model, flip_average: bool = False) -> Calibration:
        """The calibration of a model: an EmbedderSpec (its `calibration` file, else the packaged one for
        its name) or a model name / model id ("dlib-resnet-v1" or "dlib-resnet-v1:<sha>")."""
        path = getattr(model, "calibration", None)
        name = getattr(model, "name", None) or str(model).split(":", 1)[0]
        if path is None:
            path = cls.packaged_path(name, flip_average)
            if not path.is_file():
                raise CalibrationError(
                    f"no calibration for model {name!r}{' with flip_average' if flip_average else ''}: "
                    "make one with `engines calibrate DIR --out FILE` and set [engine.embedder] calibration = FILE"
                )
        cal = cls.load(path)
        if cal.model != name:
            raise CalibrationError(f"{path}: calibration is for model {cal.model!r}, not {name!r}")
        if cal.flip_average != flip_average:
            raise CalibrationError(
                f"{path}: calibrated with flip_average = {str(cal.flip_average).lower()}, but the engine has "
                f"flip_average = {str(flip_average).lower()}; calibrate again with the engine's config"
            )
        return cal

    @classmethod
    def for_thresholds(cls, model) -> Calibration:
        """The calibration a list's threshold is chosen from: the model's flip-averaged one where there is
        one, else its plain one. A unit judges every face that comes near the threshold on its
        flip-averaged embedding (the second look, ``[matching] second_look_fpir``, or flip_average), so
        the scores that decide an alert are flip-averaged scores (on lag-dev the plain calibration's
        threshold for FPIR 1% gave 1.5% with the second look; the flip-averaged one's, 1%)."""
        try:
            return cls.load_for(model, flip_average=True)
        except CalibrationError:
            return cls.load_for(model)

    @classmethod
    def for_engine_config(cls, config) -> Calibration:
        """The calibration a unit with this EngineConfig uses, without loading its models: its custom
        embedder's (`[engine.embedder]`), else its ensemble's (default or `[engine] ensemble`), for its
        flip setting."""
        from engines.ensemble import calibration_model

        return cls.load_for(calibration_model(config), flip_average=config.flip_average)

    @classmethod
    def for_engine(cls, engine) -> Calibration:
        """The calibration of a loaded FaceEngine's model and flip setting (what `watchlist build` and the
        unit use). A calibration made from other weights of the same model name is used with a warning."""
        cal = cls.load_for(engine.embedder.spec, flip_average=engine.config.flip_average)
        made_with = cal.description.get("model_id")
        if made_with and made_with != engine.model_id:
            log.warning(
                "calibration made with model %s, the engine runs %s; calibrate again", made_with, engine.model_id
            )
        return cal

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON (figures only: no embeddings, no photos, no names)."""
        d = {
            "format": FORMAT,
            "model": self.model,
            "flip_average": self.flip_average,
            "description": self.description,
            "cohorts": {k: v.as_dict() for k, v in self.cohorts.items()},
        }
        if self.misses is not None:
            d["misses"] = self.misses.as_dict()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_scores(
        cls, model: str, flip_average: bool, cohorts: dict[str, np.ndarray], description: dict
    ) -> Calibration:
        """Build a calibration from stranger-pair scores per cohort; the date is added to `description`."""
        desc = dict(description)
        desc.setdefault("date", _dt.date.today().isoformat())
        return cls(model, flip_average, {k: ScoreTail.from_scores(v) for k, v in cohorts.items()}, desc)

    def with_misses(self, misses: MissCurve) -> Calibration:
        """This calibration with `misses` as its miss curve (the strangers' side unchanged)."""
        return dataclasses.replace(self, misses=misses)

    # ---- figures
    def expected_miss_rate(self, threshold: float) -> float | None:
        """The share of listed persons expected to be missed at `threshold` (FNIR, interpolated from the
        `misses` section, at the list size it was measured with); None when the calibration has no such
        section or the threshold lies below its grid."""
        return None if self.misses is None else self.misses.at(threshold)

    def expected_summary(
        self, threshold: float, list_size: int, templates_per_person: float = 1.0, cohort: str | None = None
    ) -> str:
        """Both rates in one line for HQ: strangers' faces alerted at this list size (FPIR) and listed persons
        missed (FNIR, from the `misses` section, with its source), or that the miss rate is not calibrated."""
        point = self.expected_rates(threshold, list_size, templates_per_person, cohort)
        line = f"expected: about {_percent(point.fpir)} of strangers' faces alerted at list size {list_size}"
        if point.extrapolated:
            line += " (beyond the measured strangers: on the safe side)"
        m = self.misses
        if m is None:
            return line + "; miss rate: not calibrated for this model"
        miss = m.at(threshold)
        if miss is None:
            return line + f"; miss rate: not measured at this threshold (measured from {m.threshold[0]:g} up)"
        return (
            f"{line}; about {_percent(miss)} of listed persons missed "
            f"({m.source}; measured with {m.list_size} persons listed, bench/openset.py)"
        )

    @property
    def strangers_median(self) -> float:
        """The median score of a stranger pair (highest over cohorts): a threshold below it matches strangers."""
        return max(t.median for t in self.cohorts.values())

    @property
    def threshold_range(self) -> tuple[float, float]:
        """The open range of thresholds usable with this model: above the strangers' median (at or below
        it at least every second face of a stranger matches any one template) and below 1 (nobody
        matches). Every threshold a unit uses is checked against it: a list's, a person's, the unit's own."""
        return (self.strangers_median, 1.0)

    def threshold_problem(self, threshold: float, list_size: int = 1, templates_per_person: float = 1.0) -> str | None:
        """Why `threshold` cannot be used with this model (outside `threshold_range`), naming the calibrated
        level and the false alerts expected with `list_size` persons on the list; None when it can."""
        lo, hi = self.threshold_range
        if lo < threshold < hi:
            return None
        if threshold >= hi:
            return f"{threshold:g} is 1 or more, where no face can match; give a value below 1"
        expected = self.expected_rates(threshold, list_size, templates_per_person)
        usual = self.threshold_for_fpir(USUAL_FPIR, list_size, templates_per_person)
        persons = f"{list_size} person{'s' if list_size != 1 else ''}"
        return (
            f"{threshold:g} is at or below the strangers' median score {lo:g} for model {self.model} (its "
            f"calibration): with {persons} on the list {_rate_words(expected.fpir)}; give a value above {lo:g} "
            f"({usual.threshold:.4f} expects about {USUAL_FPIR:.0%} false alerts with {persons} on the list)"
        )

    def _tails(self, cohort: str | None) -> list[ScoreTail]:
        if cohort is None:
            return list(self.cohorts.values())
        if cohort not in self.cohorts:
            raise CalibrationError(f"the calibration has no cohort {cohort!r}; it has {', '.join(self.cohorts)}")
        return [self.cohorts[cohort]]

    def far(self, threshold: float, cohort: str | None = None) -> tuple[float, bool]:
        """Share of stranger pairs above `threshold` (in `cohort`, or the worst of all cohorts when None),
        and whether it is extrapolated beyond the measured pairs."""
        rates = [t.far_at(threshold) for t in self._tails(cohort)]
        return max(r[0] for r in rates), any(r[1] for r in rates)

    def threshold_for_far(self, far: float, cohort: str | None = None) -> tuple[float, bool]:
        """The threshold where at most `far` of stranger pairs score above it (in `cohort`, else in every one)."""
        points = [t.threshold_at(far) for t in self._tails(cohort)]
        return max(p[0] for p in points), any(p[1] for p in points)

    def threshold_for_fpir(
        self, fpir: float, list_size: int, templates_per_person: float = 1.0, cohort: str | None = None
    ) -> OperatingPoint:
        """The threshold giving at most `fpir` false alerts per stranger's face with `list_size` persons
        on the list, each with `templates_per_person` templates (photos) compared by their best score.
        `cohort` picks one cohort's scores ("cross_age" for a list of child photos); None takes the worst."""
        if not 0 < fpir < 1:
            raise CalibrationError(f"the false-alert rate per face must lie in (0, 1), got {fpir}")
        n = _templates(list_size, templates_per_person)
        far_pair = -math.expm1(math.log1p(-fpir) / n)
        threshold, _ = self.threshold_for_far(far_pair, cohort)
        return self.expected_rates(threshold, list_size, templates_per_person, cohort)

    def expected_rates(
        self, threshold: float, list_size: int, templates_per_person: float = 1.0, cohort: str | None = None
    ) -> OperatingPoint:
        """The false-alert rates expected at `threshold` with `list_size` persons on the list."""
        n = _templates(list_size, templates_per_person)
        far_pair, extrapolated = self.far(threshold, cohort)
        far_person = _at_least_one(far_pair, templates_per_person)
        return OperatingPoint(
            threshold=float(threshold),
            fpir=_at_least_one(far_pair, n),
            far_pair=far_pair,
            far_person=far_person,
            list_size=int(list_size),
            templates_per_person=float(templates_per_person),
            extrapolated=extrapolated,
        )


def _templates(list_size: int, templates_per_person: float) -> float:
    if int(list_size) != list_size or list_size < 1:
        raise CalibrationError(f"the list size must be a whole number of persons >= 1, got {list_size}")
    if not templates_per_person >= 1:
        raise CalibrationError(f"templates per person must be >= 1, got {templates_per_person}")
    return float(list_size) * float(templates_per_person)


def _at_least_one(p: float, n: float) -> float:
    """Chance that at least one of n independent draws with probability p happens."""
    if p >= 1:
        return 1.0
    return float(-math.expm1(n * math.log1p(-p)))


def _percent(p: float) -> str:
    """A rate as a percentage to 2 significant figures ("1%", "0.25%", "60%")."""
    return f"{float(f'{100 * p:.2g}'):g}%"


def _rate_words(p: float) -> str:
    """A false-alert rate per face in words ("about 1 in 100 faces ..."), N to 2 significant figures."""
    if p * 1.5 >= 1:
        return "nearly every face of a person not on the list raises a false alert"
    return f"about 1 in {float(f'{1 / p:.2g}'):,.0f} faces of people not on the list raises a false alert"
