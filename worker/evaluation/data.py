"""The inputs a job measures and calibrates on: from the user's datasets, or generated when none is given."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import ErrorCode
from worker.compression.train import TrainData
from worker.dataset_arrays import DatasetArrays, batches, check_labels, load_arrays, match_inputs, tokenize_texts
from worker.errors import JobFailure
from worker.evaluation.inputs import generate_feeds

GENERATED_BATCHES = 8
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


def batch_size(inputs: list[dict[str, Any]]) -> tuple[int, bool]:
    first = inputs[0]["shape"][0] if inputs and inputs[0]["shape"] else None
    return (first, True) if isinstance(first, int) else (DYNAMIC_BATCH, False)


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


def prepare(loaded, files: dict[str, tuple[Path, str]]) -> JobData:
    """`files` maps a role (eval, calibration, train) to (local path, dataset format)."""
    size, static = batch_size(loaded.inputs)
    description: dict[str, Any] = {}
    val = None
    eval_texts = False
    if "eval" in files:
        eval_texts = files["eval"][1] == "jsonl"
        data = _arrays(*files["eval"], loaded, "eval", MAX_EVAL_SAMPLES)
        check_labels(data.labels, loaded.outputs, "eval")
        arrays = match_inputs(data, loaded.inputs, "eval")
        val = TrainData(inputs=arrays, labels=data.labels)
        split = batches(arrays, size, data.labels, static=static, role="eval")
        eval_batches = [feeds for feeds, _ in split.batches]
        labels = [lab for _, lab in split.batches] if data.labels is not None else None
        description.update(inputs="eval dataset", samples=sum(b[0].shape[0] for b in eval_batches),
                           dropped_samples=split.dropped, has_labels=labels is not None)
        if eval_texts and any(spec["name"] == "decoder_input_ids" for spec in loaded.inputs):
            description["decoder_inputs"] = "the input text shifted right behind decoder_start_token_id"
    else:
        eval_batches, labels = generate_feeds(loaded.inputs, batches=GENERATED_BATCHES, seed=0), None
        description.update(inputs="generated", batches=GENERATED_BATCHES, seed=0,
                           note="no eval dataset given: fidelity is measured on seeded random inputs of the "
                                "model's input shapes, against the original model's own outputs; no accuracy")
    description["input_shapes"] = [list(a.shape) for a in eval_batches[0]]
    calibration = None
    if "calibration" in files:
        data = _arrays(*files["calibration"], loaded, "calibration", MAX_CALIBRATION_SAMPLES)
        split = batches(match_inputs(data, loaded.inputs, "calibration"), size, static=static, role="calibration")
        calibration = [feeds for feeds, _ in split.batches]
        description["calibration_samples"] = sum(b[0].shape[0] for b in calibration)
    train = None
    if "train" in files:
        data = _arrays(*files["train"], loaded, "train", MAX_TRAIN_SAMPLES)
        check_labels(data.labels, loaded.outputs, "train")
        train = TrainData(inputs=match_inputs(data, loaded.inputs, "train"), labels=data.labels)
        description["train_samples"] = len(train.inputs[0])
    return JobData(eval_batches=eval_batches, eval_labels=labels, calibration=calibration, train=train, val=val,
                   description=description, eval_texts=eval_texts)


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
