"""Promotion gates: each metric on each test split, compared with MLflow's model validation; a missing score
refuses and says what to run."""

import pytest

from fashioncap.gates import DEFAULT_GATES, Gate, Scorecard, check
from fashioncap.promotion import score_tags, scorecard
from tests.conftest import compose, table

OLD, NEW = "champions-test-split", "new-products"


def champion(cider=6.38, garment=0.876, colour=0.865) -> Scorecard:
    return Scorecard("1", OLD, {OLD: {"cider_d": cider, "garment_f1": garment, "colour_f1": colour}})


def adapted(new_after=7.4, new_before=2.6, old_after=6.3, garment=0.87, colour=0.86, init="1") -> Scorecard:
    """A version fine-tuned from `init` on the new products, scored on them and on the champion's test split."""
    return Scorecard("2", NEW, {NEW: {"cider_d": new_after}, OLD: {"cider_d": old_after, "garment_f1": garment,
                                                                   "colour_f1": colour}},
                     {NEW: {"cider_d": new_before}, OLD: {"cider_d": 6.38, "garment_f1": 0.876, "colour_f1": 0.865}},
                     init)


def outcomes(verdicts) -> list[str]:
    return [v.outcome for v in verdicts]


def test_the_default_gates_are_the_configured_ones():
    assert tuple(Gate.of(g) for g in compose([])["registry"]["gates"]) == DEFAULT_GATES


def test_an_adaptation_that_forgets_the_products_on_sale_fails_the_champions_split():
    forgot = check(DEFAULT_GATES, adapted(old_after=3.265, garment=0.603), champion())
    assert outcomes(forgot) == ["pass", "fail", "fail", "pass"]
    line = forgot[1].line()
    assert "champion's test split" in line and "3.2650 vs champion 6.3800" in line and ">= 6.2524" in line
    assert "garment_f1" in forgot[2].line() and "0.6030 vs champion 0.8760" in forgot[2].line()
    # the new products: the champion's score there is the candidate's `before`, the champion's own captions
    assert (forgot[0].candidate, forgot[0].champion) == (7.4, 2.6)


def test_a_fall_within_the_tolerance_holds_and_one_beyond_it_does_not():
    assert outcomes(check(DEFAULT_GATES, adapted(old_after=6.38 * 0.981), champion())) == ["pass"] * 4
    assert outcomes(check(DEFAULT_GATES, adapted(old_after=6.38 * 0.979), champion()))[1] == "fail"
    strict = [Gate("champion", "cider_d", 0.0)]
    assert outcomes(check(strict, adapted(old_after=6.38), champion())) == ["pass"]  # equal holds a 0% drop


def test_on_the_same_test_split_a_candidate_must_beat_the_champion_not_equal_it():
    same = lambda cider: Scorecard("2", OLD, {OLD: {"cider_d": cider, "garment_f1": 0.9, "colour_f1": 0.9}})  # noqa: E731
    assert outcomes(check(DEFAULT_GATES, same(6.39), champion())) == ["pass"] * 4
    assert outcomes(check(DEFAULT_GATES, same(6.38), champion()))[0] == "fail"


def test_a_score_that_was_never_measured_refuses_and_says_what_to_run():
    elsewhere = Scorecard("3", "another-split", {"another-split": {"cider_d": 9.0}})
    verdicts = check(DEFAULT_GATES, elsewhere, champion())
    assert outcomes(verdicts) == ["missing"] * 4 and not any(v.passed for v in verdicts)
    assert "champion version 1 was never scored on version 3's test split" in verdicts[0].detail
    assert "model.init=models:/NAME@champion" in verdicts[0].detail
    assert "version 3 has no cider_d on champion version 1's test split" in verdicts[1].detail
    # adapted from another version: its `before` is not the champion's score
    from_another = check(DEFAULT_GATES, adapted(init="7"), champion())
    assert from_another[0].outcome == "missing" and "fine-tuned from version 7, not from it" in from_another[0].detail


def test_an_attribute_the_split_never_states_is_not_applicable():
    gate = [Gate("champion", "pattern_f1", 0.02)]
    none = Scorecard("2", OLD, {OLD: {"pattern_f1": None}})
    assert outcomes(check(gate, none, Scorecard("1", OLD, {OLD: {"pattern_f1": None}}))) == ["n/a"]
    assert outcomes(check(gate, none, Scorecard("1", OLD, {OLD: {"pattern_f1": 0.5}}))) == ["fail"]


@pytest.mark.parametrize("candidate,champion_score,passed", [(1.0, 1.0, False), (1.0 + 1e-9, 1.0, True),
                                                             (-0.5, -1.0, True), (0.0, 0.0, False)])
def test_beating_is_mlflows_strict_comparison(candidate, champion_score, passed):
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation.validation import _validate

    verdict, = check([Gate("candidate", "cider_d")], Scorecard("2", OLD, {OLD: {"cider_d": candidate}}),
                     Scorecard("1", OLD, {OLD: {"cider_d": champion_score}}))
    assert verdict.passed is passed
    try:
        _validate({"m": MetricThreshold(min_absolute_change=1e-12, greater_is_better=True)}, {"m": candidate},
                  {"m": champion_score})
        by_mlflow = True
    except Exception:
        by_mlflow = False
    assert by_mlflow is passed


def test_a_versions_score_tags_read_back_as_its_scorecard():
    scores = table(7.4, digest=NEW, garment_f1=0.95)
    scores["base_test"] = {**table(6.3, digest=OLD, garment_f1=0.6)}
    tags = {"data_digest": NEW, **score_tags(scores)}
    assert tags["test_cider_d"] == "7.4" and tags["base_test_attr_garment_f1"] == "0.6"
    assert tags["base_test_digest"] == OLD and tags["test_attr_detail_f1"] == "none"
    card = scorecard("2", tags, "1")
    assert card.scores[NEW]["cider_d"] == 7.4 and card.scores[OLD]["garment_f1"] == 0.6
    assert card.init_scores[NEW]["cider_d"] == 0.01 and card.scores[NEW]["detail_f1"] is None
    assert card.init_version == "1" and card.test_set == NEW
