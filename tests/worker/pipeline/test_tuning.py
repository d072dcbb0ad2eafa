import json

import pytest

from worker.errors import JobCancelled, JobFailure
from worker.pipeline.tuning import tune

BASELINE = 0.90  # 1% tolerance: a metric of 0.891 or more meets it
RESULTS = {  # recipe id -> (size_bytes, latency_ms, metric)
    "a": (400, 1.0, 0.899),
    "b": (300, 3.0, 0.895),
    "c": (200, 2.0, 0.80),   # smallest, too inaccurate
    "d": (250, 2.5, 0.893),  # smallest of those within tolerance
    "e": None,               # fails
    "g": (450, 4.0, 0.85),   # beaten by "a" on both size and metric
}
CANDIDATES = [{"id": key} for key in RESULTS]


def run_trial(recipe):
    result = RESULTS[recipe["id"]]
    if result is None:
        raise JobFailure("quantization_failed", "boom")
    return result


def search(candidates=CANDIDATES, **options):
    settings = {"baseline_metric": BASELINE, "max_loss": 0.01, "objective": "size", "max_trials": 10,
                "time_budget_s": None, **options}
    return tune(candidates, run_trial, **settings)


def ids(result, indices):
    return [result["trials"][i]["recipe"]["id"] for i in indices]


def test_objective_size_and_latency_pick_different_trials_within_tolerance():
    by_size, by_latency = search(objective="size"), search(objective="latency")
    assert ids(by_size, [by_size["best"]]) == ["d"] and ids(by_latency, [by_latency["best"]]) == ["a"]
    assert by_size["met_tolerance"] and by_latency["met_tolerance"] and by_size["stopped"] == "exhausted"
    assert [t["meets_tolerance"] for t in by_size["trials"]] == [True, True, False, True, False, False]
    assert "1.0% tolerance" in by_size["message"] and json.dumps(by_size)  # plain JSON for the job metrics
    assert (by_size["objective"], by_size["max_loss"], by_size["baseline_metric"]) == ("size", 0.01, BASELINE)


def test_ties_on_the_objective_go_to_the_higher_metric():
    table = {"x": (250, 1.0, 0.892), "y": (250, 1.0, 0.898), "z": (250, 1.0, 0.895)}
    result = tune([{"id": k} for k in table], lambda r: table[r["id"]], baseline_metric=BASELINE,
                  max_loss=0.01, objective="size", max_trials=5, time_budget_s=None)
    assert ids(result, [result["best"]]) == ["y"]


def test_failed_trials_are_recorded_and_left_out_of_the_front():
    result = search()
    failed = result["trials"][4]
    assert failed["error"] == "JobFailure: boom" and failed["metric"] is None and not failed["meets_tolerance"]
    assert ids(result, result["pareto_front"]) == ["c", "d", "b", "a"]  # by size; "g" is dominated by "a"
    by_latency = search(objective="latency")
    assert ids(by_latency, by_latency["pareto_front"]) == ["a"]  # fastest and most accurate


def test_max_trials_is_respected():
    result = search(max_trials=2)
    assert ids(result, range(len(result["trials"]))) == ["a", "b"] and result["stopped"] == "max_trials"
    assert ids(result, [result["best"]]) == ["b"] and "max_trials (2)" in result["message"]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_no_trial_starts_once_the_time_budget_is_spent():
    clock = FakeClock()

    def slow_trial(recipe):
        clock.now += 10
        return run_trial(recipe)

    result = tune(CANDIDATES, slow_trial, baseline_metric=BASELINE, max_loss=0.01, objective="size", max_trials=10,
                  time_budget_s=25, clock=clock)
    assert len(result["trials"]) == 3 and result["stopped"] == "time_budget"  # started at 0, 10 and 20 s
    assert all(t["seconds"] == 10 for t in result["trials"])
    assert "time budget (25 s)" in result["message"]
    assert tune(CANDIDATES, slow_trial, baseline_metric=BASELINE, max_loss=0.01, objective="size", max_trials=10,
                time_budget_s=0, clock=clock)["trials"] == []


def test_when_nothing_meets_the_tolerance_the_most_accurate_is_returned():
    result = search(max_loss=0.001)
    assert ids(result, [result["best"]]) == ["a"] and result["met_tolerance"] is False
    assert result["message"] == ("no candidate met the 0.1% tolerance; returning the most accurate one found "
                                 "(0.1% loss)")


def test_all_failed_means_no_best():
    result = search(candidates=[{"id": "e"}, {"id": "e", "again": True}])
    assert result["best"] is None and result["met_tolerance"] is False and result["pareto_front"] == []
    assert result["message"] == "all 2 trials failed; there is no compressed model to return"


def test_cancellation_propagates():
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise JobCancelled("job")

    with pytest.raises(JobCancelled):
        search(check=check)
    assert len(calls) == 3

    def cancelled_inside(recipe):
        raise JobCancelled("job")

    with pytest.raises(JobCancelled):
        tune(CANDIDATES, cancelled_inside, baseline_metric=BASELINE, max_loss=0.01, objective="size", max_trials=5,
             time_budget_s=None)

    state = {"cancelled": False}

    def fails_while_cancelled(recipe):  # a trial broken by the cancel itself is not recorded as a failure
        state["cancelled"] = True
        raise RuntimeError("interrupted")

    def check_flag():
        if state["cancelled"]:
            raise JobCancelled("job")

    with pytest.raises(JobCancelled):
        tune(CANDIDATES, fails_while_cancelled, baseline_metric=BASELINE, max_loss=0.01, objective="size",
             max_trials=5, time_budget_s=None, check=check_flag)


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError):
        search(objective="accuracy")


def test_perplexity_is_lower_is_better_and_max_loss_bounds_its_relative_increase():
    perplexities = {"int8": (400, 1.0, 20.5), "int4": (200, 1.0, 21.5), "int2": (100, 1.0, 40.0)}
    result = tune([{"id": key} for key in perplexities], lambda recipe: perplexities[recipe["id"]],
                  baseline_metric=20.0, max_loss=0.1, objective="size", max_trials=10, time_budget_s=None,
                  lower_is_better=True)
    assert [t["meets_tolerance"] for t in result["trials"]] == [True, True, False]  # 21.5 <= 20 x 1.1 < 40
    assert ids(result, [result["best"]]) == ["int4"] and ids(result, result["pareto_front"]) == ["int2", "int4",
                                                                                                  "int8"]
    strict = tune([{"id": key} for key in perplexities], lambda recipe: perplexities[recipe["id"]],
                  baseline_metric=20.0, max_loss=0.01, objective="size", max_trials=10, time_budget_s=None,
                  lower_is_better=True)
    assert not strict["met_tolerance"] and ids(strict, [strict["best"]]) == ["int8"]  # the lowest perplexity


def test_a_trial_that_would_not_fit_the_budget_left_is_skipped_and_the_search_goes_on():
    """b trains for an expected 30 s (plus a's 10 s) with 15 s left: skipped, listed, and c still runs."""
    clock = FakeClock()

    def slow_trial(recipe):
        clock.now += 10
        return run_trial(recipe)

    result = tune(CANDIDATES[:3], slow_trial, baseline_metric=BASELINE, max_loss=0.01, objective="latency",
                  max_trials=10, time_budget_s=25, clock=clock,
                  estimate=lambda recipe: 30.0 if recipe["id"] == "b" else 0.0)
    assert ids(result, range(len(result["trials"]))) == ["a", "c"]
    assert result["skipped"] == [{"recipe": {"id": "b"}, "reason": "expected to take 40 s, 15 s of the time "
                                                                   "budget left"}]
    assert "1 candidates skipped for the time budget" in result["message"]
