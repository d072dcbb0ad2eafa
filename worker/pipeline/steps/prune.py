"""`prune`: unstructured (magnitude, threshold, activation-aware, SparseGPT, 2:4) on torch modules or ONNX files, and
structured pruning that removes channels or FFN neurons from torch modules."""

import torch

from app.core.errors import ErrorCode
from app.core.recipe import PruneStep
from worker.compression import prune, structured
from worker.errors import JobFailure
from worker.formats.loaded import hf_model_of
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel


def apply(run: JobRun, state: WorkingModel, step: PruneStep, place: StepPlace) -> dict:
    options = {"sparsity": step.sparsity, "scope": step.scope, "exclude": step.exclude}
    if state.module is None:
        if step.embeddings:
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "prune: embeddings needs the model in PyTorch form (a "
                                                               ".pt2 or Hugging Face upload); ONNX graphs are pruned "
                                                               "at their MatMul, Gemm and Conv weights only")
        output = place.workdir / f"step{place.index}-prune.onnx"
        details = prune.prune_onnx(state.onnx_path, output, method=step.method, threshold=step.threshold,
                                   pattern=step.pattern, **options)
        state.onnx_path = output
        details["per_layer"] = prune.onnx_layer_sparsity(output)
        return details
    if step.method == "structured":
        if hf_model_of(state.module) is not None:
            details = structured.prune_transformer_ffn(hf_model_of(state.module), **options)
        elif isinstance(state.module, torch.fx.GraphModule):
            details = structured.prune_graph_channels(state.module, **options)
        else:
            raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, "structured pruning is not supported for this model")
        state.masks = {}  # shapes changed: earlier masks no longer apply
    else:
        calibration = [run.torch_args(b) for b in run.data.calibration] if run.data.calibration else None
        masks, details = prune.prune_unstructured(state.module, method=step.method, threshold=step.threshold,
                                                  pattern=step.pattern, calibration=calibration, check=run.ctx.check,
                                                  embeddings=step.embeddings, token_mask=run.attention_mask_input,
                                                  **options)
        state.masks.update(masks)
    details["per_layer"] = prune.layer_sparsity(state.module)
    return details
