"""Datasets in the worker: loaded as numpy arrays, matched to a model's inputs, batched, or tokenized.

The file is checked again with the upload's rules (storage is not the API's to vouch for), then its values,
which the API never read: float arrays must be finite and labels non-negative.
"""

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors

from app.core import dataset_fit
from app.core.errors import ErrorCode
from app.core.vetting.dataset_files import LABELS, UTF8_BOM, DatasetError, inspect_dataset
from worker.errors import JobFailure

# An array stored column-major must be read whole to take its first rows: only up to this size.
MAX_FORTRAN_BYTES = 256 * 1024 * 1024


@dataclass
class DatasetArrays:
    inputs: dict[str, np.ndarray]  # in file order
    labels: np.ndarray | None = None
    texts: list[str] | None = None  # jsonl datasets: the texts, to be tokenized


@dataclass
class Batched:
    batches: list[tuple[list[np.ndarray], np.ndarray | None]]
    dropped: int  # samples left out because a static batch size cannot take a partial final batch


def load_arrays(path: Path, fmt: str, limit: int | None = None) -> DatasetArrays:
    """The dataset's first `limit` samples (all without a limit): only those rows are read and decompressed,
    whatever size the file declares, and a .jsonl stops at its `limit`-th record."""
    try:
        facts = inspect_dataset(path, path.name)
    except DatasetError as exc:
        raise JobFailure(ErrorCode.INVALID_DATASET, exc.message) from None
    if facts.format != fmt:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"the dataset file holds {facts.format}, but was recorded as {fmt}")
    if fmt == "jsonl":
        return _load_jsonl(path, limit)
    arrays = _read_arrays(path, fmt, list(facts.info["arrays"]), limit)
    labels = arrays.pop(LABELS, None)
    for name, array in arrays.items():
        _check_finite(name, array)
    if labels is not None and labels.min() < 0:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"array {LABELS!r} has a negative class id at sample "
                                                    f"{int(np.argmax(labels < 0))}")
    return DatasetArrays(inputs=arrays, labels=labels)


def _read_arrays(path: Path, fmt: str, order: list[str], limit: int | None) -> dict[str, np.ndarray]:
    try:
        if fmt == "npz":
            with zipfile.ZipFile(path) as archive:
                return {name: _read_npy_rows(archive, f"{name}.npy", limit) for name in order}
        with safetensors.safe_open(str(path), framework="numpy") as tensors:
            return {name: _safetensors_rows(tensors, name, limit) for name in order}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, safetensors.SafetensorError) as exc:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"could not read the {fmt} dataset: {exc}") from None


def _safetensors_rows(tensors, name: str, limit: int | None) -> np.ndarray:
    """The first `limit` rows of a tensor (safetensors refuses a slice that runs past the end)."""
    if limit is None:
        return tensors.get_tensor(name)
    rows = tensors.get_slice(name)
    return rows[:min(limit, rows.get_shape()[0])]


def _read_npy_rows(archive: zipfile.ZipFile, member: str, limit: int | None) -> np.ndarray:
    """The first `limit` rows of an .npy member, read (and inflated) alone: rows of a C-order array are
    contiguous, so a member that declares gigabytes costs only the rows a job uses."""
    name = member.removesuffix(".npy")
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        rows = shape[0] if limit is None else min(shape[0], limit)
        if fortran_order:
            total = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if total > MAX_FORTRAN_BYTES:
                raise JobFailure(ErrorCode.INVALID_DATASET,
                                 f"array {name!r} is stored in Fortran order and is {total} bytes; save it in C "
                                 "order (np.ascontiguousarray) so that only the rows a job needs are read")
            data = stream.read(total)
            return np.frombuffer(data, dtype=dtype).reshape(shape, order="F")[:rows].copy()
        wanted = rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        data = stream.read(wanted)
    if len(data) != wanted:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"array {name!r} is shorter than its header says")
    return np.frombuffer(data, dtype=dtype).reshape((rows, *shape[1:])).copy()


def _load_jsonl(path: Path, limit: int | None) -> DatasetArrays:
    """Lines were validated by inspect_dataset; read them the same way (bytes, split on newlines only)."""
    texts: list[str] = []
    labels: list[int] = []
    with open(path, "rb") as file:
        if file.read(len(UTF8_BOM)) != UTF8_BOM:
            file.seek(0)
        for line in file:
            if limit is not None and len(texts) >= limit:
                break
            if line.strip():
                record = json.loads(line.decode("utf-8"))
                texts.append(record["text"])
                if "label" in record:
                    labels.append(record["label"])
    return DatasetArrays(inputs={}, labels=np.array(labels, dtype=np.int64) if labels else None, texts=texts)


def _check_finite(name: str, array: np.ndarray) -> None:
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
    if not finite.all():
        index = int(np.argmin(finite))
        what = "NaN" if np.isnan(array[index]).any() else "inf"
        raise JobFailure(ErrorCode.INVALID_DATASET, f"array {name!r} has {what} values, first at sample {index}; "
                                                    "datasets must hold finite values")


def check_labels(labels: np.ndarray | None, model_outputs: list[dict[str, Any]], role: str) -> None:
    """Class ids must index the model's first output when it is [batch, classes]: a larger id would count as
    silently wrong in accuracy and break the loss in training, so the job fails naming it instead."""
    if labels is None or len(labels) == 0 or not model_outputs:
        return
    shape = model_outputs[0]["shape"]
    if len(shape) != 2 or not isinstance(shape[1], int):
        return
    classes = shape[1]
    if int(labels.max()) >= classes:
        index = int(np.argmax(labels >= classes))
        raise JobFailure(ErrorCode.INVALID_DATASET,
                         f"{role} dataset: label {int(labels[index])} at sample {index} is out "
                         f"of range: the model's first output has {classes} classes (labels "
                         f"0..{classes - 1})")


def match_inputs(data: DatasetArrays, model_inputs: list[dict[str, Any]], role: str,
                 batch_axes: dict[str, int] | None = None) -> list[np.ndarray]:
    """One array per model input, in model order, cast to the input's dtype; samples on axis 0.

    Paired and judged by shape and dtype as a dry run judges the upload's headers (app.core.dataset_fit); then
    the values are checked as they are cast.
    """
    prefix = f"{role} dataset"
    if not data.inputs:
        raise JobFailure(ErrorCode.INVALID_DATASET,
                         f"{prefix} holds texts (jsonl); the model's inputs need a tokenizer "
                         "to be made from them")
    try:
        pairs = dataset_fit.check_fit({name: (array.shape, array.dtype.name) for name, array in data.inputs.items()},
                                      model_inputs, role, batch_axes)
    except dataset_fit.Misfit as exc:
        raise JobFailure(ErrorCode.INVALID_DATASET, str(exc)) from None
    return [_cast(data.inputs[name], spec, name, prefix) for name, spec in pairs]


def _cast(array: np.ndarray, spec: dict[str, Any], name: str, prefix: str) -> np.ndarray:
    """Casts that keep every value (float data never reaches here for an integer or bool input)."""
    try:
        target = np.dtype(spec["dtype"])
    except TypeError:
        target = None
    if target is None or target.kind not in "biuf":
        raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, f"{prefix}: model input {spec['name']!r} takes {spec['dtype']}, "
                                                      "which a dataset cannot feed")
    if target.kind in "iu" and array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < np.iinfo(target).min or high > np.iinfo(target).max:
            raise JobFailure(ErrorCode.INVALID_DATASET, f"{prefix}: array {name!r} has values from {low} to {high}, "
                                                        f"outside the {target} range of model input {spec['name']!r}")
    if target.kind == "b" and array.dtype.kind in "iu" and not np.isin(array, (0, 1)).all():
        raise JobFailure(ErrorCode.INVALID_DATASET, f"{prefix}: array {name!r} must hold only 0 and 1 to feed bool "
                                                    f"model input {spec['name']!r}")
    return np.ascontiguousarray(array.astype(target, copy=False))


def batches(arrays: list[np.ndarray], batch_size: int, labels: np.ndarray | None = None, *,
            static: bool = False, role: str | None = None) -> Batched:
    """Split along axis 0.

    With a static batch size (`static=True`) the final partial batch is dropped rather than padded with
    repeated samples, which would count those samples twice in every metric; `dropped` says how many.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(arrays[0])
    if static and total < batch_size:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"{role + ' dataset' if role else 'the dataset'} has {total} "
                                                    f"samples, fewer than the model's fixed batch size of {batch_size}")
    end = total - total % batch_size if static else total
    split = [([array[start:start + batch_size] for array in arrays],
              None if labels is None else labels[start:start + batch_size]) for start in range(0, end, batch_size)]
    return Batched(batches=split, dropped=total - end)


def tokenize_texts(texts: list[str], tokenizer, model_input_names: list[str],
                   max_length: int = 128) -> dict[str, np.ndarray]:
    """Token arrays for the model's inputs only (tokenizers also emit e.g. token_type_ids some models lack), padded
    to the longest text (at most `max_length`): padding to a fixed length would fill calibration statistics and
    latency figures with pad tokens."""
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="np")
    kept = {name: encoded[name] for name in model_input_names if name in encoded}
    if not kept:
        raise JobFailure(ErrorCode.INVALID_DATASET,
                         f"the tokenizer produces {', '.join(encoded)}, none of which the model "
                         f"takes ({', '.join(model_input_names)})")
    return kept
