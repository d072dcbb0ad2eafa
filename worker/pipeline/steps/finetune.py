"""`finetune`: train on the labels, keeping pruning masks; optionally quantization-aware for the quantize step
that follows."""

from app.core.errors import ErrorCode
from app.core.recipe import FinetuneStep, QuantizeStep
from worker.compression import train
from worker.errors import JobFailure
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel
from worker.pipeline.steps.training import training_options


def apply(run: JobRun, state: WorkingModel, step: FinetuneStep, place: StepPlace) -> dict:
    if state.module is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "finetune needs the model in PyTorch form")
    bits = None
    if step.quantization_aware:
        following = next((s for s in place.recipe.steps[place.index + 1:] if isinstance(s, QuantizeStep)), None)
        bits = 4 if following is not None and following.dtype == "int4" else 8
    config = train.TrainConfig(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size, fake_quant_bits=bits)
    result = train.finetune(state.module, run.data.train, run.data.val, config, masks=state.masks or None,
                            **training_options(run, step, place))
    return {"epochs": result.history, "best_epoch": result.best_epoch, "stopped": result.stopped,
            "masks_kept": len(state.masks), "quantization_aware_bits": bits}
