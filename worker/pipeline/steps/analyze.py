"""`analyze`: per-layer statistics and sensitivity of the model as it is at this step, and a suggested recipe."""

from app.core.recipe import AnalyzeStep
from worker.evaluation import analysis
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel


def apply(run: JobRun, state: WorkingModel, step: AnalyzeStep, place: StepPlace) -> dict:
    batches = run.data.eval_batches[:4]
    if state.module is not None:
        return analysis.analyze_module(state.module, [run.torch_args(b) for b in batches], run.ctx.check,
                                       bins=step.bins)
    return analysis.analyze_onnx(state.onnx_path, batches, run.ctx.check, bins=step.bins)
