"""Tuning on a job's model: turn the candidate recipes into trials (each applied to a fresh copy of the original
model) and hand them to the search in worker.pipeline.tuning."""

import copy
import itertools
import shutil
import time
from functools import cache
from typing import Any

import torch

from app.core.errors import ErrorCode
from app.core.recipe import TRAINING_OPS, DatasetRefs, DistillStep, Recipe, TuneSpec
from app.core.tuning import job_candidates
from worker.errors import JobFailure
from worker.evaluation import data as job_data
from worker.pipeline import tuning
from worker.pipeline.apply import Applied, apply_recipe
from worker.pipeline.job_run import JobRun, WorkingModel
from worker.pipeline.steps.distill import with_encoder_defaults

# A training step's cost per sample and epoch, in forward passes of the model: the teacher's forward and the
# student's forward and backward (about two forwards).
PASSES_PER_SAMPLE = 4


def _candidates(run: JobRun, spec: TuneSpec) -> list[dict]:
    """The user's recipes (the job's recipe first) or generated ones, less those the target or model refuses."""
    staged = run.staged
    module = run.loaded.module
    layer_names = [n for n, m in (module.named_modules() if module is not None else [])
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return job_candidates(([staged.recipe] if staged.recipe else []) + list(spec.search or []), target=run.target,
                          datasets=DatasetRefs(**{role: "given" for role in staged.dataset_files}),
                          model_format=staged.model_format, info=run.loaded.info, layer_names=layer_names,
                          objective=spec.objective)


def _training_estimate(run: JobRun):
    """recipe -> the seconds its training steps are expected to take at most (early stopping may end them sooner):
    epochs x train samples x PASSES_PER_SAMPLE forward passes, timed once on a batch of the train data."""

    @cache
    def seconds_per_sample() -> float:
        size, static = job_data.batch_size(run.loaded.inputs)
        count = min(size if static else 16, len(run.data.train.inputs[0]))
        inputs = [torch.from_numpy(a[:count]).to(run.device) for a in run.data.train.inputs]
        with torch.no_grad():
            started = time.perf_counter()
            run.loaded.module(*inputs)
            return (time.perf_counter() - started) / count

    def estimate(recipe: dict) -> float:
        steps = [s for s in Recipe.model_validate(recipe).steps if s.op in TRAINING_OPS]
        if not steps or run.data.train is None or run.loaded.module is None:
            return 0.0
        epochs = sum((with_encoder_defaults(run, s)[0] if isinstance(s, DistillStep) else s).epochs for s in steps)
        return epochs * len(run.data.train.inputs[0]) * PASSES_PER_SAMPLE * seconds_per_sample()

    return estimate


def tune(run: JobRun, spec: TuneSpec, baseline: dict[str, Any], baseline_fidelity: float) -> tuple[Applied, dict]:
    """The best trial's outcome and the tuning report (every trial, the Pareto front, the choice and why)."""
    candidates = _candidates(run, spec)
    lower_is_better = spec.metric == "perplexity"
    if spec.metric == "accuracy":
        if baseline["accuracy"] is None:
            raise JobFailure(ErrorCode.INVALID_DATASET, "tune.metric 'accuracy' needs an eval dataset with labels")
        baseline_metric = baseline["accuracy"]
    elif spec.metric == "perplexity":
        if baseline.get("perplexity") is None:
            raise JobFailure(ErrorCode.INVALID_DATASET, "tune.metric 'perplexity' needs a causal language model "
                                                        "and a .jsonl text eval dataset")
        baseline_metric = baseline["perplexity"]
    else:
        baseline_metric = baseline_fidelity
    applied: dict[int, Applied] = {}  # by trial index, as the search counts trials (a failed one too)
    numbers = itertools.count()

    def run_trial(recipe: dict) -> tuple[int, float, float]:
        index = next(numbers)
        trial_dir = run.workdir / f"trial{index}"
        trial_dir.mkdir()
        state = WorkingModel(module=copy.deepcopy(run.loaded.module), onnx_path=run.loaded.onnx_path)
        run.ctx.progress(0.3, "tune", f"trial {index + 1}: {[s['op'] for s in recipe['steps']]}", trial=index)
        result = apply_recipe(run, Recipe.model_validate(recipe), state, trial_dir, measure_steps=False, trial=index)
        applied[index] = result
        fidelity = run.fidelity(result.outputs)
        result.figures["fidelity"] = fidelity
        metric = fidelity["cosine_mean"] if spec.metric == "fidelity" else result.figures[spec.metric]
        report = getattr(run.ctx, "trial", None)  # the sandbox's context hands each trial's model to the worker
        if report is not None:
            report(index, result.path, {"recipe": recipe, "size_bytes": result.figures["size_bytes"],
                                        "latency_ms": result.figures["latency_ms"]["p50"], "metric": metric,
                                        "meets_tolerance": tuning.loss(baseline_metric, metric, lower_is_better)
                                        <= spec.max_loss})
        return result.figures["size_bytes"], result.figures["latency_ms"]["p50"], metric

    def best_so_far(index: int) -> None:
        publish = getattr(run.ctx, "best", None)  # the sandbox's context: the parent publishes it as provisional
        if publish is not None:
            publish(index, applied[index].path)

    outcome = tuning.tune(candidates, run_trial, baseline_metric=baseline_metric, max_loss=spec.max_loss,
                          objective=spec.objective, max_trials=spec.max_trials, time_budget_s=spec.time_budget_s,
                          check=run.ctx.check, lower_is_better=lower_is_better,
                          estimate=_training_estimate(run), on_best=best_so_far)
    outcome["metric"] = spec.metric
    if outcome["best"] is None:
        raise JobFailure(ErrorCode.TUNING_FAILED, outcome["message"])
    for index in range(len(outcome["trials"])):
        if index != outcome["best"]:
            shutil.rmtree(run.workdir / f"trial{index}", ignore_errors=True)
    best = applied[outcome["best"]]
    best.figures.pop("fidelity", None)
    return best, outcome
