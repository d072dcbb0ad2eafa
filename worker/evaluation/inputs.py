"""Evaluation inputs generated from a model's input description and the job's input specs, when no dataset is given.

Seeded, so the baseline and the compressed model see exactly the same inputs. Without a spec, symbolic dims
get small defaults, floats are standard normal and integers 0..7; text-model inputs with a fixed meaning get
valid values (`attention_mask` all ones, `token_type_ids` all zeros). A spec (app.core.input_specs) sets the
shape, the dtype, the range of the values, or a constant fed as it is in every batch.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.input_specs import InputSpec

# Symbolic dims: the first (usually batch) gets a small batch, later ones a short sequence/feature length.
SYMBOLIC_FIRST_DIM = 4
SYMBOLIC_OTHER_DIM = 16
INT_HIGH = 8  # integer inputs (token ids, indices) stay small so any vocabulary accepts them


@dataclass
class GeneratedInput:
    """How one input is made: its shape and dtype, and in words how its values are drawn."""

    name: str
    shape: list[int]
    dtype: str
    how: str
    spec: InputSpec | None
    constant: np.ndarray | None = None

    def describe(self) -> str:
        return f"{self.name}: {self.how}, shape {self.shape} {self.dtype}"


def concrete_shape(shape: list, symbols: dict[str, int]) -> list[int]:
    dims = []
    for position, dim in enumerate(shape):
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
        else:
            default = SYMBOLIC_FIRST_DIM if position == 0 else SYMBOLIC_OTHER_DIM
            dims.append(symbols.setdefault(str(dim), default))
    return dims


def numpy_dtype(name: str) -> np.dtype:
    """The dtype generated for a declared one: floats other than float16 are fed as float32."""
    if name == "bool":
        return np.dtype(bool)
    try:
        dtype = np.dtype(name)
    except TypeError:
        return np.dtype(np.float32)
    return dtype if dtype.kind in "iub" or dtype == np.float16 else np.dtype(np.float32)


def _int_bounds(value_range: tuple[float, float] | None) -> tuple[int, int]:
    """Inclusive integer bounds: the whole numbers inside `range`, or 0..INT_HIGH-1 without one."""
    if value_range is None:
        return 0, INT_HIGH - 1
    low, high = int(np.ceil(value_range[0])), int(np.floor(value_range[1]))
    return low, max(low, high)


def _constant(entry: dict[str, Any], spec: InputSpec, dtype: np.dtype) -> np.ndarray:
    """The spec's value as fed: broadcast to its `shape`, or a single number shaped to the input's rank."""
    value = np.asarray(spec.value, dtype=dtype)
    if spec.shape is not None:
        return np.ascontiguousarray(np.broadcast_to(value, spec.shape))
    rank = len(entry["shape"])
    if value.size == 1 and value.ndim != rank:
        return value.reshape([1] * rank)
    return value


def plan(inputs: list[dict[str, Any]], specs: dict[str, InputSpec] | None = None) -> list[GeneratedInput]:
    """Shapes and value rules per input. A symbol (e.g. `batch`) fixed by one input's spec holds for every input
    that uses it, so inputs that must agree still do."""
    specs = specs or {}
    symbols: dict[str, int] = {}
    for entry in inputs:
        spec = specs.get(entry["name"])
        if spec is not None and spec.shape is not None and len(spec.shape) == len(entry["shape"]):
            for dim, given in zip(entry["shape"], spec.shape):
                if not (isinstance(dim, int) and dim >= 0):
                    symbols.setdefault(str(dim), given)
    planned = []
    for entry in inputs:
        name, spec = entry["name"], specs.get(entry["name"])
        dtype = numpy_dtype(spec.dtype if spec is not None and spec.dtype else entry["dtype"])
        dtype_name = "bool" if dtype.kind == "b" else dtype.name
        if spec is not None and spec.is_constant:
            constant = _constant(entry, spec, dtype)
            planned.append(GeneratedInput(name, list(constant.shape), dtype_name, f"the constant {spec.value!r}"
                                          if constant.size == 1 else "a constant", spec, constant))
            continue
        shape = list(spec.shape) if spec is not None and spec.shape is not None else concrete_shape(entry["shape"],
                                                                                                     symbols)
        value_range = spec.range if spec is not None else None
        if value_range is None and name == "attention_mask":
            how = "all ones"
        elif value_range is None and name == "token_type_ids":
            how = "all zeros"
        elif dtype.kind == "b":
            how = "random booleans"
        elif dtype.kind in "iu":
            low, high = _int_bounds(value_range)
            how = f"integers {low}..{high}"
        elif value_range is not None:
            how = f"uniform in [{value_range[0]:g}, {value_range[1]:g})"
        else:
            how = "standard normal"
        planned.append(GeneratedInput(name, shape, dtype_name, how, spec))
    return planned


def _draw(item: GeneratedInput, rng: np.random.Generator) -> np.ndarray:
    dtype = numpy_dtype(item.dtype)
    value_range = item.spec.range if item.spec is not None else None
    if item.how == "all ones":
        return np.ones(item.shape, dtype=dtype)
    if item.how == "all zeros":
        return np.zeros(item.shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=item.shape).astype(bool)
    if dtype.kind in "iu":
        low, high = _int_bounds(value_range)
        return rng.integers(low, high + 1, size=item.shape).astype(dtype)
    if value_range is not None:
        return rng.uniform(value_range[0], value_range[1], size=item.shape).astype(dtype)
    return rng.standard_normal(size=item.shape).astype(dtype)


def generate_feeds(inputs: list[dict[str, Any]], batches: int, seed: int = 0,
                   specs: dict[str, InputSpec] | None = None) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    planned = plan(inputs, specs)
    return [[item.constant if item.constant is not None else _draw(item, rng) for item in planned]
            for _ in range(batches)]
