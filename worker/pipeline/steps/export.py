"""`export`: extra formats of the final model. The files are written once the recipe has run
(worker.pipeline.exports); the step only records what was asked."""

from app.core.recipe import ExportStep
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel


def apply(run: JobRun, state: WorkingModel, step: ExportStep, place: StepPlace) -> dict:
    return {"formats": step.formats}
