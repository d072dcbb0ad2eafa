"""Tuning's candidate recipes, from cheap and safe to aggressive: what a `tune` job would try, in order.

The worker's search (worker.pipeline.tuning) tries them; a dry run (`POST /v1/jobs` with `dry_run`) shows them.
Both take the same list: generated from the job's datasets, the model's format and layers and the objective,
less those the target, the model's format or its inspected info refuse.
"""

import json
import re
from typing import Any

from app.core.model_limits import check_recipe_for_info
from app.core.presets import FAST_ENCODER_STUDENT
from app.core.recipe import (
    DatasetRefs,
    DistillStep,
    PruneStep,
    QuantizeStep,
    Recipe,
    Student,
    Target,
    check_recipe_for_model,
    check_recipe_for_target,
)


def _int8(granularity: str = "per_channel") -> QuantizeStep:
    return QuantizeStep(op="quantize", method="dynamic", dtype="int8", granularity=granularity)


def _int8_auto() -> QuantizeStep:
    return QuantizeStep(op="quantize", method="auto", dtype="int8")


def _distill(student: Student) -> DistillStep:
    """On the teacher's outputs alone (train data may have no labels), stopping when held-out loss stops falling;
    lr and epochs are the step's defaults (for Hugging Face models on unlabelled text, the encoder defaults)."""
    return DistillStep(op="distill", student=student, alpha=1.0, early_stopping=2)


def _prune(method: str, sparsity: float, exclude: list[str]) -> PruneStep:
    return PruneStep(op="prune", method=method, sparsity=sparsity, scope="layer", exclude=exclude)


def _unique(recipes: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for recipe in recipes:
        key = json.dumps(recipe, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(recipe)
    return unique


def candidate_recipes(search: list[dict] | None, *, has_calibration: bool, model_kind: str,
                      layer_names: list[str], has_train: bool = False, objective: str = "size") -> list[dict]:
    """The user's `search` recipes when given (in their order, exact repeats dropped), else generated ones from
    cheap and safe to aggressive, so a small `max_trials` still tries the likeliest winners first.

    Generated pruning keeps the last layer in `layer_names` (the output head, in graph order: the layer most
    sensitive to pruning and a small share of the weights) dense. Activation-aware and SparseGPT pruning (the
    latter where no training follows: recovery evens out their difference) need calibration data and a PyTorch
    model; smoothed and static int8 and GPTQ int4 need calibration data; weight-only int4 is
    offered for PyTorch models (`model_kind` other than "onnx"), where it is the smallest file for the pytorch
    target. For latency with train data, a PyTorch model also gets, right after plain int8, the likeliest faster
    models: preset fast-encoder's student (half of the layers, chosen by measurement) distilled on the train data,
    and (with calibration data) activation-aware 50% pruning recovered by distillation, both then int8. Generated
    recipes are built as Recipe objects and reported with the fields they set.
    """
    if search:
        return _unique([dict(recipe) for recipe in search])
    head = [f"^{re.escape(layer_names[-1])}$"] if len(layer_names) > 1 else []
    torch_model = model_kind != "onnx"
    recipes = [Recipe(steps=[_int8()])]
    if has_train and torch_model and objective == "latency":
        recipes.append(Recipe(steps=[_distill(FAST_ENCODER_STUDENT), _int8_auto()]))
        if has_calibration:
            recipes.append(Recipe(steps=[_prune("activation_aware", 0.5, head), _distill(Student(current=True)),
                                         _int8_auto()]))
    if has_calibration:  # the most faithful int8 at int8's size (onnxruntime target only)
        recipes.append(Recipe(steps=[QuantizeStep(op="quantize", method="dynamic", dtype="int8",
                                                  granularity="per_channel", smoothing="auto")]))
    recipes += [Recipe(steps=[_int8("per_tensor")]), Recipe(steps=[_prune("magnitude", 0.3, head), _int8()])]
    if has_calibration and torch_model:
        recipes.append(Recipe(steps=[_prune("sparsegpt", 0.5, head), _int8()]))
    if has_calibration:
        recipes.append(Recipe(steps=[QuantizeStep(op="quantize", method="static", dtype="int8",
                                                  granularity="per_channel")]))
    recipes.append(Recipe(steps=[_prune("magnitude", 0.5, head), _int8()]))
    if torch_model and has_calibration:  # int4's size, GPTQ's fidelity (onnxruntime target only)
        recipes.append(Recipe(steps=[QuantizeStep(op="quantize", method="weight_only", dtype="int4",
                                                  group_size=32, algorithm="gptq")]))
    if torch_model:
        recipes.append(Recipe(steps=[QuantizeStep(op="quantize", method="weight_only", dtype="int4",
                                                  granularity="group", group_size=32)]))
    return _unique([recipe.model_dump(mode="json", exclude_unset=True) for recipe in recipes])



def job_candidates(user: list[Recipe], *, target: Target, datasets: DatasetRefs, model_format: str,
                   info: dict[str, Any] | None, layer_names: list[str], objective: str) -> list[dict]:
    """The recipes a tune job tries, in order: the job's recipe and `search` (or generated ones), less those its
    target, the model's format or the model's inspected info refuse."""
    generated = candidate_recipes([r.model_dump(mode="json") for r in user] or None,
                                  has_calibration=datasets.calibration is not None,
                                  model_kind="onnx" if model_format == "onnx" else "torch",
                                  layer_names=layer_names, has_train=datasets.train is not None, objective=objective)
    candidates = []
    for recipe in generated:
        try:
            parsed = Recipe.model_validate(recipe)
            check_recipe_for_target(parsed, target, datasets)
            check_recipe_for_model(parsed, target, model_format)
            check_recipe_for_info(parsed, target, model_format, info)
            candidates.append(recipe)
        except ValueError:
            continue  # a generated candidate this model or target cannot take
    return candidates
