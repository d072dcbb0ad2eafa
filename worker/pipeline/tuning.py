"""Accuracy-aware tuning: try candidate recipes in order and keep the smallest (or fastest) one whose metric stays
within the allowed loss of the baseline.

This module is only the search: the pipeline supplies `run_trial(recipe) -> (size_bytes, latency_ms, metric)`
(metric: accuracy or fidelity cosine, higher is better; or perplexity, lower is better: `lower_is_better`), so
the search can be tested without running models.

The candidates come from app.core.tuning (the same list a dry run shows): plain recipes (what
`app.core.recipe.Recipe` accepts), less those the job's target or model refuses; one that fails anyway is
recorded as a failed trial and the search goes on.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from celery.exceptions import SoftTimeLimitExceeded

from worker.errors import JobCancelled, JobLost

OBJECTIVES = {"size": "size_bytes", "latency": "latency_ms"}
STOP = (JobCancelled, JobLost, SoftTimeLimitExceeded)  # the job must end: never recorded as a failed trial


@dataclass
class Trial:
    recipe: dict
    size_bytes: int
    latency_ms: float
    metric: float | None
    meets_tolerance: bool
    error: str | None = None
    seconds: float = 0.0


def loss(baseline_metric: float, metric: float, lower_is_better: bool = False) -> float:
    """The metric's relative loss against the baseline (what `max_loss` bounds): for perplexity (lower is better)
    the relative increase."""
    worse_by = metric - baseline_metric if lower_is_better else baseline_metric - metric
    return worse_by / max(abs(baseline_metric), 1e-12)


def _pareto_front(trials: list[Trial], key: str, sign: int) -> list[int]:
    """Successful trials no other one beats on both the objective (lower) and the metric (`sign` x metric
    higher)."""
    done = [i for i, t in enumerate(trials) if t.error is None]
    score = {i: sign * trials[i].metric for i in done}
    front = []
    for i in done:
        a = trials[i]
        dominated = any(getattr(trials[j], key) <= getattr(a, key) and score[j] >= score[i]
                        and (getattr(trials[j], key) < getattr(a, key) or score[j] > score[i])
                        for j in done)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (getattr(trials[i], key), -score[i], i))


def _best(trials: list[Trial], key: str, baseline_metric: float, max_loss: float,
          lower_is_better: bool) -> tuple[int | None, str]:
    tolerance = f"{max_loss:.1%}"
    sign = -1 if lower_is_better else 1
    meeting = [i for i, t in enumerate(trials) if t.meets_tolerance]
    if meeting:
        best = min(meeting, key=lambda i: (getattr(trials[i], key), -sign * trials[i].metric, i))
        what = (f"the smallest file ({trials[best].size_bytes} bytes)" if key == "size_bytes" else
                f"the lowest latency ({trials[best].latency_ms:g} ms)")
        return best, (f"trial {best} has {what} of the {len(meeting)} that met the {tolerance} tolerance "
                      f"({loss(baseline_metric, trials[best].metric, lower_is_better):.1%} loss)")
    done = [i for i, t in enumerate(trials) if t.error is None]
    if not done:
        return None, (f"all {len(trials)} trials failed; there is no compressed model to return" if trials else
                      "no trial ran; there is no compressed model to return")
    best = max(done, key=lambda i: (sign * trials[i].metric, -getattr(trials[i], key), -i))
    return best, (f"no candidate met the {tolerance} tolerance; returning the most accurate one found "
                  f"({loss(baseline_metric, trials[best].metric, lower_is_better):.1%} loss)")


def tune(candidates: list[dict], run_trial: Callable[[dict], tuple[int, float, float]], *, baseline_metric: float,
         max_loss: float, objective: str, max_trials: int, time_budget_s: float | None,
         check: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
         lower_is_better: bool = False, estimate: Callable[[dict], float] = lambda recipe: 0.0,
         on_best: Callable[[int], None] = lambda index: None) -> dict:
    """Run the candidates in order until they run out, `max_trials` ran, or the time budget is spent (checked
    before each trial: none starts after it). A trial that trains and is expected not to fit the budget left
    (`estimate`: its training seconds, plus the quickest finished trial's seconds for the rest) is skipped and the
    search goes on;
    skipped candidates, and those left when the budget ran out, are listed in `skipped`. A trial that raises is
    recorded as failed; cancellation (from `check`, or a cancel noticed inside the trial) ends the search by
    propagating. `on_best(index)` is called whenever a finished trial becomes the best so far, chosen as the final
    choice is (so the last call names the final choice)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    key = OBJECTIVES[objective]
    started = clock()
    trials: list[Trial] = []
    skipped: list[dict] = []
    stopped = "exhausted"
    for position, recipe in enumerate(candidates):
        if len(trials) >= max_trials:
            stopped = "max_trials"
            break
        if time_budget_s is not None:
            left = time_budget_s - (clock() - started)
            if left <= 0:
                stopped = "time_budget"
                skipped += [{"recipe": r, "reason": "the time budget was spent"} for r in candidates[position:]]
                break
            training = estimate(recipe)
            finished = [t.seconds for t in trials if t.error is None]
            expected = training + (min(finished) if finished else 0.0)
            if training > 0 and expected > left:
                skipped.append({"recipe": recipe, "reason": f"expected to take {expected:.0f} s, {left:.0f} s of "
                                                            "the time budget left"})
                continue
        check()
        trial_started = clock()
        try:
            size_bytes, latency_ms, metric = run_trial(recipe)
        except STOP:
            raise
        except Exception as exc:
            check()  # a trial that failed because the job was cancelled meanwhile ends the search too
            trials.append(Trial(recipe=recipe, size_bytes=0, latency_ms=0.0, metric=None, meets_tolerance=False,
                                error=f"{exc.__class__.__name__}: {exc}", seconds=clock() - trial_started))
            continue
        trials.append(Trial(recipe=recipe, size_bytes=size_bytes, latency_ms=latency_ms, metric=metric,
                            meets_tolerance=loss(baseline_metric, metric, lower_is_better) <= max_loss,
                            seconds=clock() - trial_started))
        if _best(trials, key, baseline_metric, max_loss, lower_is_better)[0] == len(trials) - 1:
            on_best(len(trials) - 1)

    best, message = _best(trials, key, baseline_metric, max_loss, lower_is_better)
    won_by = _margin(trials, best, key)
    if won_by is not None:
        message += (f"; {won_by['ratio']:.2f}x {'smaller' if key == 'size_bytes' else 'faster'} than the "
                    f"runner-up within tolerance, trial {won_by['runner_up']}")
    if skipped:
        message += f"; {len(skipped)} candidates skipped for the time budget"
    if stopped != "exhausted":
        reason = f"max_trials ({max_trials})" if stopped == "max_trials" else f"time budget ({time_budget_s:g} s)"
        message += f"; stopped after {len(trials)} of {len(candidates)} candidates: {reason} reached"
    return {"trials": [asdict(t) for t in trials], "best": best,
            "met_tolerance": best is not None and trials[best].meets_tolerance,
            "pareto_front": _pareto_front(trials, key, -1 if lower_is_better else 1), "objective": objective,
            "max_loss": max_loss, "baseline_metric": baseline_metric, "stopped": stopped, "skipped": skipped,
            "won_by": won_by, "message": message}


def _margin(trials: list[Trial], best: int | None, key: str) -> dict | None:
    """How far the chosen trial beats the next best one that also met the tolerance: the runner-up's objective
    over the winner's."""
    if best is None or not trials[best].meets_tolerance:
        return None
    others = [i for i, t in enumerate(trials) if t.meets_tolerance and i != best]
    if not others:
        return None
    runner_up = min(others, key=lambda i: (getattr(trials[i], key), i))
    return {"runner_up": runner_up,
            "ratio": round(getattr(trials[runner_up], key) / max(getattr(trials[best], key), 1e-12), 3)}
