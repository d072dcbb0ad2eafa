"""`distill`: train a student (derived from the teacher, or uploaded) to match the model as the earlier steps
left it; the student then replaces the model. With `student.current` it is recovery instead: the model as the
earlier steps left it (pruning masks kept) learns to match the original upload again."""

import copy

import numpy as np

from app.core.errors import ErrorCode
from app.core.recipe import DistillStep, encoder_defaults_left_out
from worker.compression import prune, students, train
from worker.compression.modules import count_weights
from worker.errors import JobFailure
from worker.formats import load
from worker.formats.loaded import hf_model_of
from worker.pipeline.job_run import JobRun, StepPlace, WorkingModel
from worker.pipeline.steps.training import training_options

HOLDOUT_FRACTION = 0.1  # of the train samples, held out for early stopping
HOLDOUT_SEED = 0  # which samples are held out: the same on every run


def _student(run: JobRun, teacher, step: DistillStep, train_data: train.TrainData):
    if step.student.shrink is not None:
        hf = None
        if hf_model_of(teacher) is not None:
            hf = copy.copy(run.loaded.hf)
            hf.model, hf.module = hf_model_of(teacher), teacher
        return students.shrink_student(teacher, step.student.shrink.depth, step.student.shrink.width, hf=hf,
                                       samples=train_data.inputs, mask_input=run.attention_mask_input)
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


def _layer_pairs(student, teacher, chosen: list[int] | None) -> list:
    """The two models' matching transformer layers (see students.matching_layers); [] for other models.
    `chosen`: the teacher layers a derived student was made of."""
    student_hf, teacher_hf = hf_model_of(student), hf_model_of(teacher)
    if student_hf is None or teacher_hf is None:
        return []
    return students.matching_layers(student_hf, teacher_hf, chosen)


def with_encoder_defaults(run: JobRun, step: DistillStep) -> tuple[DistillStep, dict]:
    """The step with the encoder defaults for the fields it leaves out, for Hugging Face models trained on
    unlabelled data; (the step as given, {}) otherwise. Submissions through the API arrive resolved already
    (app.core.recipe.with_encoder_defaults); jobs written otherwise, and tune trials, are resolved here."""
    if run.loaded.hf is None or run.data.train is None or run.data.train.labels is not None:
        return step, {}
    defaults = encoder_defaults_left_out(step)
    return step.model_copy(update=defaults), defaults


def _held_out(data: train.TrainData, seed: int = HOLDOUT_SEED) -> tuple[train.TrainData, train.TrainData]:
    """(train, held-out) split of the train samples: HOLDOUT_FRACTION of them (at least one), drawn at random."""
    samples = len(data.inputs[0])
    if samples < 2:
        raise JobFailure(ErrorCode.INVALID_DATASET, "early_stopping holds out a tenth of the train samples: the train "
                                                    f"dataset needs at least 2 samples, it has {samples}")
    order = np.random.default_rng(seed).permutation(samples)
    count = max(1, round(samples * HOLDOUT_FRACTION))

    def pick(index: np.ndarray) -> train.TrainData:
        return train.TrainData([a[index] for a in data.inputs], None if data.labels is None else data.labels[index])

    return pick(np.sort(order[count:])), pick(np.sort(order[:count]))


def apply(run: JobRun, state: WorkingModel, step: DistillStep, place: StepPlace) -> dict:
    if state.module is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "distill needs the teacher in PyTorch form")
    step, defaults = with_encoder_defaults(run, step)
    options = training_options(run, step, place)
    train_data, val_data = run.data.train, run.data.val
    if step.early_stopping is not None:
        train_data, val_data = _held_out(train_data)
    if step.student.current:
        teacher, student, masks = _original(run), state.module, state.masks
        details = {"student": "current", "masks_kept": len(masks)}
    else:
        teacher, masks = state.module, {}
        student, details = _student(run, teacher, step, train_data)
    if run.device == "cuda":
        student.to("cuda")
    chosen = details.get("layers", {}).get("chosen")
    layers = _layer_pairs(student, teacher, chosen) if step.layer_weight else []
    if step.layer_weight:
        details["layer_transfer"] = {"weight": step.layer_weight, "layers": len(layers)} if layers else {
            "weight": step.layer_weight, "layers": 0,
            "note": "layer transfer needs Hugging Face student and teacher with the same number of layers, or a "
                    "student made of the teacher's layers (shrink)"}
    config = train.TrainConfig(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size,
                               temperature=step.temperature, alpha=step.alpha, hidden_weight=step.hidden_weight,
                               layer_weight=step.layer_weight or 0.0, attention_mask_input=run.attention_mask_input,
                               dropout=step.dropout is not False, lr_schedule=step.lr_schedule,
                               patience=step.early_stopping)
    result = train.distill(teacher, student, train_data, val_data, config, masks=masks or None, layers=layers,
                           **options)
    state.module, state.masks = student, masks
    if step.student.current:
        details["per_layer"] = prune.layer_sparsity(student)  # the pruned weights are still zero
    if defaults:
        details["encoder_defaults"] = defaults
    if step.early_stopping is not None:
        details["early_stopping"] = {"patience": step.early_stopping, "train_samples": len(train_data.inputs[0]),
                                     "held_out_samples": len(val_data.inputs[0]),
                                     "stopped_epoch": len(result.history)}
    teacher_params, student_params = count_weights(teacher)[0], count_weights(student)[0]
    return {**details, "teacher_params": teacher_params, "student_params": student_params,
            "epochs": result.history, "best_epoch": result.best_epoch, "stopped": result.stopped}
