"""Trust in an answer: fit and apply a calibration of the search's scores.

Three things, fitted per model on queries whose answer is known (calibration_data.py
gathers them) and kept as one row of `calibrations`:

- **probability** that the top answer is right: logistic regression (Platt scaling
  on several features) over the top score and the margins to the 2nd and 3rd
  implant, fitted with scikit-learn and applied here with numpy (search does not
  import scikit-learn);
- **prediction set** at a target coverage: split conformal on the "least ambiguous
  set" score 1 - p_j, with p_j a temperature softmax over the ranked implants. The
  quantile is the finite-sample one, in numpy: mapie and crepes need a classifier
  over a fixed list of classes, and a catalogue's implants are not one (they change
  with every ingest, and a search ranks only the nearest);
- **out of catalogue**: an open-set statistic of the query's ranked scores (the top
  score, the margin to the 2nd implant, and the top score against the rest of the
  query's nearest implants: their mean, spread and the top's z-score among them),
  combined by a logistic regression fitted to tell calibration queries of catalogued
  implants from queries of implants not in it (the source's own, and each labelled
  query again with its right implant taken out: what the same X-ray would score were
  its implant not in the catalogue). The answer's flag is the conformal p-value of
  that statistic among in-catalogue queries the regression never saw (a seeded half,
  split by query so that no X-ray is in both), flagged below the false-alarm rate: at
  most that share of X-rays of catalogued implants is ever flagged, whatever the
  regression learnt. The regression replaces the top score only where at least
  MIN_QUERIES real X-rays of implants not in the catalogue (confirmed "not in the
  catalogue") show, on held-out folds, that it separates better: simulated ones
  misled it on every model measured (bench/README.md), so without real ones the top
  score stays the statistic. Calibrations stored before this statistic keep the top
  score as theirs (params without "ooc") and still apply.

A calibration applies to the model it was fitted on, with the same orientations
(TTA) and the whole catalogue (no --manufacturer); otherwise the answer says it is
uncalibrated and why, and keeps today's wording.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg

from raiox_cli.db import queries
from raiox_cli.embedding import parse_model_id
from raiox_cli.errors import RaioxError, UsageError
from raiox_cli.search.measures import auroc, brier, ece, ece_floor, fpr_at_tpr, reliability
from raiox_cli.search.result import Trust, confidence

DEPTH = 10  # implants ranked for the prediction set; one more is fetched for margins
DEFAULT_TARGET = 0.9
DEFAULT_FALSE_ALARM = 0.05
FEATURES = ("top score", "margin to the 2nd", "margin to the 3rd")
OOC_FEATURES = (
    "top score",
    "margin to the 2nd",
    "mean of the next 9",
    "spread of the next 9",
    "top score's z among the next 9",
)
OOC_STATISTIC = "logistic/1"  # params["ooc"]["statistic"]; none: the top score (before it)
STRONG = 0.8  # calibrated probability from which an answer is a "strong match"
POSSIBLE = 0.3  # below it: "no confident match"
MIN_QUERIES = 20  # in-catalogue queries a fit needs at least
OOC_SCORES_KEPT = 2000  # calibration top scores kept for out-of-catalogue p-values
VERDICTS = ("strong", "possible", "none", "not_in_catalogue")


class BadTarget(UsageError):
    """--target or --false-alarm outside (0, 1)."""


class NoCalibrationData(RaioxError):
    """Too few queries with a known answer to fit a calibration."""


class NotCalibrated(RaioxError):
    """--show: the model has no calibration yet."""


def check_rate(name: str, value: float) -> float:
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise BadTarget(f"{name} must be between 0 and 1 (exclusive), got {value:g}")
    return float(value)


# --- samples and features ------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One calibration query: the ranked implant scores search gave (best first,
    up to DEPTH + 1) and where the right implant was among them."""

    scores: tuple[float, ...]
    true_rank: int | None  # 1-based; None when not ranked (or not in the catalogue)
    in_catalogue: bool = True
    identity: str = ""  # what it was (hashed into the calibration's data snapshot)


def features(scores: Sequence[float]) -> np.ndarray:
    """FEATURES of one ranked list (a missing implant scores like the last one)."""
    s = list(scores) or [0.0]
    s += [s[-1]] * (3 - len(s))
    return np.array([s[0], s[0] - s[1], s[0] - s[2]], dtype=np.float64)


def ooc_features(scores: Sequence[float]) -> np.ndarray:
    """OOC_FEATURES of one ranked list: where the top score stands among the query's
    own nearest implants (a per-query scale: some X-rays score high against every
    implant, and a top score means little without the others)."""
    s = np.asarray(list(scores)[:DEPTH] or [0.0], dtype=np.float64)
    rest = s[1:] if len(s) > 1 else s
    spread = float(rest.std())
    return np.array(
        [s[0], s[0] - rest[0], rest.mean(), spread, (s[0] - rest.mean()) / (spread + 1e-3)]
    )


def softmax(scores: Sequence[float], temperature: float) -> np.ndarray:
    z = np.asarray(scores[:DEPTH], dtype=np.float64) / temperature
    z = np.exp(z - z.max()) if len(z) else z
    return z / z.sum() if len(z) else z


def _nonconformity(sample: Sample, temperature: float) -> float:
    if sample.true_rank is None or sample.true_rank > DEPTH:
        return math.inf  # no set of the ranked implants holds it
    return float(1.0 - softmax(sample.scores, temperature)[sample.true_rank - 1])


def conformal_quantile(scores: Sequence[float], coverage: float) -> float:
    """Split-conformal threshold: the ceil((n+1) * coverage)-th smallest score, so a
    new exchangeable query's score is at most it with probability >= coverage
    (inf when n is too small for that coverage)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * coverage)
    return math.inf if rank > len(ordered) else float(ordered[rank - 1])


def ooc_p_value(statistic: float, in_catalogue: Sequence[float]) -> float:
    """Conformal p-value: how plausible a statistic this low is for an X-ray of a
    catalogued implant ((1 + reference queries scoring as low or lower) / (n + 1),
    the reference sorted ascending)."""
    reference = np.asarray(in_catalogue, dtype=np.float64)
    lower = int(np.searchsorted(reference, statistic, side="right"))
    return (1 + lower) / (len(reference) + 1)


def without_right_implant(sample: Sample) -> Sample | None:
    """The same query were its implant not in the catalogue: its ranked scores with
    the right implant's taken out (None when the right implant is not ranked: its
    score is unknown)."""
    if sample.true_rank is None or sample.true_rank > len(sample.scores):
        return None
    scores = sample.scores[: sample.true_rank - 1] + sample.scores[sample.true_rank :]
    return Sample(scores, None, False, sample.identity + "\tsimulated out") if scores else None


# --- the fit -------------------------------------------------------------------------


@dataclass
class Calibration:
    """A fitted calibration (one `calibrations` row)."""

    model_id: str
    target: float
    false_alarm: float
    tta: bool
    source: str
    counts: dict[str, Any]
    data_sha256: str
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    created_at: datetime | None = None
    stale_at: datetime | None = None
    stale_reason: str | None = None

    @property
    def stale(self) -> bool:
        return self.stale_at is not None

    def probability(self, scores: Sequence[float]) -> float:
        p = self.params
        x = (features(scores) - np.array(p["mean"])) / np.array(p["scale"])
        logit = float(x @ np.array(p["coef"]) + p["intercept"])
        return 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0

    def prediction_set(self, scores: Sequence[float]) -> list[int]:
        """0-based ranks of the implants in the set, best first (maybe none)."""
        threshold = self.params["set_threshold"]
        probs = softmax(scores, self.params["temperature"])
        if threshold is None:  # too few queries for the target: every ranked implant
            return list(range(len(probs)))
        return [j for j, pj in enumerate(probs) if 1.0 - pj <= threshold]

    def ooc_statistic(self, scores: Sequence[float]) -> float:
        """The open-set statistic of one ranked list: higher looks more like an X-ray
        of a catalogued implant. A calibration stored before the fitted statistic
        (no params["ooc"]) keeps the top score it was fitted with."""
        fitted = self.params.get("ooc")
        if fitted is None:
            return float(scores[0]) if len(scores) else -math.inf
        x = (ooc_features(scores) - np.array(fitted["mean"])) / np.array(fitted["scale"])
        return float(x @ np.array(fitted["coef"]) + fitted["intercept"])

    def ooc_p(self, scores: Sequence[float]) -> float:
        """Conformal p-value that a query with these ranked scores shows a catalogued
        implant (low: probably not in the catalogue)."""
        fitted = self.params.get("ooc")
        reference = fitted["reference"] if fitted is not None else self.params["ooc_tops"]
        return ooc_p_value(self.ooc_statistic(scores), reference)

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not full:
            data["params"] = {k: v for k, v in self.params.items() if k != "ooc_tops"}
            if "ooc" in self.params:
                data["params"]["ooc"] = {
                    k: v for k, v in self.params["ooc"].items() if k != "reference"
                }
        return data

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Calibration:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


def _fit_probability(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    if len(set(y.tolist())) < 2:  # always right (or never): no slope to learn
        rate = (y.sum() + 0.5) / (len(y) + 1.0)
        return {
            "mean": mean.tolist(),
            "scale": scale.tolist(),
            "coef": [0.0] * x.shape[1],
            "intercept": math.log(rate / (1 - rate)),
        }
    model = LogisticRegression(C=10.0, max_iter=1000).fit((x - mean) / scale, y)
    return {
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "coef": model.coef_[0].tolist(),
        "intercept": float(model.intercept_[0]),
    }


def _fit_temperature(samples: Sequence[Sample]) -> float:
    """Temperature of the set's softmax: the one that best predicts the right implant
    among the ranked ones (negative log-likelihood, searched on a log grid)."""
    usable = [s for s in samples if s.true_rank is not None and s.true_rank <= DEPTH]
    if not usable:
        return 0.05
    grid = np.exp(np.linspace(math.log(1e-3), math.log(1.0), 61))

    def nll(t: float) -> float:
        return -sum(math.log(max(softmax(s.scores, t)[s.true_rank - 1], 1e-12)) for s in usable)  # type: ignore[operator]

    return float(min(grid, key=nll))


def _group(identity: str) -> str:
    """Samples made from one query (the catalogue's in and out pair) share a group."""
    for suffix in ("\tin", "\tout"):
        if identity.endswith(suffix):
            return identity[: -len(suffix)]
    return identity


def fit_ooc(samples: Sequence[Sample], *, simulate: bool, seed: int = 0) -> dict[str, Any]:
    """The open-set statistic and its conformal reference (see the module's docstring).

    Queries are split in two by group (seeded): the regression learns from the first
    half's in-catalogue queries against out-of-catalogue ones (the first half's own,
    and with `simulate` each of its in-catalogue queries again without its right
    implant); the second half's in-catalogue queries, never seen by the regression,
    are the reference its p-values count against."""
    from sklearn.linear_model import LogisticRegression

    groups = sorted({_group(s.identity) for s in samples})
    rng = np.random.default_rng([seed, 31])
    fitting = {groups[i] for i in rng.permutation(len(groups))[: len(groups) // 2]}
    first = [s for s in samples if _group(s.identity) in fitting]
    second = [s for s in samples if _group(s.identity) not in fitting and s.in_catalogue]
    inside = [s for s in first if s.in_catalogue and s.scores]
    outside = [s for s in first if not s.in_catalogue and s.scores]
    simulated = [o for o in map(without_right_implant, inside) if o is not None] if simulate else []
    negatives = outside + simulated
    top_only = {  # the top score alone (coefficient 1 on it): the statistic before this one
        "statistic": OOC_STATISTIC,
        "features": list(OOC_FEATURES),
        "mean": [0.0] * len(OOC_FEATURES),
        "scale": [1.0] * len(OOC_FEATURES),
        "coef": [1.0] + [0.0] * (len(OOC_FEATURES) - 1),
        "intercept": 0.0,
        "chosen": "top score",
    }
    fitted: dict[str, Any] = top_only
    cv: dict[str, float | None] = {"logistic": None, "top score": None}
    real_outside = sum(not s.identity.startswith("catalogue\t") for s in outside)
    if len(inside) >= 5 and real_outside >= MIN_QUERIES:
        x = np.stack([ooc_features(s.scores) for s in inside + negatives])
        y = np.r_[np.ones(len(inside)), np.zeros(len(negatives))]
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-9] = 1.0
        z = (x - mean) / scale
        # The regression must beat the top score alone where it can be checked: on
        # 5 folds of the fitting half, grouped by query (a query and its simulated
        # twin in one fold). Else the top score stays the statistic.
        group_of = {g: i for i, g in enumerate(sorted({_group(s.identity) for s in first}))}
        groups = [
            group_of[_group(s.identity.removesuffix("\tsimulated out"))] for s in inside + negatives
        ]
        held = np.empty(len(y))
        for fold in range(5):
            test = np.array([g % 5 == fold for g in groups])
            if test.all() or not test.any() or len(set(y[~test].tolist())) < 2:
                held[test] = z[test, 0]
                continue
            part = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
            held[test] = part.fit(z[~test], y[~test]).decision_function(z[test])
        # Judged against real out-of-catalogue queries only: the simulated ones (the
        # catalogue's implants left out, labelled X-rays without their implant) chose
        # a regression that did worse than the top score on X-rays of implants truly
        # not in the catalogue, on every model bench_calibrate.py measured.
        real = np.r_[
            np.zeros(len(inside)),
            [0.0 if s.identity.startswith("catalogue\t") else 1.0 for s in outside],
            np.zeros(len(simulated)),
        ]
        judge = (y == 0) & (real == 1)
        cv = {
            "logistic": auroc(held[y == 1], held[judge]),
            "top score": auroc(x[y == 1, 0], x[judge, 0]),
        }
        if (cv["logistic"] or 0) > (cv["top score"] or 0):
            model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(z, y)
            fitted = {
                "statistic": OOC_STATISTIC,
                "features": list(OOC_FEATURES),
                "mean": mean.tolist(),
                "scale": scale.tolist(),
                "coef": model.coef_[0].tolist(),
                "intercept": float(model.intercept_[0]),
                "chosen": "logistic",
            }
    probe = Calibration("", 0.5, 0.5, False, "", {}, "", {"ooc": fitted})
    reference = np.sort([probe.ooc_statistic(s.scores) for s in second if s.scores])
    if len(reference) > OOC_SCORES_KEPT:  # evenly spaced order statistics keep the p-values
        reference = reference[
            np.linspace(0, len(reference) - 1, OOC_SCORES_KEPT).round().astype(int)
        ]
    fitted.update(
        reference=[float(r) for r in reference],
        reference_queries=len(second),
        fitted_on={
            "in_catalogue": len(inside),
            "out_of_catalogue": len(outside),
            "simulated_out_of_catalogue": len(simulated),
            "real_out_of_catalogue": real_outside,
        },
        cross_validated_auroc=cv,
    )
    return fitted


def fit_params(
    samples: Sequence[Sample],
    target: float,
    *,
    with_outside: bool = False,
    simulate_outside: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The three fits from calibration samples (see the module's docstring).
    `simulate_outside`: out-of-catalogue queries are also simulated from the
    in-catalogue ones (not for the catalogue source, which makes its own)."""
    inside = [s for s in samples if s.in_catalogue]
    if len(inside) < MIN_QUERIES:
        raise NoCalibrationData(
            f"{len(inside)} queries of catalogued implants; a calibration needs at least "
            f"{MIN_QUERIES}"
        )
    # The probability is that of a right top answer for an X-ray of a catalogued
    # implant (the out-of-catalogue flag speaks for the others), except where the
    # share of the others is real (confirmations): there it learns from them too.
    learn = samples if with_outside else inside
    x = np.stack([features(s.scores) for s in learn])
    y = np.array([1 if s.in_catalogue and s.true_rank == 1 else 0 for s in learn])
    params = _fit_probability(x, y)
    temperature = _fit_temperature(inside)
    threshold = conformal_quantile([_nonconformity(s, temperature) for s in inside], target)
    ooc = fit_ooc(samples, simulate=simulate_outside, seed=seed)
    params.update(
        temperature=temperature,
        set_threshold=None if math.isinf(threshold) else threshold,
        ooc=ooc,
        ooc_queries=ooc["reference_queries"],
        features=list(FEATURES),
        depth=DEPTH,
        probability_of="any X-ray" if with_outside else "an X-ray of a catalogued implant",
    )
    return params


def _split(samples: Sequence[Sample], rng: np.random.Generator) -> tuple[list, list]:
    order = rng.permutation(len(samples))
    half = len(samples) // 2
    return [samples[i] for i in order[:half]], [samples[i] for i in order[half:]]


def fit(
    samples: Sequence[Sample],
    *,
    model_id: str,
    target: float = DEFAULT_TARGET,
    false_alarm: float = DEFAULT_FALSE_ALARM,
    tta: bool,
    source: str,
    counts: dict[str, Any],
    seed: int = 0,
) -> Calibration:
    """Fit on every sample; the fit's own metrics come from fitting on one half and
    measuring on the other (so they are not measured on what was fitted)."""
    check_rate("--target", target)
    check_rate("--false-alarm", false_alarm)
    with_outside = source == "confirmed"  # the one source with a real out-of-catalogue share
    simulate = source != "catalogue"  # the catalogue source leaves implants out itself
    params = fit_params(
        samples, target, with_outside=with_outside, simulate_outside=simulate, seed=seed
    )
    calibration = Calibration(
        model_id, target, false_alarm, tta, source, counts, snapshot_hash(samples), params
    )
    first, second = _split(samples, np.random.default_rng(seed))
    try:
        half = Calibration(
            model_id,
            target,
            false_alarm,
            tta,
            source,
            {},
            "",
            fit_params(
                first, target, with_outside=with_outside, simulate_outside=simulate, seed=seed
            ),
        )
        calibration.metrics = {"held_out_half": measure(half, second)}
    except NoCalibrationData:
        calibration.metrics = {"held_out_half": None, "note": "too few queries to split"}
    calibration.metrics["in_sample"] = measure(calibration, samples)
    return calibration


def snapshot_hash(samples: Sequence[Sample]) -> str:
    lines = sorted(f"{s.identity}\t{int(s.in_catalogue)}\t{s.true_rank}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --- measuring ----------------------------------------------------------------------


def measure(calibration: Calibration, samples: Sequence[Sample]) -> dict[str, Any]:
    """What a calibration does on queries with a known answer: ECE and Brier of the
    probability on X-rays of catalogued implants (the raw top score taken as a
    probability beside it; ece_all over every query), set coverage and size,
    the out-of-catalogue false alarms and, given such queries, AUROC and FPR@95%TPR."""
    inside = [s for s in samples if s.in_catalogue]
    outside = [s for s in samples if not s.in_catalogue]
    probs_all = [calibration.probability(s.scores) for s in samples]
    right_all = [1 if s.in_catalogue and s.true_rank == 1 else 0 for s in samples]
    probs = [calibration.probability(s.scores) for s in inside]
    right = [1 if s.true_rank == 1 else 0 for s in inside]
    raw = [min(max(s.scores[0], 0.0), 1.0) if s.scores else 0.0 for s in inside]
    sets = [calibration.prediction_set(s.scores) for s in inside]
    covered = [
        s.true_rank is not None and (s.true_rank - 1) in members
        for s, members in zip(inside, sets, strict=True)
    ]
    in_stat = [calibration.ooc_statistic(s.scores) for s in inside if s.scores]
    out_stat = [calibration.ooc_statistic(s.scores) for s in outside if s.scores]
    in_p = [calibration.ooc_p(s.scores) for s in inside if s.scores]
    out_p = [calibration.ooc_p(s.scores) for s in outside if s.scores]
    sizes = [len(m) for m in sets]
    return {
        "queries": len(samples),
        "in_catalogue": len(inside),
        "out_of_catalogue": len(outside),
        "top1": float(np.mean([s.true_rank == 1 for s in inside])) if inside else None,
        "ece": ece(probs, right),
        "ece_raw_score": ece(raw, right),
        "ece_floor": ece_floor(probs),
        "brier": brier(probs, right),
        "brier_raw_score": brier(raw, right),
        # over every query, out-of-catalogue ones too (their top answer is never right)
        "ece_all": ece(probs_all, right_all),
        "coverage": float(np.mean(covered)) if covered else None,
        "target": calibration.target,
        "mean_set_size": float(np.mean(sizes)) if sizes else None,
        "empty_sets": float(np.mean([n == 0 for n in sizes])) if sizes else None,
        "set_sizes": np.bincount(sizes, minlength=DEPTH + 1).tolist() if sizes else [],
        "false_alarm": float(np.mean([p <= calibration.false_alarm for p in in_p]))
        if in_p
        else None,
        "false_alarm_target": calibration.false_alarm,
        "detected": float(np.mean([p <= calibration.false_alarm for p in out_p]))
        if out_p
        else None,
        # Out of catalogue is the positive class; a lower statistic says "outside" more
        # (the statistic, not its p-value: the same order, without the reference's ties).
        "ooc_auroc": auroc([-x for x in out_stat], [-x for x in in_stat]),
        "ooc_fpr_at_95tpr": fpr_at_tpr([-x for x in out_stat], [-x for x in in_stat]),
        # the top score alone as the statistic, beside it (what the fitted one adds)
        "ooc_auroc_top_score": auroc(
            [-s.scores[0] for s in outside if s.scores], [-s.scores[0] for s in inside if s.scores]
        ),
        "reliability": reliability(probs, right),
    }


def evaluation(
    calibration: Calibration | None,
    inside: Sequence[Sample],
    outside: Sequence[Sample],
    *,
    model_id: str,
    tta: bool,
) -> dict[str, Any]:
    """`raiox eval`: the active calibration measured on labelled X-rays (and X-rays of
    implants not in the catalogue, --unknown); the raw top score's open-set AUROC
    either way, so a catalogue without a calibration still learns how separable it is."""
    tops_in = [-s.scores[0] for s in inside if s.scores]
    tops_out = [-s.scores[0] for s in outside if s.scores]
    raw = {
        "unknown_queries": len(outside),
        "ooc_auroc_raw_score": auroc(tops_out, tops_in),
        "ooc_fpr_at_95tpr_raw_score": fpr_at_tpr(tops_out, tops_in),
    }
    reason = why_not(calibration, model_id=model_id, tta=tta, filtered=False)
    if reason is not None:
        return {"calibrated": False, "reason": reason, **raw}
    assert calibration is not None
    measured = measure(calibration, [*inside, *outside])
    return {"calibrated": True, "calibration_id": calibration.id, **measured, **raw}


def answered_measures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`eval --confirmed`: what calibrated answers said (their stored trust fields,
    never recomputed) against what the dentists confirmed."""
    inside = [r for r in rows if not r["not_in_catalogue"]]
    outside = [r for r in rows if r["not_in_catalogue"]]

    def top(row: dict[str, Any]) -> str | None:
        ranked = row["trust"].get("ranked") or []
        return ranked[0][0] if ranked else None

    probs = [float(r["trust"]["probability"]) for r in inside]
    right = [1 if top(r) == r["implant_key"] else 0 for r in inside]
    sizes = [len(r["trust"]["prediction_set"]) for r in inside]
    covered = [r["implant_key"] in r["trust"]["prediction_set"] for r in inside]
    return {
        "analyses": len(rows),
        "in_catalogue": len(inside),
        "not_in_catalogue": len(outside),
        "top1": float(np.mean(right)) if right else None,
        "ece": ece(probs, right) if probs else None,
        "brier": brier(probs, right) if probs else None,
        "coverage": float(np.mean(covered)) if covered else None,
        "targets": sorted({r["trust"]["set_coverage"] for r in inside}),
        "mean_set_size": float(np.mean(sizes)) if sizes else None,
        "set_sizes": np.bincount(sizes, minlength=DEPTH + 1).tolist() if sizes else [],
        "false_alarm": float(np.mean([bool(r["trust"]["out_of_catalogue"]) for r in inside]))
        if inside
        else None,
        "detected": float(np.mean([bool(r["trust"]["out_of_catalogue"]) for r in outside]))
        if outside
        else None,
        "reliability": reliability(probs, right) if probs else [],
    }


def answered_by_month(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    months: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        months.setdefault(row["month"], []).append(row)
    return {
        "all": answered_measures(rows),
        "by_month": [{"month": m, **answered_measures(r)} for m, r in sorted(months.items())],
    }


# --- applying ------------------------------------------------------------------------


def uncalibrated_verdict(scores: Sequence[float], min_score: float, min_margin: float) -> str:
    """Today's wording from fixed cosine thresholds (shown marked uncalibrated)."""
    return confidence(scores, min_score, min_margin)


def _ranked(ranked: Sequence[tuple[str, float]]) -> list[list[Any]]:
    return [[key, round(float(score), 6)] for key, score in ranked[: DEPTH + 1]]


def uncalibrated(
    reason: str, ranked: Sequence[tuple[str, float]], min_score: float, min_margin: float
) -> Trust:
    scores = [score for _, score in ranked]
    verdict = uncalibrated_verdict(scores, min_score, min_margin)
    return Trust(False, verdict, reason=reason, ranked=_ranked(ranked))


def apply(calibration: Calibration, ranked: Sequence[tuple[str, float]]) -> Trust:
    """The trust fields of one answer from its ranked (implant key, score) list."""
    scores = [score for _, score in ranked]
    if not scores:
        return Trust(True, "not_in_catalogue", 0.0, [], calibration.target, True, 1.0)
    probability = calibration.probability(scores)
    members = calibration.prediction_set(scores)
    p_value = calibration.ooc_p(scores)
    outside = p_value <= calibration.false_alarm
    if outside:
        verdict = "not_in_catalogue"
    elif probability >= STRONG:
        verdict = "strong"
    elif probability >= POSSIBLE:
        verdict = "possible"
    else:
        verdict = "none"
    return Trust(
        calibrated=True,
        verdict=verdict,
        probability=round(probability, 4),
        prediction_set=[ranked[j][0] for j in members if j < len(ranked)],
        set_coverage=calibration.target,
        out_of_catalogue=outside,
        out_of_catalogue_score=round(1.0 - p_value, 4),
        calibration_id=calibration.id,
        calibrated_at=calibration.created_at.isoformat() if calibration.created_at else None,
        ranked=_ranked(ranked),
    )


def load(conn: psycopg.Connection, model_id: str) -> Calibration | None:
    row = queries.latest_calibration(conn, model_id)
    return Calibration.from_row(row) if row else None


def trust_for(
    calibration: Calibration | None,
    ranked: Sequence[tuple[str, float]],
    *,
    model_id: str,
    tta: bool,
    filtered: bool,
    min_score: float,
    min_margin: float,
) -> Trust:
    """The answer's trust fields, or why it is uncalibrated (with today's wording)."""
    reason = why_not(calibration, model_id=model_id, tta=tta, filtered=filtered)
    if reason is not None:
        return uncalibrated(reason, ranked, min_score, min_margin)
    assert calibration is not None
    return apply(calibration, ranked)


def random_weights(model_id: str) -> bool:
    """Whether a model id is one of random weights (--pretrained none), never calibrated."""
    return parse_model_id(model_id).tag == "none"


def why_not(
    calibration: Calibration | None, *, model_id: str, tta: bool, filtered: bool
) -> str | None:
    if random_weights(model_id):
        return "random model weights (--pretrained none): nothing to calibrate"
    if calibration is None:
        return f'model {model_id} has no calibration; run "raiox calibrate"'
    if calibration.stale:
        return (
            f'the calibration is stale ({calibration.stale_reason}); run "raiox calibrate" '
            "(the nightly reindex refits it)"
        )
    if calibration.tta != tta:
        fitted = "with" if calibration.tta else "without"
        return f"calibrated {fitted} TTA (--tta/--no-tta): search the same way, or recalibrate"
    if filtered:
        return "--manufacturer narrows the catalogue the calibration measured"
    return None


def store(conn: psycopg.Connection, calibration: Calibration) -> Calibration:
    row = queries.save_calibration(
        conn,
        model_id=calibration.model_id,
        target=calibration.target,
        false_alarm=calibration.false_alarm,
        tta=calibration.tta,
        source=calibration.source,
        counts=calibration.counts,
        data_sha256=calibration.data_sha256,
        params=calibration.params,
        metrics=_finite(calibration.metrics),
    )
    return Calibration.from_row(row)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
