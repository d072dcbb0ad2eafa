"""`quantize`: ONNX Runtime's quantizers for the onnxruntime target (the model becomes an ONNX file), quantized
torch layers for the pytorch target. ONNX graphs are normalized first (worker.compression.normalize); method
`auto` picks int8 by model family and measurement (worker.compression.int8_auto)."""

from app.core.recipe import QuantizeStep
from worker.compression import int8_auto, normalize, quantize
from worker.formats import onnx_pair
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel


def apply(run: JobRun, state: WorkingModel, step: QuantizeStep, place: StepPlace) -> dict:
    options = {"method": step.method, "dtype": step.dtype, "granularity": step.granularity,
               "group_size": step.group_size, "exclude": step.exclude}
    if run.runtime == "onnxruntime":
        exported = run.onnx_form(state, place.workdir / f"step{place.index}-input.onnx")
        output = place.workdir / f"step{place.index}-quantize.onnx"
        if onnx_pair.is_pair(exported):  # an encoder-decoder: each graph alike, without calibration data
            output = output.with_suffix(".zip")
            # The job's batches feed neither graph alone, so `auto` cannot measure here: dynamic, as for any
            # transformer.
            pair_options = {**options, "method": "dynamic" if step.method == "auto" else step.method}
            details = onnx_pair.map_graphs(exported, output, lambda graph, new: quantize.quantize_onnx(
                graph, new, **pair_options, calibration_method=step.calibration_method, calibration=None))
            state.module, state.onnx_path = None, output
            return details
        source, normalization = normalize.normalize(exported, place.workdir / f"step{place.index}-normalized.onnx",
                                                    run.data.eval_batches)
        if step.method == "auto":
            details = int8_auto.auto_int8(
                source, output, granularity=step.granularity, exclude=step.exclude,
                calibration_method=step.calibration_method, calibration=run.data.calibration,
                eval_batches=run.data.eval_batches, eval_masks=run.eval_masks,
                eval_pooling=run.eval_pooling,
                eval_inputs=run.data.description.get("inputs", "generated"),
                threads=run.settings.eval_threads, warmup=run.settings.latency_warmup,
                runs=run.settings.latency_runs, check=run.ctx.check)
        else:
            details = quantize.quantize_onnx(source, output, **options, calibration_method=step.calibration_method,
                                             calibration=run.data.calibration, smoothing=step.smoothing,
                                             algorithm=step.algorithm)
        details["normalization"] = normalization
        state.module, state.onnx_path = None, output
        return details
    if step.method == "auto":  # the pytorch target has one int8 method
        state.module, details = quantize.quantize_module(state.module, **{**options, "method": "dynamic"})
        return {**details, "method": "auto", "chosen_method": "dynamic",
                "reason": "target.runtime 'pytorch' quantizes int8 dynamically"}
    state.module, details = quantize.quantize_module(state.module, **options)
    return details
