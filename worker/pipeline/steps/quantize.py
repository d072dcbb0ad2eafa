"""`quantize`: ONNX Runtime's quantizers for the onnxruntime target (the model becomes an ONNX file), quantized
torch layers for the pytorch target."""

from app.core.recipe import QuantizeStep
from worker.compression import quantize
from worker.formats import onnx_pair
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel


def apply(run: JobRun, state: WorkingModel, step: QuantizeStep, place: StepPlace) -> dict:
    options = {"method": step.method, "dtype": step.dtype, "granularity": step.granularity,
               "group_size": step.group_size, "exclude": step.exclude}
    if run.runtime == "onnxruntime":
        source = run.onnx_form(state, place.workdir / f"step{place.index}-input.onnx")
        output = place.workdir / f"step{place.index}-quantize.onnx"
        if onnx_pair.is_pair(source):  # an encoder-decoder: each graph alike, without calibration data
            output = output.with_suffix(".zip")
            details = onnx_pair.map_graphs(source, output, lambda graph, new: quantize.quantize_onnx(
                graph, new, **options, calibration_method=step.calibration_method, calibration=None))
            state.module, state.onnx_path = None, output
            return details
        details = quantize.quantize_onnx(source, output, **options, calibration_method=step.calibration_method,
                                         calibration=run.data.calibration, smoothing=step.smoothing,
                                         algorithm=step.algorithm)
        state.module, state.onnx_path = None, output
        return details
    state.module, details = quantize.quantize_module(state.module, **options)
    return details
