"""Recipes: an ordered list of steps, each an object with `op`. Unknown ops or fields are rejected (422)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizeStep(StrictModel):
    op: Literal["quantize"]
    method: Literal["dynamic", "static", "weight_only"] = "dynamic"
    dtype: Literal["int8", "int4", "fp16", "bf16"] = "int8"
    granularity: Literal["per_channel", "per_tensor", "group"] = "per_channel"
    group_size: int | None = Field(default=None, ge=8, le=4096)
    exclude: list[str] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _supported(self) -> "QuantizeStep":
        if (self.method, self.dtype) != ("dynamic", "int8"):
            raise ValueError(f"quantize method={self.method!r} dtype={self.dtype!r} is not available yet; "
                             "this service supports method='dynamic' with dtype='int8'")
        if self.granularity == "group" or self.group_size is not None:
            raise ValueError("granularity='group' and group_size apply to weight_only quantization, "
                             "which is not available yet")
        return self


class ExportStep(StrictModel):
    op: Literal["export"]
    formats: list[Literal["onnx"]] = Field(default_factory=lambda: ["onnx"], min_length=1)


Step = Annotated[QuantizeStep | ExportStep, Field(discriminator="op")]


class Recipe(StrictModel):
    steps: list[Step] = Field(min_length=1, max_length=32)


class Target(StrictModel):
    runtime: Literal["onnxruntime"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"

    @property
    def queue(self) -> str:
        """CUDA jobs go to the `gpu` queue, served only by workers that have a GPU."""
        return "gpu" if self.device == "cuda" else "cpu"


class DatasetRefs(StrictModel):
    calibration: str | None = None
    train: str | None = None
    eval: str | None = None
