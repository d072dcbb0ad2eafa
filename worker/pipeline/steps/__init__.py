"""One handler per recipe op, found by the op's name. Adding a compression method means: its schema class in
app.core.recipe, its handler here, its tests.

A handler takes the job run, the working model (which it changes in place), its step and its place in the
recipe, and returns the step's details for the report.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel
from worker.pipeline.steps import analyze, distill, export, finetune, prune, quantize


@dataclass(frozen=True)
class StepHandler:
    apply: Callable[[JobRun, WorkingModel, Any, StepPlace], dict[str, Any]]
    modifies: bool  # the model changes: it is measured after the step
    report_key: str | None = None  # the step's details also go to the report under this key


HANDLERS: dict[str, StepHandler] = {
    "quantize": StepHandler(quantize.apply, modifies=True),
    "prune": StepHandler(prune.apply, modifies=True),
    "distill": StepHandler(distill.apply, modifies=True),
    "finetune": StepHandler(finetune.apply, modifies=True),
    "analyze": StepHandler(analyze.apply, modifies=False, report_key="analysis"),
    "export": StepHandler(export.apply, modifies=False),
}
