"""Promotion gates: what a candidate must score, on which test set, against the champion, before `champion`
moves to it (registry.gates). Each comparison is MLflow's model validation: `validate_evaluation_results` with
one `MetricThreshold` per gate.

A version's scores come from its registry tags, by test set (the digest of the split it was scored on): its own
test split and, for a version adapted from another, the test split of the catalogue it was adapted from
(BASE_TEST), each after fine-tuning and before it (the init's captions). So the champion's score on a
candidate's new products is known when the candidate was adapted from the champion: its `before`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

# Beating a score means exceeding it by more than this (MetricThreshold takes a positive absolute change)
BEAT_BY = 1e-12
TestSet = Literal["candidate", "champion"]


@dataclass(frozen=True)
class Gate:
    """On the candidate's or the champion's test split, `metric` must beat the champion's (max_drop None) or
    fall at most `max_drop` of it (relative)."""

    test_set: TestSet
    metric: str
    max_drop: float | None = None

    def describe(self) -> str:
        where = "the candidate's test split" if self.test_set == "candidate" else "the champion's test split"
        rule = "beats the champion's" if self.max_drop is None else f"falls at most {self.max_drop:.0%} below the champion's"
        return f"{self.metric} on {where} {rule}"

    @classmethod
    def of(cls, raw) -> "Gate":
        raw = raw if isinstance(raw, dict) else raw.model_dump()
        return cls(raw["test_set"], raw["metric"], raw.get("max_drop"))

    def as_dict(self) -> dict:
        return {"test_set": self.test_set, "metric": self.metric, "max_drop": self.max_drop}


# The gates of a version registered before gates were recorded with it: conf/config.yaml's registry.gates
# (tests/stage/test_gates.py holds the two equal)
DEFAULT_GATES = (Gate("candidate", "cider_d"), Gate("champion", "cider_d", 0.02),
                 Gate("champion", "garment_f1", 0.02), Gate("champion", "colour_f1", 0.02))

Scores = dict[str, dict[str, float | None]]  # test-set digest -> metric -> value (None: the set has none of it)


@dataclass(frozen=True)
class Scorecard:
    """What a version scored, by test set: after its fine-tuning (`scores`) and, on the same sets, the model it
    was fine-tuned from (`init_scores`, with that version's number when it is one of this registered model)."""

    number: str
    test_set: str  # the digest of its own test split
    scores: Scores = field(default_factory=dict)
    init_scores: Scores = field(default_factory=dict)
    init_version: str | None = None


_MISSING = object()


@dataclass(frozen=True)
class Verdict:
    gate: Gate
    test_set: str
    candidate: float | None
    champion: float | None
    outcome: Literal["pass", "fail", "missing", "n/a"]
    detail: str

    @property
    def passed(self) -> bool:
        return self.outcome in ("pass", "n/a")

    def line(self) -> str:
        where = f"{self.gate.test_set}'s test split ({self.test_set[:12]})"
        numbers = (f"{self.candidate:.4f} vs champion {self.champion:.4f}"
                   if self.candidate is not None and self.champion is not None else "")
        return f"{self.outcome.upper():7} {self.gate.metric} on the {where}: {numbers}{'; ' if numbers else ''}{self.detail}"

    def tag(self) -> tuple[str, str]:
        """The verdict as a version tag: gate.<test set>.<metric> = outcome, both numbers and the rule."""
        rule = "beat" if self.gate.max_drop is None else f"max_drop {self.gate.max_drop}"
        value = f"{self.outcome} candidate {self.candidate} champion {self.champion} ({rule}; {self.test_set[:12]})"
        return f"gate.{self.gate.test_set}.{self.gate.metric}", value


def _score(scores: Scores, digest: str, metric: str):
    return scores.get(digest, {}).get(metric, _MISSING)


def _missing(gate: Gate, digest: str, candidate: Scorecard, champion: Scorecard, whose: str) -> str:
    """What to run so that the missing score exists."""
    if whose == "candidate":
        return (f"version {candidate.number} has no {gate.metric} on champion version {champion.number}'s test split: "
                f"it was tested on another split and not adapted from the champion (train from it, "
                f"model.init=models:/NAME@champion, and evaluate scores both)"
                if digest != candidate.test_set else
                f"version {candidate.number} has no {gate.metric} tag: register it again with this fashioncap "
                "(`dvc repro` at its commit)")
    if digest == champion.test_set:
        return (f"champion version {champion.number} has no {gate.metric} tag: register it again with this "
                "fashioncap (`dvc repro` at its commit)")
    return (f"champion version {champion.number} was never scored on version {candidate.number}'s test split: "
            + (f"version {candidate.number} was fine-tuned from version {candidate.init_version}, not from it"
               if candidate.init_version else f"version {candidate.number} was not fine-tuned from it")
            + " (train from the champion, model.init=models:/NAME@champion, and evaluate scores it there as `before`)")


def verdict(gate: Gate, candidate: Scorecard, champion: Scorecard) -> Verdict:
    """One gate's verdict: both numbers, and MLflow's validation of the candidate's against the champion's."""
    digest = candidate.test_set if gate.test_set == "candidate" else champion.test_set
    ours = _score(candidate.scores, digest, gate.metric)
    theirs = _score(champion.scores, digest, gate.metric)
    if theirs is _MISSING and candidate.init_version == champion.number:
        theirs = _score(candidate.init_scores, digest, gate.metric)  # the champion's captions, scored by evaluate
    for value, whose in ((ours, "candidate"), (theirs, "champion")):
        if value is _MISSING:
            return Verdict(gate, digest, None, None, "missing", _missing(gate, digest, candidate, champion, whose))
    if ours is None and theirs is None:
        return Verdict(gate, digest, None, None, "n/a", f"the test split states no {gate.metric.removesuffix('_f1')}")
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs):
        return Verdict(gate, digest, ours, theirs, "fail", "one side has no value")
    passed, why = _validate(gate, ours, theirs)
    return Verdict(gate, digest, ours, theirs, "pass" if passed else "fail", why)


def _validate(gate: Gate, candidate: float, champion: float) -> tuple[bool, str]:
    """MLflow's model validation of one metric: beat the baseline (an absolute change above zero), or hold it
    (a threshold of the baseline less max_drop of it)."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    if gate.max_drop is None:
        threshold, rule = MetricThreshold(min_absolute_change=BEAT_BY, greater_is_better=True), "must beat it"
    else:
        floor = float(champion - gate.max_drop * abs(champion))
        threshold = MetricThreshold(threshold=floor, greater_is_better=True)
        rule = f"may fall at most {gate.max_drop:.0%}: >= {floor:.4f}"
    logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)  # a line per call otherwise
    try:
        mlflow.validate_evaluation_results({gate.metric: threshold}, EvaluationResult({gate.metric: candidate}, {}),
                                           EvaluationResult({gate.metric: champion}, {}))
    except ModelValidationFailedException:
        return False, rule
    return True, rule


def check(gates, candidate: Scorecard, champion: Scorecard) -> list[Verdict]:
    """Every gate's verdict, in the order configured."""
    return [verdict(gate, candidate, champion) for gate in gates]
