"""`export`: extra formats of the final model. The files are written once the recipe has run
(worker.pipeline.exports), except PyTorch-form formats of an export step placed before a quantize step, which
worker.pipeline.apply writes from the model as it stands there; the step only records what was asked."""

from app.core.recipe import ExportStep
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel


def apply(run: JobRun, state: WorkingModel, step: ExportStep, place: StepPlace) -> dict:
    return {"formats": step.formats}
