"""Recipe rules that depend on more than one field."""

import pytest
from pydantic import ValidationError

from app.core.recipe import QuantizeStep


def test_a_group_size_implies_groups() -> None:
    step = QuantizeStep(op="quantize", method="weight_only", dtype="int4", group_size=32)
    assert (step.granularity, step.group_size) == ("group", 32)
    assert QuantizeStep(op="quantize", method="weight_only", granularity="group").group_size == 128


def test_a_group_size_with_another_granularity_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match="group_size needs granularity 'group'"):
        QuantizeStep(op="quantize", method="weight_only", dtype="int4", granularity="per_channel", group_size=32)


def test_a_data_aware_algorithm_implies_groups() -> None:
    step = QuantizeStep(op="quantize", method="weight_only", dtype="int4", algorithm="gptq")
    assert (step.granularity, step.group_size) == ("group", 128)
    assert QuantizeStep(op="quantize", method="weight_only", dtype="int4", algorithm="hqq",
                        group_size=32).group_size == 32


@pytest.mark.parametrize("fields, message", [
    ({"method": "dynamic", "algorithm": "gptq"}, "algorithm 'gptq' applies to method 'weight_only' with dtype 'int4'"),
    ({"method": "weight_only", "dtype": "int8", "algorithm": "hqq"}, "applies to method 'weight_only' with dtype"),
    ({"method": "weight_only", "dtype": "int4", "algorithm": "gptq", "granularity": "per_channel"},
     "quantizes in groups"),
    ({"method": "weight_only", "dtype": "int4", "algorithm": "awq"}, "algorithm"),
])
def test_an_algorithm_where_it_does_not_apply_is_refused(fields, message) -> None:
    with pytest.raises(ValidationError, match=message):
        QuantizeStep(op="quantize", **fields)


def test_int8_defaults_to_auto_and_other_dtypes_keep_their_method() -> None:
    assert QuantizeStep(op="quantize").method == "auto"
    assert QuantizeStep(op="quantize", dtype="int8", method="static").method == "static"
    assert QuantizeStep(op="quantize", dtype="fp16").method == "dynamic"  # a cast: method unused, as before
    assert QuantizeStep(op="quantize", smoothing="auto").method == "dynamic"
    with pytest.raises(ValidationError, match="dtype 'int4' needs method 'weight_only'"):
        QuantizeStep(op="quantize", dtype="int4")


@pytest.mark.parametrize("fields", [{"dtype": "fp16"}, {"smoothing": 0.5}])
def test_an_explicit_auto_outside_int8_is_refused(fields) -> None:
    with pytest.raises(ValidationError, match="method 'auto' chooses between the int8 methods"):
        QuantizeStep(op="quantize", method="auto", **fields)


def test_the_int8_cpu_preset_chooses_auto() -> None:
    from app.core.presets import PRESETS, preset_recipe

    assert preset_recipe("int8-cpu").steps[0].method == "auto"
    assert PRESETS["int8-cpu"].public("int8-cpu")["recipe"]["steps"][0]["method"] == "auto"

def test_a_student_is_exactly_one_of_model_id_shrink_and_current() -> None:
    from app.core.recipe import Recipe, Student, Target, check_recipe_for_model

    assert Student(current=True).current
    for fields in ({}, {"current": False}, {"current": True, "model_id": "mdl_x"},
                   {"model_id": "mdl_x", "shrink": {"depth": 0.5}}):
        with pytest.raises(ValidationError, match="exactly one of model_id"):
            Student(**fields)
    recovery = Recipe(steps=[{"op": "prune", "sparsity": 0.5}, {"op": "distill", "student": {"current": True}}])
    with pytest.raises(ValueError, match=r"recipe.steps.1.op: distill needs a PyTorch model"):
        check_recipe_for_model(recovery, Target(), "onnx")
    check_recipe_for_model(recovery, Target(), "hf")


def test_sparsegpt_pruning_needs_a_pytorch_model() -> None:
    from app.core.recipe import Recipe, Target, check_recipe_for_model

    recipe = Recipe(steps=[{"op": "prune", "method": "sparsegpt", "pattern": "2:4"}])
    assert recipe.steps[0].sparsity == 0.5
    with pytest.raises(ValueError, match=r"recipe.steps.0.method: 'sparsegpt' pruning needs a PyTorch model"):
        check_recipe_for_model(recipe, Target(), "onnx")
    check_recipe_for_model(recipe, Target(), "pt2")


def test_a_format_comes_from_one_export_step() -> None:
    from app.core.recipe import Recipe

    Recipe.model_validate({"steps": [{"op": "prune", "sparsity": 0.5}, {"op": "export", "formats": ["safetensors"]},
                                     {"op": "quantize"}, {"op": "export", "formats": ["onnx"]}]})
    with pytest.raises(ValidationError, match=r"steps.3.formats: 'safetensors' is already exported by step 1"):
        Recipe.model_validate({"steps": [{"op": "prune", "sparsity": 0.5}, {"op": "export", "formats": ["safetensors"]},
                                         {"op": "quantize"}, {"op": "export", "formats": ["safetensors"]}]})


def test_embedding_tables_are_pruned_only_by_unstructured_or_two_four_pruning_of_pytorch_models() -> None:
    from app.core.recipe import PruneStep, Recipe, Target, check_recipe_for_model

    assert not PruneStep(op="prune", sparsity=0.5).embeddings
    assert PruneStep(op="prune", pattern="2:4", embeddings=True).embeddings
    with pytest.raises(ValidationError, match="embeddings: structured pruning removes channels"):
        PruneStep(op="prune", method="structured", sparsity=0.5, embeddings=True)
    recipe = Recipe(steps=[{"op": "prune", "sparsity": 0.5, "embeddings": True}])
    with pytest.raises(ValueError, match=r"recipe.steps.0.embeddings: pruning embedding tables needs a PyTorch"):
        check_recipe_for_model(recipe, Target(), "onnx")
    check_recipe_for_model(recipe, Target(), "hf")
