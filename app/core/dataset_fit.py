"""Whether a dataset's arrays fit a model's inputs, judged from their shapes and dtypes alone.

The worker judges the arrays it loaded with these rules before it casts them (worker.dataset_arrays, which also
checks the values); a dry run (`POST /v1/jobs` with `dry_run`) judges the arrays an upload's headers describe,
so the plan says what the job would find before it runs.
"""

from typing import Any

import numpy as np


class Misfit(ValueError):
    """A dataset that cannot feed the model; the message names the role, the array and the model input."""


def shape_text(dims: tuple | list) -> str:
    inner = ", ".join(str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def pair_arrays(array_names: list[str], model_inputs: list[dict[str, Any]], role: str) -> list[tuple[str, dict]]:
    """(array name, model input) for every model input, in model order. Matched by name; a single-input model and
    a single-array dataset are matched whatever the names, since that pairing cannot be ambiguous."""
    if len(model_inputs) == 1 and len(array_names) == 1:
        return [(array_names[0], model_inputs[0])]
    pairs = []
    for spec in model_inputs:
        if spec["name"] not in array_names:
            raise Misfit(f"{role} dataset: no array for model input {spec['name']!r} (dataset has: "
                         f"{', '.join(array_names)}); an input that is a constant can be given in input_specs as a "
                         "`value` instead")
        pairs.append((spec["name"], spec))
    return pairs


def check_array(name: str, shape: tuple | list, dtype: str, spec: dict[str, Any], role: str,
                batch_axis: int = 0) -> None:
    """One array against its model input: samples on axis 0, each sample the input without its batch axis (a
    state input [2, batch, 128] is stored as [samples, 2, 128]); float data never feeds an integer or bool input."""
    prefix = f"{role} dataset"
    if not spec["shape"]:
        raise Misfit(f"{prefix}: model input {spec['name']!r} is a scalar, with no batch axis to hold one value per "
                     f"sample: give it in input_specs as a constant `value` (and leave array {name!r} out of the "
                     "dataset)")
    expected = [dim for position, dim in enumerate(spec["shape"]) if position != batch_axis]
    fits = len(shape) == len(spec["shape"]) and all(
        not isinstance(want, int) or want < 0 or want == got for want, got in zip(expected, shape[1:]))
    if not fits:
        where = "" if batch_axis == 0 else f" (its batch axis {batch_axis} left out)"
        raise Misfit(f"{prefix}: array {name!r} has shape {shape_text(shape)} per-sample {shape_text(shape[1:])}, "
                     f"but model input {spec['name']!r} expects {shape_text(expected)}{where}")
    try:
        target = np.dtype(spec["dtype"])
    except TypeError:
        return  # not a dtype a dataset can feed: the worker says so (unsupported_model)
    if target.kind in "biu" and np.dtype(dtype).kind == "f":
        raise Misfit(f"{prefix}: array {name!r} holds {dtype} values, but model input {spec['name']!r} takes "
                     f"{target}; store integer values")


def check_fit(arrays: dict[str, tuple[tuple | list, str]], model_inputs: list[dict[str, Any]], role: str,
              batch_axes: dict[str, int] | None = None) -> list[tuple[str, dict]]:
    """Pair `arrays` (name -> (shape, dtype name), in file order) with the model inputs and check each pair;
    returns the pairs, or raises Misfit for the first problem."""
    pairs = pair_arrays(list(arrays), model_inputs, role)
    for name, spec in pairs:
        check_array(name, *arrays[name], spec, role, (batch_axes or {}).get(spec["name"], 0))
    return pairs
