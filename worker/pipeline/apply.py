"""Walks a recipe: each step's handler in order, the model measured after every step that changes it."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.recipe import ExportStep, Recipe
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel
from worker.pipeline.steps import HANDLERS


@dataclass
class Applied:
    """A recipe's outcome: the final file in the target format, its figures and outputs, per-step records, and
    what goes into the report besides (e.g. `analysis`)."""

    path: Path
    figures: dict[str, Any]
    outputs: list
    steps: list[dict[str, Any]]
    state: WorkingModel
    exports: list[ExportStep]
    reported: dict[str, Any] = field(default_factory=dict)


def apply_recipe(run: JobRun, recipe: Recipe, state: WorkingModel, workdir: Path, measure_steps: bool,
                 trial: int | None = None) -> Applied:
    """Run the steps in order; with `measure_steps`, measure the model after every step that changes it (a tuning
    trial, numbered `trial`, measures only its result)."""
    records: list[dict[str, Any]] = []
    reported: dict[str, Any] = {}
    last: tuple[Path, dict, list] | None = None
    fidelity_before: dict | None = None  # the last measured step's: what a recovery step starts from
    for index, step in enumerate(recipe.steps):
        place = StepPlace(recipe=recipe, index=index, workdir=workdir,
                          fraction=0.3 + 0.5 * index / len(recipe.steps), trial=trial)
        run.ctx.progress(place.fraction, step.op, f"step {index + 1}/{len(recipe.steps)}: {step.op}",
                         step_index=index, trial=trial)
        handler = HANDLERS[step.op]
        started = time.perf_counter()
        details = handler.apply(run, state, step, place)
        record: dict[str, Any] = {"op": step.op, "seconds": round(time.perf_counter() - started, 3)}
        if handler.report_key is not None:
            reported[handler.report_key] = details
        if handler.modifies:
            last = None
            if measure_steps:
                path = run.write(state, workdir / f"after-step{index}")
                figures, outputs = run.evaluate(path, state)
                record.update(figures, fidelity=run.fidelity(outputs))
                if details.get("student") == "current" and fidelity_before is not None:
                    record["fidelity_before"] = fidelity_before
                fidelity_before = record["fidelity"]
                last = (path, figures, outputs)
            else:
                record["params"], record["nonzero_params"] = state.weights()
        record["details"] = details
        records.append(record)
        run.ctx.check()
    if last is None:
        path = run.write(state, workdir / "compressed")
        figures, outputs = run.evaluate(path, state)
        last = (path, figures, outputs)
    exports = [step for step in recipe.steps if isinstance(step, ExportStep)]
    return Applied(*last, steps=records, state=state, exports=exports, reported=reported)
