"""Walks a recipe: each step's handler in order, the model measured after every step that changes it.

An `export` step placed before a quantize step writes its PyTorch-form formats (pt2, safetensors, hf) right there,
from the model as it stands: the sparse fp32 weights of a pruned model and its int8 ONNX file from one job. The
other exports are written from the final model (worker.pipeline.exports)."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.recipe import ExportStep, QuantizeStep, Recipe
from worker.pipeline import exports as exporting
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
    # written by an export step before a quantize step: files, and their layouts for the report
    snapshots: list = field(default_factory=list)
    snapshot_layouts: dict[str, Any] = field(default_factory=dict)


def apply_recipe(run: JobRun, recipe: Recipe, state: WorkingModel, workdir: Path, measure_steps: bool,
                 trial: int | None = None) -> Applied:
    """Run the steps in order; with `measure_steps`, measure the model after every step that changes it (a tuning
    trial, numbered `trial`, measures only its result)."""
    records: list[dict[str, Any]] = []
    reported: dict[str, Any] = {}
    last: tuple[Path, dict, list] | None = None
    fidelity_before: dict | None = None  # the last measured step's: what a recovery step starts from
    final_exports: list[ExportStep] = []
    snapshots: list = []
    snapshot_layouts: dict[str, Any] = {}
    for index, step in enumerate(recipe.steps):
        place = StepPlace(recipe=recipe, index=index, workdir=workdir,
                          fraction=0.3 + 0.5 * index / len(recipe.steps), trial=trial)
        run.ctx.progress(place.fraction, step.op, f"step {index + 1}/{len(recipe.steps)}: {step.op}",
                         step_index=index, trial=trial)
        handler = HANDLERS[step.op]
        started = time.perf_counter()
        details = handler.apply(run, state, step, place)
        if isinstance(step, ExportStep):
            early = _snapshot_formats(run, recipe, index, state)
            if early:
                outputs, layouts = exporting.export_formats(run, state, [ExportStep(op="export", formats=early)],
                                                            _folder(workdir / f"export-step{index}"))
                snapshots += outputs
                snapshot_layouts.update({fmt: {**layout, "model": "before quantization (the export step comes "
                                                                   "before the quantize step)"}
                                         for fmt, layout in layouts.items()})
                details = {**details, "written_before_quantize": early}
            rest = [fmt for fmt in step.formats if fmt not in early]
            if rest:
                final_exports.append(ExportStep(op="export", formats=rest))
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
    return Applied(*last, steps=records, state=state, exports=final_exports, reported=reported, snapshots=snapshots,
                   snapshot_layouts=snapshot_layouts)


def _snapshot_formats(run: JobRun, recipe: Recipe, index: int, state: WorkingModel) -> list[str]:
    """The PyTorch-form formats of the export step at `index` that a later quantize step would make impossible or
    different: those are written from the model as it is now (the main deliverable's format stays the final's)."""
    later_quantize = any(isinstance(s, QuantizeStep) for s in recipe.steps[index + 1:])
    if not later_quantize or state.module is None:
        return []
    return [fmt for fmt in recipe.steps[index].formats if fmt not in ("onnx", run.extension)]


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
