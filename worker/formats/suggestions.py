"""Input specs proposed at inspection (`info.suggested_input_specs`) and what inspection could not tell
(`info.input_spec_notes`), read from the declared inputs alone: names, ranks, dtypes and shared dim symbols.

Simple rules, stated in the notes: the batch dim becomes 1 (and its axis, where a symbol shared with the first
input sits elsewhere, the input's `batch_axis`); the symbolic height and width of an image-like input 224; a
scalar integer named like a sample rate a constant 16000; each within the range a .pt2 export declares for the
dim. Value ranges and other lengths cannot be read from a declaration: the notes say so. Suggestions are
proposals: jobs use them only when given as `input_specs`.
"""

import re
from typing import Any

UNNAMED_DIM = "dim"  # how an ONNX input's unnamed symbolic dim is described: it ties no two dims together
IMAGE_SIDE = 224  # a multiple of 32, as strided CNNs need
SAMPLE_RATE = 16000
OTHER_DIM = 16  # what generated inputs use for an unknown length (worker.evaluation.inputs)
RATE_NAME = re.compile(r"(^|[_.])(sr|fs|rate|sample_?rate|sampling_?rate)$", re.IGNORECASE)
FIXED_MEANING = ("attention_mask", "token_type_ids")
MAX_NOTES = 32  # a model with thousands of inputs gets a readable list


def _symbolic(dim: Any) -> bool:
    return not (isinstance(dim, int) and dim >= 0)


def _image_axes(entry: dict[str, Any]) -> set[int]:
    """The height and width axes of a 4-D float input with 1 or 3 channels, first or last."""
    shape = entry["shape"]
    if len(shape) != 4 or not entry["dtype"].startswith("float"):
        return set()
    if shape[1] in (1, 3):
        return {2, 3}
    if shape[3] in (1, 3):
        return {1, 2}
    return set()


def _batch_symbol(inputs: list[dict[str, Any]]) -> str | None:
    for entry in inputs:
        shape = entry["shape"]
        if shape and _symbolic(shape[0]) and str(shape[0]) != UNNAMED_DIM and not RATE_NAME.search(entry["name"]):
            return str(shape[0])
    return None


def _within(size: int, symbol: str, dim_ranges: dict[str, list[int | None]]) -> int:
    """`size` moved into the range the export declares for `symbol` (pt2), when it declares one."""
    low, high = (dim_ranges.get(symbol) or [None, None])[:2]
    if low is not None:
        size = max(size, low)
    return min(size, high) if high is not None else size


def suggest(inputs: list[dict[str, Any]],
            dim_ranges: dict[str, list[int | None]] | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(suggested input specs, notes) for a model's declared inputs; `dim_ranges` are the ranges a .pt2 export
    declares for its symbolic dims (worker.formats.pt2.dim_ranges)."""
    dim_ranges = dim_ranges or {}
    batch = _batch_symbol(inputs)
    specs: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for entry in inputs:
        name, shape, dtype = entry["name"], entry["shape"], entry["dtype"]
        is_int = dtype.startswith(("int", "uint"))
        if is_int and len(shape) <= 1 and all(dim == 1 or _symbolic(dim) for dim in shape) \
                and RATE_NAME.search(name):
            specs[name] = {"value": SAMPLE_RATE}
            notes.append(f"input {name!r} looks like a sample rate: suggested the constant {SAMPLE_RATE}; "
                         "set the rate the model expects")
            continue
        if not shape:
            notes.append(f"input {name!r} is a scalar: if it is a setting, give its constant value")
        spec: dict[str, Any] = {}
        images = _image_axes(entry)
        concrete: list[int] = []
        batch_axis: int | None = None
        for axis, dim in enumerate(shape):
            if not _symbolic(dim):
                concrete.append(dim)
            elif (batch is not None and str(dim) == batch) or (axis == 0 and str(dim) == UNNAMED_DIM):
                concrete.append(_within(1, str(dim), dim_ranges))
                batch_axis = axis if batch_axis is None else batch_axis
            elif axis in images:
                concrete.append(_within(IMAGE_SIDE, str(dim), dim_ranges))
            elif str(dim) in dim_ranges:
                concrete.append(_within(OTHER_DIM, str(dim), dim_ranges))
                notes.append(f"dim {axis} ({dim!r}) of input {name!r}: the export allows {dim_ranges[str(dim)]} "
                             f"([min, max], null: no bound); suggested {concrete[-1]}")
            else:
                concrete.append(OTHER_DIM)
                notes.append(f"could not tell the size of dim {axis} ({dim!r}) of input {name!r}; suggested "
                             f"{OTHER_DIM}, give the length the model needs")
        if any(_symbolic(dim) for dim in shape):
            spec["shape"] = concrete
        if batch_axis:
            spec["batch_axis"] = batch_axis
        if images and any(_symbolic(shape[axis]) for axis in images):
            notes.append(f"input {name!r} looks like an image: suggested {IMAGE_SIDE} x {IMAGE_SIDE}")
        if name not in FIXED_MEANING and dtype != "bool":
            default = "integers 0..7" if is_int else "standard normal"
            notes.append(f"could not tell the range of input {name!r} (generated values are {default}); give "
                         "`range` if the model expects another")
        if spec:
            specs[name] = spec
    if len(notes) > MAX_NOTES:
        notes = [*notes[:MAX_NOTES], f"... and {len(notes) - MAX_NOTES} more notes like these"]
    return specs, notes
