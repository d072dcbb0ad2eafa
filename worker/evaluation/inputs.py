"""Evaluation inputs generated from a model's input description and the job's input specs, when no dataset is given.

Seeded, so the baseline and the compressed model see exactly the same inputs. Without a spec, symbolic dims
get small defaults, floats are standard normal and integers 0..7; text-model inputs with a fixed meaning get
valid values (`attention_mask` all ones, `token_type_ids` all zeros). A spec (app.core.input_specs) sets the
shape, the dtype, the range of the values, or a constant fed as it is in every batch.
"""

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from app.core.errors import ErrorCode
from app.core.input_specs import InputSpec
from worker.errors import JobFailure
from worker.formats.suggestions import UNNAMED_DIM

# Symbolic dims: the first (usually batch) gets a small batch, later ones a short sequence/feature length.
SYMBOLIC_FIRST_DIM = 4
SYMBOLIC_OTHER_DIM = 16
INT_HIGH = 8  # integer inputs (token ids, indices) stay small so any vocabulary accepts them


@dataclass
class GeneratedInput:
    """How one input is made: its shape and dtype, and the rule its values follow (`low`/`high` bound the
    integers, inclusive, and the uniform floats)."""

    name: str
    shape: list[int]
    dtype: np.dtype
    rule: Literal["constant", "ones", "zeros", "booleans", "integers", "uniform", "normal"]
    low: float = 0
    high: float = 0
    constant: np.ndarray | None = None
    spec: InputSpec | None = None

    @property
    def how(self) -> str:
        return {"constant": f"the constant {self.spec.value!r}" if self.constant is not None and self.constant.size == 1
                else "a constant",
                "ones": "all ones", "zeros": "all zeros", "booleans": "random booleans",
                "integers": f"integers {self.low}..{self.high}", "uniform": f"uniform in [{self.low:g}, {self.high:g})",
                "normal": "standard normal"}[self.rule]

    def describe(self) -> str:
        dtype = "bool" if self.dtype.kind == "b" else self.dtype.name
        return f"{self.name}: {self.how}, shape {self.shape} {dtype}"


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


def _int_bounds(value_range: tuple[float, float] | None, dtype: np.dtype) -> tuple[int, int]:
    """Inclusive integer bounds: the whole numbers inside `range` that the dtype holds, or 0..INT_HIGH-1."""
    if value_range is None:
        return 0, INT_HIGH - 1
    limits = np.iinfo(dtype)
    low = min(max(int(np.ceil(value_range[0])), limits.min), limits.max)
    high = min(max(int(np.floor(value_range[1])), low), limits.max)
    return low, high


def _constant(entry: dict[str, Any], spec: InputSpec, dtype: np.dtype) -> np.ndarray:
    """The spec's value as fed: broadcast to its `shape`, or a single number shaped to the input's rank."""
    try:
        value = np.asarray(spec.value, dtype=dtype)
    except (OverflowError, ValueError):
        value = None
    if value is None or (dtype.kind in "iub" and not np.array_equal(np.asarray(spec.value), value)):
        raise JobFailure(ErrorCode.INVALID_REQUEST, f"input_specs.{entry['name']}.value: does not fit the input's "
                                                    f"dtype {dtype}")
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
                if not (isinstance(dim, int) and dim >= 0) and str(dim) != UNNAMED_DIM:
                    symbols.setdefault(str(dim), given)
    planned = []
    for entry in inputs:
        name, spec = entry["name"], specs.get(entry["name"])
        dtype = numpy_dtype(spec.dtype if spec is not None and spec.dtype else entry["dtype"])
        if spec is not None and spec.is_constant:
            constant = _constant(entry, spec, dtype)
            planned.append(GeneratedInput(name, list(constant.shape), dtype, "constant", constant=constant, spec=spec))
            continue
        shape = list(spec.shape) if spec is not None and spec.shape is not None else concrete_shape(entry["shape"],
                                                                                                     symbols)
        value_range = spec.range if spec is not None else None
        item = GeneratedInput(name, shape, dtype, "normal", spec=spec)
        if value_range is None and name == "attention_mask":
            item.rule = "ones"
        elif value_range is None and name == "token_type_ids":
            item.rule = "zeros"
        elif dtype.kind == "b":
            item.rule = "booleans"
        elif dtype.kind in "iu":
            item.rule, (item.low, item.high) = "integers", _int_bounds(value_range, dtype)
        elif value_range is not None:
            item.rule, (item.low, item.high) = "uniform", value_range
        planned.append(item)
    return planned


def _draw(item: GeneratedInput, rng: np.random.Generator) -> np.ndarray:
    if item.rule == "constant":
        return item.constant
    if item.rule in ("ones", "zeros"):
        return (np.ones if item.rule == "ones" else np.zeros)(item.shape, dtype=item.dtype)
    if item.rule == "booleans":
        return rng.integers(0, 2, size=item.shape).astype(bool)
    if item.rule == "integers":
        return rng.integers(item.low, item.high, size=item.shape, endpoint=True).astype(item.dtype)
    if item.rule == "uniform":
        return rng.uniform(item.low, item.high, size=item.shape).astype(item.dtype)
    return rng.standard_normal(size=item.shape).astype(item.dtype)


def generate_feeds(inputs: list[dict[str, Any]], batches: int, seed: int = 0,
                   specs: dict[str, InputSpec] | None = None) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    planned = plan(inputs, specs)
    return [[_draw(item, rng) for item in planned] for _ in range(batches)]
