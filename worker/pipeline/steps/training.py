"""What distill and finetune share: the train data check, the batch size, per-epoch progress and the limits."""

from typing import Any

from app.core.errors import ErrorCode
from worker.errors import JobFailure
from worker.evaluation import data as job_data
from worker.pipeline.job_run import JobRun, StepPlace


def training_options(run: JobRun, step, place: StepPlace) -> dict[str, Any]:
    """Keyword arguments of train.distill and train.finetune: device, fixed batch size, progress, limits."""
    if run.data.train is None:
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"{step.op} needs a train dataset")
    size, static = job_data.batch_size(run.loaded.inputs)

    def on_epoch(epoch: int, record: dict) -> None:
        loss = record.get("train_loss")
        val = f", val loss {record['val_loss']:.4f}" if record.get("val_loss") is not None else ""
        run.ctx.progress(place.fraction, step.op, f"{step.op} epoch {epoch}/{step.epochs}: train loss {loss:.4f}{val}",
                         step_index=place.index, epoch=epoch, trial=place.trial)

    return {"device": run.device, "static_batch": size if static else None, "on_epoch": on_epoch,
            "check": run.ctx.check, "deadline": run.deadline}
