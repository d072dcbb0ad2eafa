"""`distill`: train a student (derived from the teacher, or uploaded) to match the model as the earlier steps
left it; the student then replaces the model. With `student.current` it is recovery instead: the model as the
earlier steps left it (pruning masks kept) learns to match the original upload again."""

import copy

from app.core.errors import ErrorCode
from app.core.recipe import DistillStep
from worker.compression import prune, students, train
from worker.compression.modules import count_weights
from worker.errors import JobFailure
from worker.formats import load
from worker.formats.loaded import hf_model_of
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel
from worker.pipeline.steps.training import training_options


def _student(run: JobRun, teacher, step: DistillStep):
    if step.student.shrink is not None:
        hf = None
        if hf_model_of(teacher) is not None:
            hf = copy.copy(run.loaded.hf)
            hf.model, hf.module = hf_model_of(teacher), teacher
        return students.shrink_student(teacher, step.student.shrink.depth, step.student.shrink.width, hf=hf)
    student_id = step.student.model_id
    path, fmt = run.staged.student_files[student_id]
    other = load(path, fmt, run.workdir / f"student-{student_id}", run.unpack_limit)
    if [(i["name"], i["dtype"]) for i in other.inputs] != [(i["name"], i["dtype"]) for i in run.loaded.inputs]:
        raise JobFailure(ErrorCode.INVALID_RECIPE, "student.model_id: the student's inputs "
                                                   f"{[i['name'] for i in other.inputs]} differ from the teacher's "
                                                   f"{[i['name'] for i in run.loaded.inputs]}")
    return other.module, {"student": student_id}


def _original(run: JobRun):
    """The upload as it came, loaded afresh: the steps before changed the job's own copy in place."""
    original = load(run.staged.model_path, run.staged.model_format, run.workdir / "teacher", run.unpack_limit).module
    if original is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "student.current needs the upload in PyTorch form")
    return original.to(run.device)


def _attention_mask_input(run: JobRun) -> int | None:
    names = [spec["name"] for spec in run.loaded.inputs]
    return names.index("attention_mask") if run.loaded.hf is not None and "attention_mask" in names else None


def apply(run: JobRun, state: WorkingModel, step: DistillStep, place: StepPlace) -> dict:
    if state.module is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "distill needs the teacher in PyTorch form")
    if step.student.current:
        teacher, student, masks = _original(run), state.module, state.masks
        details = {"student": "current", "masks_kept": len(masks)}
    else:
        teacher, masks = state.module, {}
        student, details = _student(run, teacher, step)
    if run.device == "cuda":
        student.to("cuda")
    config = train.TrainConfig(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size,
                               temperature=step.temperature, alpha=step.alpha, hidden_weight=step.hidden_weight,
                               attention_mask_input=_attention_mask_input(run))
    result = train.distill(teacher, student, run.data.train, run.data.val, config, masks=masks or None,
                           **training_options(run, step, place))
    state.module, state.masks = student, masks
    if step.student.current:
        details["per_layer"] = prune.layer_sparsity(student)  # the pruned weights are still zero
    teacher_params, student_params = count_weights(teacher)[0], count_weights(student)[0]
    return {**details, "teacher_params": teacher_params, "student_params": student_params,
            "epochs": result.history, "best_epoch": result.best_epoch, "stopped": result.stopped}
