"""Tuning's candidate recipes (what a tune job tries, and a dry run shows)."""

import json

from app.core.recipe import DatasetRefs, Recipe, Target
from app.core.tuning import candidate_recipes, job_candidates


def steps(recipe):
    return [(s["op"], s["method"], s.get("dtype"), s.get("sparsity"), s.get("granularity")) for s in recipe["steps"]]


def test_generated_candidates_go_from_safe_to_aggressive():
    recipes = candidate_recipes(None, has_calibration=True, model_kind="pt2", layer_names=["0", "2", "4"])
    int8 = ("quantize", "dynamic", "int8", None, "per_channel")
    assert [steps(r) for r in recipes] == [
        [int8],
        [int8],  # with smoothing
        [("quantize", "dynamic", "int8", None, "per_tensor")],
        [("prune", "magnitude", None, 0.3, None), int8],
        [("prune", "sparsegpt", None, 0.5, None), int8],
        [("quantize", "static", "int8", None, "per_channel")],
        [("prune", "magnitude", None, 0.5, None), int8],
        [("quantize", "weight_only", "int4", None, "group")],  # GPTQ
        [("quantize", "weight_only", "int4", None, "group")],
    ]
    assert recipes[-1]["steps"][0]["group_size"] == 32 and "algorithm" not in recipes[-1]["steps"][0]
    assert recipes[-2]["steps"][0]["algorithm"] == "gptq"
    assert recipes[1]["steps"][0]["smoothing"] == "auto"
    assert all(r["steps"][0]["exclude"] == ["^4$"] for r in recipes if r["steps"][0]["op"] == "prune")  # the head
    assert len({json.dumps(r, sort_keys=True) for r in recipes}) == len(recipes)
    for recipe in recipes:
        Recipe.model_validate(recipe)


def test_candidates_depend_on_calibration_and_model_kind():
    onnx = candidate_recipes(None, has_calibration=True, model_kind="onnx", layer_names=["node_a", "node_b"])
    methods = [[s["method"] for s in r["steps"]] for r in onnx]
    assert ["sparsegpt", "dynamic"] not in methods and ["weight_only"] not in methods
    assert ["static"] in methods
    plain = candidate_recipes(None, has_calibration=False, model_kind="pt2", layer_names=["fc"])
    methods = [[s["method"] for s in r["steps"]] for r in plain]
    assert methods == [["dynamic"], ["dynamic"], ["magnitude", "dynamic"], ["magnitude", "dynamic"], ["weight_only"]]
    assert plain[2]["steps"][0]["exclude"] == []  # a single layer is not kept out of its own pruning


def test_user_search_recipes_come_as_given():
    user = [{"steps": [{"op": "quantize", "dtype": "fp16"}]}, {"steps": [{"op": "quantize"}]},
            {"steps": [{"op": "quantize", "dtype": "fp16"}]}]
    assert candidate_recipes(user, has_calibration=True, model_kind="pt2", layer_names=["a", "b"]) == user[:2]


def test_latency_with_train_data_tries_a_student_and_recovered_pruning_right_after_int8():
    recipes = candidate_recipes(None, has_calibration=True, model_kind="hf", layer_names=["a", "head"],
                                has_train=True, objective="latency")
    ops = [[step["op"] for step in recipe["steps"]] for recipe in recipes]
    assert ops[:3] == [["quantize"], ["distill", "quantize"], ["prune", "distill", "quantize"]]
    assert recipes[1]["steps"][0]["student"] == {"shrink": {"depth": 0.5, "width": 1.0}}
    assert recipes[2]["steps"][1]["student"] == {"current": True}
    assert recipes[2]["steps"][0]["method"] == "activation_aware"
    for objective, has_train in (("size", True), ("latency", False)):
        assert not any(step["op"] == "distill" for recipe in candidate_recipes(
            None, has_calibration=True, model_kind="hf", layer_names=["a", "head"], has_train=has_train,
            objective=objective) for step in recipe["steps"])


def test_job_candidates_leave_out_what_the_target_or_model_refuses():
    """The worker's list and a dry run's: static, smoothed and GPTQ int8/int4 need ONNX Runtime; an ONNX model
    takes no activation-aware pruning or int4; a user's recipe comes first, as given."""
    pt2 = {"architecture": {"layers": ["0", "2"]}, "params": 100}
    calibrated = DatasetRefs(calibration="ds_c")
    pytorch = job_candidates([], target=Target(runtime="pytorch"), datasets=calibrated, model_format="pt2",
                             info=pt2, layer_names=["0", "2"], objective="size")
    quantize = [r["steps"][-1] for r in pytorch]
    assert not any(s.get("method") == "static" or s.get("smoothing") or s.get("algorithm") for s in quantize)
    assert ["weight_only"] in [[s["method"] for s in r["steps"]] for r in pytorch]
    onnx = job_candidates([], target=Target(), datasets=calibrated, model_format="onnx", info={"params": 100},
                          layer_names=[], objective="size")
    assert candidate_recipes(None, has_calibration=True, model_kind="onnx", layer_names=[]) == onnx
    user = Recipe.model_validate({"steps": [{"op": "quantize", "method": "dynamic"}]})
    assert job_candidates([user], target=Target(), datasets=DatasetRefs(), model_format="onnx", info=None,
                          layer_names=[], objective="size") == [user.model_dump(mode="json")]
