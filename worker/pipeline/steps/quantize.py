"""`quantize`: ONNX Runtime's quantizers for the onnxruntime target (the model becomes an ONNX file), quantized
torch layers for the pytorch target."""

from app.core.recipe import QuantizeStep
from worker.compression import quantize
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel


def apply(run: JobRun, state: WorkingModel, step: QuantizeStep, place: StepPlace) -> dict:
    options = {"method": step.method, "dtype": step.dtype, "granularity": step.granularity,
               "group_size": step.group_size, "exclude": step.exclude}
    if run.runtime == "onnxruntime":
        source = run.onnx_form(state, place.workdir / f"step{place.index}-input.onnx")
        output = place.workdir / f"step{place.index}-quantize.onnx"
        details = quantize.quantize_onnx(source, output, **options, calibration_method=step.calibration_method,
                                         calibration=run.data.calibration, smoothing=step.smoothing,
                                         algorithm=step.algorithm)
        state.module, state.onnx_path = None, output
        return details
    state.module, details = quantize.quantize_module(state.module, **options)
    return details
