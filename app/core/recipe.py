"""Recipes: an ordered list of steps, each an object with `op`. Unknown ops or fields are rejected (422).

Rules that depend on more than one field are checked here too, so a bad recipe is refused at submission
with a message naming the field, not discovered by a worker later.
"""

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from app.core.queue import Queue

# Every string a request can carry is bounded and holds no control characters (C0, DEL, C1): PostgreSQL text cannot
# hold NUL, and CR/LF in a name would end up in headers and logs. Lists are bounded where they are declared.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def no_control_characters(value: str) -> str:
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"must not contain control characters (U+{ord(found.group()):04X} at {found.start()})")
    return value


# A job's fidelity floor (final output cosine against the original) when neither the job nor its preset sets one:
# below it the outputs have little to do with the original's (worker.pipeline.floor judges it).
DEFAULT_MIN_FIDELITY = 0.9

ID_MAX = 40
NAME_MAX = 200
PATTERN_MAX = 512
EXCLUDE_MAX = 100

Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX), AfterValidator(no_control_characters)]
Name = Annotated[str, StringConstraints(max_length=NAME_MAX), AfterValidator(no_control_characters)]
LayerPattern = Annotated[str, StringConstraints(max_length=PATTERN_MAX),
                         AfterValidator(no_control_characters)]


class StrictModel(BaseModel):
    # Unknown fields are refused; so are NaN and infinities (given as strings such as "inf"): JSON has no such
    # numbers, and PostgreSQL refuses them in a JSON column.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class QuantizeStep(StrictModel):
    op: Literal["quantize"]
    # "auto" (the default for int8): static QDQ for convolutional nets, dynamic for transformers and recurrent
    # nets, kept only if faster than fp32 and faithful, else the other tried (worker.compression.int8_auto).
    method: Literal["auto", "dynamic", "static", "weight_only"] = "auto"
    dtype: Literal["int8", "int4", "fp16", "bf16"] = "int8"
    granularity: Literal["per_channel", "per_tensor", "group"] = "per_channel"
    group_size: int | None = Field(default=None, ge=8, le=4096)
    exclude: list[LayerPattern] = Field(default_factory=list, max_length=EXCLUDE_MAX)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # Activation smoothing (SmoothQuant-style) before int8: alpha in [0, 1], or "auto" to pick it on the
    # calibration data. Needs a calibration dataset; onnxruntime target, method dynamic or static.
    smoothing: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] | None = None
    # How weight-only int4 weights are rounded: to nearest, HQQ (no data), GPTQ (needs a calibration dataset).
    algorithm: Literal["rtn", "gptq", "hqq"] = "rtn"

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeStep":
        if self.method == "auto" and (self.dtype != "int8" or self.smoothing is not None):
            if "method" in self.model_fields_set:
                raise ValueError("method 'auto' chooses between the int8 methods: it takes dtype 'int8' and no "
                                 "smoothing")
            self.method = "dynamic"  # what an omitted method meant before 'auto'
        if self.smoothing is not None and (self.dtype != "int8" or self.method not in ("dynamic", "static")):
            raise ValueError("smoothing applies to int8 with method 'dynamic' or 'static'")
        if self.algorithm != "rtn" and (self.method != "weight_only" or self.dtype != "int4"):
            raise ValueError(f"algorithm {self.algorithm!r} applies to method 'weight_only' with dtype 'int4'")
        if self.algorithm != "rtn" and self.granularity == "per_channel" and "granularity" in self.model_fields_set:
            raise ValueError(f"algorithm {self.algorithm!r} quantizes in groups: leave granularity out or use "
                             "'group'")
        if self.group_size is not None and self.group_size & (self.group_size - 1):
            raise ValueError("group_size must be a power of two (8..4096)")
        if self.dtype == "int4" and self.method != "weight_only":
            raise ValueError("dtype 'int4' needs method 'weight_only'")
        if self.method == "static" and self.dtype != "int8":
            raise ValueError("method 'static' quantizes to dtype 'int8'")
        if (self.granularity == "group" or self.group_size is not None) and self.method != "weight_only":
            raise ValueError("granularity 'group' and group_size apply to method 'weight_only'")
        if self.group_size is not None and self.granularity != "group":
            if "granularity" in self.model_fields_set:
                raise ValueError(f"group_size needs granularity 'group' (got {self.granularity!r}); leave granularity "
                                 "out to get groups")
            self.granularity = "group"  # a group size means groups
        if self.algorithm != "rtn":
            self.granularity = "group"
        if self.granularity == "group" and self.group_size is None:
            self.group_size = 128
        return self

    @property
    def is_cast(self) -> bool:
        return self.dtype in ("fp16", "bf16")


class PruneStep(StrictModel):
    op: Literal["prune"]
    method: Literal["magnitude", "activation_aware", "structured"] = "magnitude"
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    threshold: float | None = Field(default=None, ge=0.0)
    scope: Literal["global", "layer"] = "layer"
    pattern: Literal["unstructured", "2:4", "channel"] = "unstructured"
    exclude: list[LayerPattern] = Field(default_factory=list, max_length=EXCLUDE_MAX)

    @model_validator(mode="after")
    def _consistent(self) -> "PruneStep":
        if self.method == "structured" and self.pattern == "unstructured":
            self.pattern = "channel"
        if self.pattern == "channel" and self.method != "structured":
            raise ValueError("pattern 'channel' needs method 'structured'")
        if self.method == "structured" and self.pattern != "channel":
            raise ValueError("method 'structured' removes whole channels: use pattern 'channel'")
        if self.threshold is not None:
            if self.method != "magnitude" or self.pattern != "unstructured":
                raise ValueError("threshold applies to method 'magnitude' with pattern 'unstructured'")
            if self.sparsity is not None:
                raise ValueError("give either sparsity or threshold, not both")
        elif self.pattern == "2:4":
            if self.sparsity not in (None, 0.5):
                raise ValueError("pattern '2:4' keeps 2 of every 4 weights: sparsity is 0.5")
            self.sparsity = 0.5
        elif self.sparsity is None:
            raise ValueError("sparsity (0..1) or, for magnitude pruning, threshold is required")
        return self


class AnalyzeStep(StrictModel):
    op: Literal["analyze"]
    bins: int = Field(default=32, ge=4, le=256)


class Shrink(StrictModel):
    depth: float = Field(default=1.0, gt=0.0, le=1.0)
    width: float = Field(default=1.0, gt=0.0, le=1.0)


class Student(StrictModel):
    model_id: Id | None = None
    shrink: Shrink | None = None
    # The model as the earlier steps left it (pruning masks kept), taught by the original upload: recovery.
    current: bool = False

    @model_validator(mode="after")
    def _one(self) -> "Student":
        if (self.model_id is not None) + (self.shrink is not None) + self.current != 1:
            raise ValueError("give exactly one of model_id (an uploaded student), shrink (derived from the teacher) "
                             "or current: true (the model as the earlier steps left it)")
        if self.shrink is not None and self.shrink.depth == 1.0 and self.shrink.width == 1.0:
            raise ValueError("shrink: depth or width must be below 1 for the student to be smaller")
        return self


class Training(StrictModel):
    epochs: int = Field(default=3, ge=1, le=1000)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(default=32, ge=1, le=4096)


class DistillStep(Training):
    op: Literal["distill"]
    student: Student
    temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    hidden_weight: float = Field(default=0.0, ge=0.0, le=100.0)
    # Hold out a tenth of the train samples and stop after this many epochs without a lower loss on them.
    early_stopping: int | None = Field(default=None, ge=1, le=100)


class FinetuneStep(Training):
    op: Literal["finetune"]
    quantization_aware: bool = False


class ExportStep(StrictModel):
    op: Literal["export"]
    # safetensors (and hf weights) of a sparse model use compressed-tensors' sparse-bitmask layout;
    # safetensors-dense is the plain layout
    formats: list[Literal["onnx", "pt2", "hf", "safetensors", "safetensors-dense"]] = Field(min_length=1,
                                                                                             max_length=5)


Step = Annotated[QuantizeStep | PruneStep | DistillStep | FinetuneStep | AnalyzeStep | ExportStep,
                 Field(discriminator="op")]
TRAINING_OPS = ("distill", "finetune")


class Recipe(StrictModel):
    steps: list[Step] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _order(self) -> "Recipe":
        quantized = False
        for index, step in enumerate(self.steps):
            if quantized and step.op not in ("export", "analyze"):
                raise ValueError(f"steps.{index}: a {step.op!r} step cannot follow a quantize step; "
                                 "quantize last (only analyze and export may follow)")
            quantized = quantized or step.op == "quantize"
        return self


class Target(StrictModel):
    runtime: Literal["onnxruntime", "pytorch"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"

    @property
    def queue(self) -> Queue:
        """CUDA jobs go to the `gpu` queue, served only by workers that have a GPU."""
        return Queue.for_device(self.device)


class DatasetRefs(StrictModel):
    calibration: Id | None = None
    train: Id | None = None
    eval: Id | None = None


def check_recipe_for_target(recipe: Recipe, target: Target, datasets: DatasetRefs) -> None:
    """Cross-field rules between the steps, the target and the datasets (ValueError names the field)."""
    for index, step in enumerate(recipe.steps):
        where = f"recipe.steps.{index}"
        if isinstance(step, QuantizeStep):
            if step.method == "static" and target.runtime != "onnxruntime":
                raise ValueError(f"{where}.method: static int8 is available for target.runtime 'onnxruntime'")
            if step.dtype == "bf16" and target.runtime == "onnxruntime":
                raise ValueError(f"{where}.dtype: ONNX Runtime has no bf16 kernels on CPU; use 'fp16' or "
                                 "target.runtime 'pytorch'")
            if step.method == "static" and not datasets.calibration:
                raise ValueError(f"datasets.calibration: {where} (static quantization) needs a calibration dataset")
            if step.smoothing is not None and target.runtime != "onnxruntime":
                raise ValueError(f"{where}.smoothing: activation smoothing is available for target.runtime "
                                 "'onnxruntime'")
            if step.smoothing is not None and not datasets.calibration:
                raise ValueError(f"datasets.calibration: {where} (smoothing) needs a calibration dataset")
            if step.algorithm != "rtn" and target.runtime != "onnxruntime":
                raise ValueError(f"{where}.algorithm: {step.algorithm!r} is available for target.runtime "
                                 "'onnxruntime'; the pytorch target rounds to nearest")
            if step.algorithm == "gptq" and not datasets.calibration:
                raise ValueError(f"datasets.calibration: {where} (algorithm 'gptq') needs a calibration dataset")
        if step.op in TRAINING_OPS and not datasets.train:
            raise ValueError(f"datasets.train: {where} ({step.op}) needs a train dataset")
        if isinstance(step, PruneStep) and step.method == "activation_aware" and not datasets.calibration:
            raise ValueError(f"datasets.calibration: {where} (activation_aware pruning) needs a calibration "
                             "dataset")


def check_recipe_for_model(recipe: Recipe, target: Target, model_format: str) -> None:
    """What an uploaded model's format allows: ONNX uploads have no PyTorch form to prune or export from."""
    if model_format == "onnx":
        if target.runtime != "onnxruntime":
            raise ValueError("target.runtime: an ONNX model can only be compressed for 'onnxruntime'")
        for index, step in enumerate(recipe.steps):
            if isinstance(step, PruneStep) and step.method != "magnitude":
                raise ValueError(f"recipe.steps.{index}.method: {step.method!r} pruning needs a PyTorch model "
                                 "(.pt2 or Hugging Face); ONNX models support magnitude pruning")
            if step.op in TRAINING_OPS:
                raise ValueError(f"recipe.steps.{index}.op: {step.op} needs a PyTorch model (.pt2 or Hugging "
                                 "Face); an ONNX model cannot be trained here")
            if isinstance(step, ExportStep) and set(step.formats) - {"onnx"}:
                raise ValueError(f"recipe.steps.{index}.formats: an ONNX model can only be exported as 'onnx'")
    for index, step in enumerate(recipe.steps):
        if isinstance(step, ExportStep) and "hf" in step.formats and model_format != "hf":
            raise ValueError(f"recipe.steps.{index}.formats: 'hf' export needs a Hugging Face model upload")


class TuneSpec(StrictModel):
    """Accuracy-aware tuning: try candidate recipes, keep the best one within the tolerance."""

    # perplexity (causal LMs on a .jsonl text eval set): lower is better, max_loss bounds its relative increase
    metric: Literal["accuracy", "fidelity", "perplexity"] = "fidelity"
    max_loss: float = Field(default=0.01, ge=0.0, le=1.0)
    objective: Literal["size", "latency"] = "size"
    max_trials: int = Field(default=8, ge=1, le=100)
    time_budget_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    search: list[Recipe] | None = Field(default=None, min_length=1, max_length=100)
