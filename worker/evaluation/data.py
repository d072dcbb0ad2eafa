"""The inputs a job measures and calibrates on: from the user's datasets, or generated when none is given."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import ErrorCode
from app.core.input_specs import InputSpec
from worker.compression.train import TrainData
from worker.dataset_arrays import DatasetArrays, batches, check_labels, load_arrays, match_inputs, tokenize_texts
from worker.errors import JobFailure
from worker.evaluation.inputs import generate_feeds, plan
from worker.formats.suggestions import OTHER_DIM, suggest

GENERATED_BATCHES = 8
GENERATED_SEED = 0  # generated inputs are the same on every run (the report's provenance names it)
DYNAMIC_BATCH = 16
MAX_EVAL_SAMPLES = 512
MAX_CALIBRATION_SAMPLES = 256
MAX_TRAIN_SAMPLES = 200_000
TEXT_MAX_LENGTH = 128


@dataclass
class JobData:
    eval_batches: list[list[np.ndarray]]
    eval_labels: list[np.ndarray] | None
    calibration: list[list[np.ndarray]] | None
    train: TrainData | None = None
    val: TrainData | None = None
    description: dict[str, Any] = field(default_factory=dict)
    eval_texts: bool = False  # the eval batches are tokenized texts (a .jsonl eval dataset)


@dataclass
class Layout:
    """Where each model input comes from: a dataset array (samples on axis 0 in the file, batched along the
    input's batch axis) or a constant from the job's input specs."""

    inputs: list[dict[str, Any]]
    constants: dict[str, np.ndarray]
    batch_axes: dict[str, int]

    @property
    def data_inputs(self) -> list[dict[str, Any]]:
        return [entry for entry in self.inputs if entry["name"] not in self.constants]

    @property
    def plain(self) -> bool:
        """Every input from the data, batch first: what training steps take."""
        return not self.constants and not any(self.batch_axes.values())

    def feeds(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """A batch in model order from the data inputs' arrays (batch on axis 0), constants put in."""
        given = iter(arrays)
        feeds = []
        for entry in self.inputs:
            name = entry["name"]
            if name in self.constants:
                feeds.append(self.constants[name])
                continue
            array, axis = next(given), self.batch_axes.get(name, 0)
            feeds.append(array if axis == 0 else np.ascontiguousarray(np.moveaxis(array, 0, axis)))
        return feeds


def layout(inputs: list[dict[str, Any]], specs: dict[str, InputSpec]) -> Layout:
    constants = {item.name: item.constant for item in plan(inputs, specs) if item.constant is not None}
    return Layout(inputs=inputs, constants=constants,
                  batch_axes={name: spec.batch_axis for name, spec in specs.items() if not spec.is_constant})


def batch_size(inputs: list[dict[str, Any]], specs: dict[str, InputSpec] | None = None) -> tuple[int, bool]:
    """(batch size, whether the model fixes it), read at the first data input's batch axis: a fixed dim, else the
    spec's concrete dim, else DYNAMIC_BATCH."""
    specs = specs or {}
    for entry in inputs:
        spec = specs.get(entry["name"])
        if spec is not None and spec.is_constant:
            continue
        axis = spec.batch_axis if spec is not None else 0
        if axis >= len(entry["shape"]):
            continue
        declared = entry["shape"][axis]
        if isinstance(declared, int) and declared >= 1:
            return declared, True
        if spec is not None and spec.shape is not None and spec.shape[axis] >= 1:
            return spec.shape[axis], False
        return DYNAMIC_BATCH, False
    return DYNAMIC_BATCH, False


def _arrays(path: Path, fmt: str, loaded, role: str, limit: int) -> DatasetArrays:
    """The first `limit` samples of a dataset file (only those are read), tokenized for a text dataset."""
    data = load_arrays(path, fmt, limit)
    if data.texts is not None:
        tokenizer = getattr(loaded.hf, "tokenizer", None)
        if tokenizer is None:
            raise JobFailure(ErrorCode.INVALID_DATASET,
                             f"{role} dataset: a .jsonl text dataset needs a Hugging Face model "
                             "that ships its tokenizer")
        names = [i["name"] for i in loaded.inputs]
        arrays = tokenize_texts(data.texts, tokenizer, names, TEXT_MAX_LENGTH)
        if "decoder_input_ids" in names:  # an encoder-decoder: the decoder reads the text shifted right
            arrays["decoder_input_ids"] = loaded.hf.decoder_inputs(arrays["input_ids"])
        data = DatasetArrays(inputs=arrays, labels=data.labels)
    return data


def _data_inputs(places: Layout, role: str) -> list[dict[str, Any]]:
    if not places.data_inputs:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"{role} dataset: every model input is a constant in "
                                                    "input_specs, so the dataset has nothing to give")
    return places.data_inputs


def prepare(loaded, files: dict[str, tuple[Path, str]], specs: dict[str, InputSpec] | None = None) -> JobData:
    """`files` maps a role (eval, calibration, train) to (local path, dataset format); `specs` are the job's
    input specs (app.core.input_specs), honoured by generated inputs and datasets alike."""
    specs = specs or {}
    size, static = batch_size(loaded.inputs, specs)
    places = layout(loaded.inputs, specs)
    description: dict[str, Any] = {}
    val = None
    eval_texts = False
    # Real inputs judge a model better than generated ones do: without an eval dataset, the calibration dataset's
    # inputs are measured (bench/peer_bench.py: all-MiniLM-L6-v2's smoothed int8 read cosine 0.89 on random token
    # ids, 0.998 on real sentences, and the fidelity floor failed it).
    role = "eval" if "eval" in files else "calibration" if "calibration" in files else None
    if role is not None:
        eval_texts = files[role][1] == "jsonl"
        data = _arrays(*files[role], loaded, role, MAX_EVAL_SAMPLES)
        if role == "eval":
            check_labels(data.labels, loaded.outputs, "eval")
        else:
            data = DatasetArrays(inputs=data.inputs, labels=None)
        arrays = match_inputs(data, _data_inputs(places, role), role, places.batch_axes)
        val = TrainData(inputs=arrays, labels=data.labels) if places.plain and role == "eval" else None
        split = batches(arrays, size, data.labels, static=static, role=role)
        eval_batches = [places.feeds(feeds) for feeds, _ in split.batches]
        labels = [lab for _, lab in split.batches] if data.labels is not None else None
        description.update(inputs=f"{role} dataset", samples=sum(len(feeds[0]) for feeds, _ in split.batches),
                           dropped_samples=split.dropped, has_labels=labels is not None)
        if role == "calibration":
            description["note"] = ("no eval dataset given: fidelity is measured on the calibration dataset's inputs "
                                   "(real data, though calibration saw it); no accuracy")
        if eval_texts and any(spec["name"] == "decoder_input_ids" for spec in loaded.inputs):
            description["decoder_inputs"] = "the input text shifted right behind decoder_start_token_id"
    else:
        eval_batches, labels = generate_feeds(loaded.inputs, batches=GENERATED_BATCHES, seed=GENERATED_SEED,
                                              specs=specs), None
        description.update(inputs="generated", batches=GENERATED_BATCHES, seed=GENERATED_SEED,
                           generated=[item.describe() for item in plan(loaded.inputs, specs)],
                           note="no eval dataset given: fidelity is measured on seeded random inputs of the "
                                "model's input shapes, against the original model's own outputs; no accuracy")
    description["input_shapes"] = [list(a.shape) for a in eval_batches[0]]
    if specs:
        description["input_specs"] = sorted(specs)
    calibration = None
    if "calibration" in files:
        data = _arrays(*files["calibration"], loaded, "calibration", MAX_CALIBRATION_SAMPLES)
        arrays = match_inputs(data, _data_inputs(places, "calibration"), "calibration", places.batch_axes)
        split = batches(arrays, size, static=static, role="calibration")
        calibration = [places.feeds(feeds) for feeds, _ in split.batches]
        description["calibration_samples"] = sum(len(feeds[0]) for feeds, _ in split.batches)
    train = None
    if "train" in files:
        if not places.plain:
            raise JobFailure(ErrorCode.INVALID_REQUEST,
                             "training steps feed a dataset's samples to the model as they are: they cannot take "
                             "input_specs with a constant value or a batch_axis other than 0")
        data = _arrays(*files["train"], loaded, "train", MAX_TRAIN_SAMPLES)
        check_labels(data.labels, loaded.outputs, "train")
        train = TrainData(inputs=match_inputs(data, loaded.inputs, "train"), labels=data.labels)
        description["train_samples"] = len(train.inputs[0])
    return JobData(eval_batches=eval_batches, eval_labels=labels, calibration=calibration, train=train, val=val,
                   description=description, eval_texts=eval_texts)


def inputs_do_not_run(loaded, data: JobData, specs: dict[str, InputSpec]) -> JobFailure:
    """The job's failure when the original model raises on its own evaluation inputs: which inputs were made
    up and how, and what to give in `input_specs` (the runtime's own message names server paths and nodes)."""
    shapes = ", ".join(f"{entry['name']} {list(array.shape)} {array.dtype}"
                       for entry, array in zip(loaded.inputs, data.eval_batches[0]))
    if data.description.get("inputs") != "generated":
        return JobFailure(ErrorCode.INVALID_DATASET,
                          f"the model does not run on the {data.description['inputs']}'s batches ({shapes}); check "
                          "that the arrays hold what the model takes, and give input_specs: batch_axis for an input "
                          "whose batch is not its first axis, a constant value for an input that is a setting")
    made_up = [item for item in plan(loaded.inputs, specs)
               if item.spec is None or (item.spec.shape is None and not item.spec.is_constant)]
    if not made_up:
        named = "; ".join(item.describe() for item in plan(loaded.inputs, specs))
        return JobFailure(ErrorCode.INPUT_SPEC_NEEDED,
                          f"the model does not run on the inputs made from its input_specs ({named}); check the "
                          "shapes, ranges, batch axes and constant values given there, or give an eval dataset")
    suspects = made_up
    named = "; ".join(item.describe() for item in suspects)
    proposal = {name: spec for name, spec in suggest(loaded.inputs, loaded.info.get("dim_ranges"))[0].items()
                if name in {item.name for item in suspects}}
    start = (f"; a starting point, read from the declared inputs (lengths it cannot tell are {OTHER_DIM}): "
             f"{json.dumps(proposal)}") if proposal else ""
    return JobFailure(ErrorCode.INPUT_SPEC_NEEDED,
                      f"the model does not run on the generated inputs ({named}); give input_specs for "
                      f"{', '.join(repr(item.name) for item in suspects)}: a concrete shape (e.g. a longer signal "
                      "or a larger image), a range for the values, a batch_axis, or a constant value for an input "
                      f"that is a setting such as a sample rate; or give an eval dataset{start}")


def accuracy(outputs: list[list[np.ndarray]], labels: list[np.ndarray] | None) -> float | None:
    """Top-1 accuracy of the first output ([batch, classes]) against integer labels."""
    if labels is None or outputs[0][0].ndim != 2:
        return None
    correct = sum(int((np.argmax(out[0], axis=1) == lab).sum()) for out, lab in zip(outputs, labels))
    return round(correct / max(sum(len(lab) for lab in labels), 1), 6)


def perplexity(outputs: list[list[np.ndarray]], batches: list[list[np.ndarray]],
               input_names: list[str]) -> float | None:
    """exp(mean next-token cross-entropy) of a causal LM over its eval texts: the logits at position t (the
    first output, [batch, sequence, vocab]) score token t + 1, counted where both are real tokens (attention
    mask 1; every token when the model takes no mask). Lower is better."""
    ids_at = input_names.index("input_ids")
    mask_at = input_names.index("attention_mask") if "attention_mask" in input_names else None
    total, count = 0.0, 0
    for batch_outputs, feeds in zip(outputs, batches, strict=True):
        ids = feeds[ids_at]
        mask = feeds[mask_at] > 0 if mask_at is not None else np.ones(ids.shape, dtype=bool)
        real = mask[:, 1:] & mask[:, :-1]
        for logits, targets, counted in zip(batch_outputs[0], ids[:, 1:], real):  # one text at a time: V can be big
            scores = logits[:-1].astype(np.float64)
            peak = scores.max(axis=-1, keepdims=True)
            log_norm = peak[:, 0] + np.log(np.exp(scores - peak).sum(axis=-1))
            picked = scores[np.arange(len(targets)), targets]
            total += float((log_norm - picked)[counted].sum())
            count += int(counted.sum())
    return round(float(np.exp(total / count)), 6) if count else None
