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
    """Quantize weights (and activations, for `static` and `dynamic`) to a smaller type. Must be the last step
    that changes the model (only `analyze` and `export` may follow)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"op": "quantize", "method": "auto", "dtype": "int8"},
        {"op": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 32, "algorithm": "gptq"}]})

    op: Literal["quantize"] = Field(description="the step: quantize")
    # "auto" (the default for int8): static QDQ for convolutional nets, dynamic for transformers and recurrent
    # nets, kept only if faster than fp32 and faithful, else the other tried (worker.compression.int8_auto).
    method: Literal["auto", "dynamic", "static", "weight_only"] = Field(
        default="auto", description="`auto` (int8 only): static for convolutional nets, dynamic for transformers and "
                                    "recurrent nets, chosen by measured latency and fidelity; `dynamic`: int8 "
                                    "weights, activations quantized at run time; `static`: activations calibrated "
                                    "on `datasets.calibration`; `weight_only`: weights only (int4 in groups)")
    dtype: Literal["int8", "int4", "fp16", "bf16"] = Field(
        default="int8", description="the type weights are stored in; `fp16`/`bf16` are plain casts, `int4` needs "
                                    "`weight_only`, `bf16` the pytorch target")
    granularity: Literal["per_channel", "per_tensor", "group"] = Field(
        default="per_channel", description="one scale per output channel, per tensor, or per group of "
                                           "`group_size` weights (weight_only)")
    group_size: int | None = Field(default=None, ge=8, le=4096,
                                   description="weights per scale for `granularity: group`: a power of two "
                                               "(default 128); giving it implies groups")
    exclude: list[LayerPattern] = Field(default_factory=list, max_length=EXCLUDE_MAX,
                                        description="regular expressions of layer names left unquantized",
                                        examples=[["^classifier$", "lm_head"]])
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax", description="how static int8 picks activation ranges from the calibration data")
    # Activation smoothing (SmoothQuant-style) before int8. Needs a calibration dataset; onnxruntime target,
    # method dynamic or static.
    smoothing: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] | None = Field(
        default=None, description="activation smoothing before int8 (outlier channels folded into the weights): "
                                  "alpha in [0, 1], or `auto` to pick it on `datasets.calibration`; onnxruntime "
                                  "target, `dynamic` or `static`")
    # How weight-only int4 weights are rounded: to nearest, HQQ (no data), GPTQ (needs a calibration dataset).
    algorithm: Literal["rtn", "gptq", "hqq"] = Field(
        default="rtn", description="how int4 weights are rounded: to nearest, HQQ (no data needed), or GPTQ "
                                   "(errors compensated on `datasets.calibration`); onnxruntime target")

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


CALIBRATED_PRUNING = ("activation_aware", "sparsegpt")  # prune methods that read datasets.calibration


class PruneStep(StrictModel):
    """Set weights to zero (or, `structured`, remove whole channels). A sparse model is delivered compressed."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"op": "prune", "method": "magnitude", "sparsity": 0.5},
        {"op": "prune", "method": "activation_aware", "pattern": "2:4"}]})

    op: Literal["prune"] = Field(description="the step: prune")
    method: Literal["magnitude", "activation_aware", "sparsegpt", "structured"] = Field(
        default="magnitude", description="`magnitude`: the smallest weights; `activation_aware` (Wanda): weight "
                                         "times input activation on `datasets.calibration`; `sparsegpt`: chosen "
                                         "by the output error their removal costs on `datasets.calibration`, the "
                                         "weights that stay corrected to make up for them (PyTorch models; slower, "
                                         "closer to the original); `structured`: whole channels, so the model gets "
                                         "narrower (PyTorch models)")
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0,
                                   description="the share of weights (or channels) removed, 0..1; required "
                                               "unless `threshold` or `pattern: 2:4` says it", examples=[0.5])
    threshold: float | None = Field(default=None, ge=0.0,
                                    description="magnitude pruning only: zero every weight whose magnitude is "
                                                "below this, instead of a sparsity", examples=[0.01])
    scope: Literal["global", "layer"] = Field(default="layer", description="rank weights within each layer, or "
                                                                           "across the whole model")
    pattern: Literal["unstructured", "2:4", "channel"] = Field(
        default="unstructured", description="`2:4`: two of every four weights (sparsity 0.5); `channel` goes with "
                                            "`structured`")
    exclude: list[LayerPattern] = Field(default_factory=list, max_length=EXCLUDE_MAX,
                                        description="regular expressions of layer names left dense",
                                        examples=[["^fc3$"]])
    embeddings: bool = Field(default=False,
                             description="also prune the embedding tables (PyTorch models), by magnitude within each "
                                         "token's vector: a small encoder's word embeddings hold about half of its "
                                         "weights, so without them a sparse file stays large")

    @model_validator(mode="after")
    def _consistent(self) -> "PruneStep":
        if self.embeddings and self.method == "structured":
            raise ValueError("embeddings: structured pruning removes channels; embedding tables are pruned only by "
                             "unstructured or 2:4 pruning")
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
    """Per-layer weight statistics (min, max, mean, std, histogram, sparsity) and a suggested recipe, in the
    report's `analysis`; the model is not changed."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"op": "analyze", "bins": 32}]})

    op: Literal["analyze"] = Field(description="the step: analyze")
    bins: int = Field(default=32, ge=4, le=256, description="histogram bins per layer")


class Shrink(StrictModel):
    """A student derived from the teacher: fewer layers (`depth`) and/or narrower layers (`width`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"depth": 0.5}, {"depth": 0.67, "width": 0.5}]})

    depth: float = Field(default=1.0, gt=0.0, le=1.0, description="the share of layers kept (transformers: evenly "
                                                                  "spaced, initialised from the teacher's)")
    width: float = Field(default=1.0, gt=0.0, le=1.0, description="the share of hidden units kept (MLP/CNN layers; "
                                                                  "feed-forward neurons of Hugging Face models)")


class Student(StrictModel):
    """The model a `distill` step trains: exactly one of an uploaded model, a shrunk copy of the teacher, or the
    model as the earlier steps left it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"shrink": {"depth": 0.5}}, {"current": True},
                                                              {"model_id": "mdl_0193a1b2c3d4e5f60718293a"}]})

    model_id: Id | None = Field(default=None, description="an uploaded `.pt2` or Hugging Face model of the tenant")
    shrink: Shrink | None = Field(default=None, description="derive the student from the teacher")
    # The model as the earlier steps left it (pruning masks kept), taught by the original upload: recovery.
    current: bool = Field(default=False, description="true: the model as the earlier steps left it (pruning masks "
                                                     "kept) is the student and the upload the teacher (recovery)")

    @model_validator(mode="after")
    def _one(self) -> "Student":
        if (self.model_id is not None) + (self.shrink is not None) + self.current != 1:
            raise ValueError("give exactly one of model_id (an uploaded student), shrink (derived from the teacher) "
                             "or current: true (the model as the earlier steps left it)")
        if self.shrink is not None and self.shrink.depth == 1.0 and self.shrink.width == 1.0:
            raise ValueError("shrink: depth or width must be below 1 for the student to be smaller")
        return self


class Training(StrictModel):
    epochs: int = Field(default=3, ge=1, le=1000, description="passes over the train dataset")
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="the learning rate (Adam)")
    batch_size: int = Field(default=32, ge=1, le=4096, description="samples per training batch")


class DistillStep(Training):
    """Train a student to reproduce the model's outputs on `datasets.train` (knowledge distillation)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"op": "distill", "student": {"shrink": {"depth": 0.5}}, "epochs": 3, "temperature": 2.0, "alpha": 0.5}]})

    op: Literal["distill"] = Field(description="the step: distill")
    student: Student = Field(description="the model that learns")
    temperature: float = Field(default=2.0, gt=0.0, le=100.0, description="softens both models' outputs in the "
                                                                          "soft-target loss")
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the soft-target loss; the hard-label "
                                                                  "loss gets 1 - alpha (1.0 for unlabelled data)")
    hidden_weight: float = Field(default=0.0, ge=0.0, le=100.0,
                                 description="weight of a loss on hidden states (and, for encoders, the pooled "
                                             "embedding cosine)")
    layer_weight: float | None = Field(default=None, ge=0.0, le=100.0,
                                       description="weight of a loss matching each transformer layer's output to "
                                                   "the teacher's same layer (Hugging Face students with the "
                                                   "teacher's number of layers: recovery, a narrower student); "
                                                   "1 for Hugging Face models distilled on unlabelled data, else 0")
    lr_schedule: Literal["constant", "linear"] = Field(
        default="constant", description="`linear`: the learning rate falls linearly to 0 over the planned epochs; "
                                        "the default for Hugging Face models distilled on unlabelled data")
    dropout: bool | None = Field(default=None,
                                 description="keep the student's dropout active while it learns; false for Hugging "
                                             "Face models distilled on unlabelled data (their students matched the "
                                             "teacher better without it), else true")
    # Hold out a tenth of the train samples and stop after this many epochs without a lower loss on them.
    early_stopping: int | None = Field(default=None, ge=1, le=100,
                                       description="hold out a tenth of the train samples and stop after this many "
                                                   "epochs without a lower loss on them", examples=[2])


class FinetuneStep(Training):
    """Train the model on `datasets.train` (labels needed), keeping the zeros of earlier pruning."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"op": "finetune", "epochs": 3, "lr": 0.0001}]})

    op: Literal["finetune"] = Field(description="the step: finetune")
    quantization_aware: bool = Field(default=False, description="train with int8 rounding simulated, so a "
                                                                "following int8 quantize step loses less")


class ExportStep(StrictModel):
    """Extra artifacts in other formats, each checked to load back and give the same outputs."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"op": "export", "formats": ["onnx", "safetensors"]}]})

    op: Literal["export"] = Field(description="the step: export")
    # safetensors (and hf weights) of a sparse model use compressed-tensors' sparse-bitmask layout;
    # safetensors-dense is the plain layout
    formats: list[Literal["onnx", "pt2", "hf", "safetensors", "safetensors-dense"]] = Field(
        min_length=1, max_length=5, description="`safetensors` (and `hf` weights) of a sparse model use "
                                                "compressed-tensors' sparse-bitmask layout; `safetensors-dense` the "
                                                "plain one; an ONNX upload exports only `onnx`")


Step = Annotated[QuantizeStep | PruneStep | DistillStep | FinetuneStep | AnalyzeStep | ExportStep,
                 Field(discriminator="op")]
TRAINING_OPS = ("distill", "finetune")


class Recipe(StrictModel):
    """The steps a job applies, in order."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]},
        {"steps": [{"op": "prune", "sparsity": 0.5}, {"op": "finetune", "epochs": 2}, {"op": "quantize"}]}]})

    steps: list[Step] = Field(min_length=1, max_length=32, description="1-32 steps, each an object with `op`")

    @model_validator(mode="after")
    def _order(self) -> "Recipe":
        quantized = False
        for index, step in enumerate(self.steps):
            if quantized and step.op not in ("export", "analyze"):
                raise ValueError(f"steps.{index}: a {step.op!r} step cannot follow a quantize step; "
                                 "quantize last (only analyze and export may follow)")
            quantized = quantized or step.op == "quantize"
        exported: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            for fmt in step.formats if isinstance(step, ExportStep) else ():
                if exported.setdefault(fmt, index) != index:
                    raise ValueError(f"steps.{index}.formats: {fmt!r} is already exported by step {exported[fmt]}; "
                                     "each format comes from one export step")
        return self


class Target(StrictModel):
    """Where the compressed model will run: it is measured there, and its format follows the runtime."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"runtime": "onnxruntime", "device": "cpu"}]})

    runtime: Literal["onnxruntime", "pytorch"] = Field(default="onnxruntime", description="the model artifact is "
                                                                                          "ONNX, or a `.pt2`")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="`cuda` jobs go to the `gpu` queue, served "
                                                                      "only by workers with a GPU")

    @property
    def queue(self) -> Queue:
        """CUDA jobs go to the `gpu` queue, served only by workers that have a GPU."""
        return Queue.for_device(self.device)


class DatasetRefs(StrictModel):
    """The tenant's datasets a job uses, by role (dataset ids)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"calibration": "ds_0193a1b2c3d4e5f60718293a",
                                                               "eval": "ds_0193a1b2c3d4f0e1d2c3b4a5"}]})

    calibration: Id | None = Field(default=None, description="inputs for static int8, smoothing, GPTQ and "
                                                              "activation-aware pruning (and for judging fidelity "
                                                              "when there is no eval dataset)")
    train: Id | None = Field(default=None, description="samples for `distill` and `finetune`")
    eval: Id | None = Field(default=None, description="inputs the original and compressed models are compared on; "
                                                      "with labels, accuracy too (without it, generated inputs)")


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
        if isinstance(step, PruneStep) and step.method in CALIBRATED_PRUNING and not datasets.calibration:
            raise ValueError(f"datasets.calibration: {where} ({step.method} pruning) needs a calibration dataset")


# A Hugging Face model distilled on unlabelled text (an encoder's hidden states, say) gets these for the distill
# fields the step leaves out: the teacher's outputs are the only target (alpha 1), a learning rate that moves a
# student initialised from the teacher without undoing it, enough epochs for early stopping to end the training,
# and layer-to-layer transfer where the layers pair up (in recovery of all-MiniLM-L6-v2 50% on real prose it added
# a little but consistently: held-out embedding cosine after 2 epochs 0.948 without, 0.951 at weight 1, 0.952 at 4).
# No dropout and a linearly decaying learning rate: the student fits the teacher, not labels (MiniLM 50% recovered
# for 3 epochs: 0.966 held-out embedding cosine without dropout, 0.957 with it; 0.974 after 8 with linear decay).
ENCODER_DEFAULTS = {"alpha": 1.0, "lr": 3e-4, "epochs": 8, "early_stopping": 2, "layer_weight": 1.0,
                    "dropout": False, "lr_schedule": "linear"}


def encoder_defaults_left_out(step: "DistillStep") -> dict:
    """The ENCODER_DEFAULTS for the fields `step` leaves out (a null counts as left out: they default to null)."""
    return {name: value for name, value in ENCODER_DEFAULTS.items()
            if name not in step.model_fields_set or getattr(step, name) is None}


def with_encoder_defaults(recipe: Recipe, model_format: str, train_has_labels: bool | None) -> Recipe:
    """The recipe with the encoder defaults filled into its distill steps when a Hugging Face model trains on an
    unlabelled train dataset; resolved at submission, so the job shows what it will run."""
    if model_format != "hf" or train_has_labels is not False:
        return recipe
    steps = [step.model_copy(update=encoder_defaults_left_out(step)) if isinstance(step, DistillStep) else step
             for step in recipe.steps]
    return recipe.model_copy(update={"steps": steps})


def check_recipe_for_model(recipe: Recipe, target: Target, model_format: str) -> None:
    """What an uploaded model's format allows: ONNX uploads have no PyTorch form to prune or export from."""
    if model_format == "onnx":
        if target.runtime != "onnxruntime":
            raise ValueError("target.runtime: an ONNX model can only be compressed for 'onnxruntime'")
        for index, step in enumerate(recipe.steps):
            if isinstance(step, PruneStep) and step.method != "magnitude":
                raise ValueError(f"recipe.steps.{index}.method: {step.method!r} pruning needs a PyTorch model "
                                 "(.pt2 or Hugging Face); ONNX models support magnitude pruning")
            if isinstance(step, PruneStep) and step.embeddings:
                raise ValueError(f"recipe.steps.{index}.embeddings: pruning embedding tables needs a PyTorch model "
                                 "(.pt2 or Hugging Face); an ONNX model is pruned at its MatMul, Gemm and Conv "
                                 "weights only")
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

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"metric": "accuracy", "max_loss": 0.01, "objective": "size", "max_trials": 8, "time_budget_s": 900}]})

    # perplexity (causal LMs on a .jsonl text eval set): lower is better, max_loss bounds its relative increase
    metric: Literal["accuracy", "fidelity", "perplexity"] = Field(
        default="fidelity", description="what a trial is judged on: output cosine against the original, accuracy "
                                        "(labelled `datasets.eval`), or perplexity (causal LMs, `.jsonl` eval texts; "
                                        "lower is better)")
    max_loss: float = Field(default=0.01, ge=0.0, le=1.0, description="the relative loss of the metric allowed "
                                                                      "against the original")
    objective: Literal["size", "latency"] = Field(default="size", description="what the best trial minimises among "
                                                                              "those within `max_loss`")
    max_trials: int = Field(default=8, ge=1, le=100, description="at most this many candidates are tried, in order")
    time_budget_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600,
                                        description="stop trying candidates once this many seconds are spent",
                                        examples=[900])
    search: list[Recipe] | None = Field(default=None, min_length=1, max_length=100,
                                        description="the candidate recipes, in order; without it (and without a "
                                                    "recipe) the service generates them from cheap to aggressive")
