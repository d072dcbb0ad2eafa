"""Input specs: how a job makes (or reads) each model input when the model's own declaration is not enough.

Per input name: a concrete `shape` for symbolic dims, a `dtype`, a `range` for generated values, the
`batch_axis` datasets are batched along, or a constant `value` fed as it is in every batch. An upload may carry
specs as the model's defaults; a job's own override them per input. The API validates them (schema here, names
and shapes against the inspected model with `problems_against_model`) and the worker honours them
(worker.evaluation). Pure Python: the API and the workers both import it.
"""

import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, model_validator

from app.core.recipe import StrictModel, no_control_characters

MAX_INPUTS = 64
MAX_RANK = 8
MAX_DIM = 1 << 20
MAX_GENERATED_ELEMENTS = 1 << 24  # one generated tensor: 64 MiB of float32
MAX_VALUE_ELEMENTS = 4096

SpecDtype = Literal["float32", "float16", "int64", "int32", "int8", "uint8", "bool"]
InputName = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(no_control_characters)]


def _value_shape(value: Any, depth: int = 0) -> list[int]:
    """The shape of a constant: a number, or a rectangular nested list of numbers, at most MAX_RANK deep."""
    if isinstance(value, bool) or (isinstance(value, float) and math.isfinite(value)):
        return []
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("value: integers must fit in int64")
        return []
    if not isinstance(value, list):  # a ValueError, which pydantic reports as a validation error
        raise ValueError("value: must be a finite number, a boolean or a nested list of them")  # noqa: TRY004
    if depth >= MAX_RANK:
        raise ValueError(f"value: nested deeper than {MAX_RANK} levels")
    if not value:
        raise ValueError("value: empty lists are not allowed")
    shapes = [_value_shape(item, depth + 1) for item in value]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError("value: nested lists must be rectangular (every row the same length)")
    return [len(value), *shapes[0]]


def _elements(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _broadcasts(source: list[int], target: list[int]) -> bool:
    """numpy's rule: aligned from the right, each dim equal or 1."""
    return len(source) <= len(target) and all(s in (1, t) for s, t in zip(reversed(source), reversed(target)))


class InputSpec(StrictModel):
    """How a job makes or reads one model input when its declaration is not enough: concrete dims, a dtype, a
    range of generated values, the axis datasets are batched along, or a constant."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"shape": [1, 512]}, {"shape": [2, 1, 128],
                                                                                    "batch_axis": 1},
                                                              {"value": 16000}, {"range": [0, 30522]}]})

    shape: list[Annotated[int, Field(ge=0, le=MAX_DIM)]] | None = Field(
        default=None, max_length=MAX_RANK, description="concrete dims, replacing the model's symbolic ones")
    dtype: SpecDtype | None = Field(default=None, description="the model's own when not given")
    range: tuple[float, float] | None = Field(
        default=None, description="[low, high]: floats uniform in [low, high), integers from low to high inclusive; "
                                  "without it floats are standard normal and integers 0..7")
    batch_axis: int = Field(default=0, ge=0, lt=MAX_RANK, description="the axis datasets are batched along")
    value: Any = Field(default=None, description="a constant fed as it is in every batch (a number or a small "
                                                 "nested list); excludes range")

    @model_validator(mode="after")
    def _consistent(self) -> "InputSpec":
        if not self.model_fields_set:
            raise ValueError("give at least one of shape, dtype, range, batch_axis, value")
        if self.shape is not None and _elements(self.shape) > MAX_GENERATED_ELEMENTS:
            raise ValueError(f"shape: {self.shape} has more than {MAX_GENERATED_ELEMENTS} elements")
        if self.shape is not None and self.batch_axis and self.batch_axis >= len(self.shape):
            raise ValueError(f"batch_axis: {self.batch_axis} is outside shape {self.shape} "
                             f"(rank {len(self.shape)})")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range: low must be below high, got {list(self.range)}")
        if "value" in self.model_fields_set:
            self._check_value()
        return self

    def _check_value(self) -> None:
        if self.value is None:
            raise ValueError("value: must be a number, a boolean or a nested list, not null")
        shape = _value_shape(self.value)
        if _elements(shape) > MAX_VALUE_ELEMENTS:
            raise ValueError(f"value: more than {MAX_VALUE_ELEMENTS} elements")
        if self.range is not None:
            raise ValueError("value: a constant excludes range")
        if "batch_axis" in self.model_fields_set:
            raise ValueError("batch_axis: a constant is the same in every batch; it has no batch axis")
        if self.shape is not None and not _broadcasts(shape, self.shape):
            raise ValueError(f"value: its shape {shape} does not broadcast to shape {self.shape}")

    @property
    def is_constant(self) -> bool:
        return "value" in self.model_fields_set

    def value_shape(self) -> list[int]:
        """The constant's shape as fed: `shape` when given, else the value's own."""
        return list(self.shape) if self.shape is not None else _value_shape(self.value)


InputSpecs = Annotated[dict[InputName, InputSpec], Field(max_length=MAX_INPUTS)]
_ADAPTER = TypeAdapter(InputSpecs)


def parse_json(text: str) -> dict[str, InputSpec]:
    """Specs given as JSON text (an upload's form field); ValueError naming the field and the problem."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"input_specs: not valid JSON ({exc})") from None
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in ("input_specs", *first.get("loc", ())))
        raise ValueError(f"{where}: {str(first.get('msg', 'invalid')).removeprefix('Value error, ')}") from None


def to_json(specs: dict[str, InputSpec] | None) -> dict[str, Any] | None:
    """What is stored and shown: only the fields given (a default batch_axis is not written out)."""
    if not specs:
        return None
    return {name: spec.model_dump(mode="json", exclude_unset=True) for name, spec in specs.items()}


def from_json(stored: dict[str, Any] | None) -> dict[str, InputSpec]:
    return _ADAPTER.validate_python(stored or {})


def merged(model_specs: dict[str, Any] | None, job_specs: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model's specs (its upload's defaults), overridden per input by the job's own."""
    combined = {**(model_specs or {}), **(job_specs or {})}
    return combined or None


def problems_against_model(specs: dict[str, InputSpec], model_inputs: list[dict[str, Any]]) -> list[str]:
    """What the specs say that the model contradicts: unknown input names, a rank or a fixed dim or a dtype
    other than the model's. Each problem names its field (`input_specs.<input>...`)."""
    declared = {entry["name"]: entry for entry in model_inputs}
    problems = []
    for name, spec in specs.items():
        entry = declared.get(name)
        if entry is None:
            problems.append(f"input_specs.{name}: the model has no input {name!r}; its inputs are "
                            f"{', '.join(declared) or '(none)'}")
            continue
        model_shape = entry.get("shape") or []
        given = spec.value_shape() if spec.is_constant else spec.shape
        if given is not None and spec.is_constant and spec.shape is None and _elements(given) == 1:
            given = None  # a single number fills an input of any rank with one element (worker.evaluation)
        if given is not None:
            if len(given) != len(model_shape):
                problems.append(f"input_specs.{name}.shape: rank {len(given)} ({given}), but the model's input "
                                f"{name!r} has rank {len(model_shape)} ({model_shape})")
            else:
                for axis, (want, got) in enumerate(zip(model_shape, given)):
                    if isinstance(want, int) and want >= 0 and want != got:
                        problems.append(f"input_specs.{name}.shape: dim {axis} is {got}, but the model fixes it "
                                        f"at {want} ({model_shape})")
                        break
        if spec.batch_axis and spec.batch_axis >= len(model_shape):
            problems.append(f"input_specs.{name}.batch_axis: {spec.batch_axis} is outside the model's input "
                            f"{name!r} of rank {len(model_shape)}")
        declared_dtype = entry.get("dtype")
        if spec.dtype is not None and declared_dtype in SpecDtype.__args__ and spec.dtype != declared_dtype:
            problems.append(f"input_specs.{name}.dtype: {spec.dtype}, but the model's input {name!r} takes "
                            f"{declared_dtype}")
    return problems
