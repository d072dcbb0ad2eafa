import pytest

from app.core.model_limits import check_recipe_for_info
from app.core.recipe import Recipe, Target

INT8 = Recipe(steps=[{"op": "quantize"}])
ORT, PYTORCH = Target(runtime="onnxruntime"), Target(runtime="pytorch")
HUGE = {"params": 600_000_000}  # 2.2 GiB as fp32
T5 = {"params": 1000, "architecture": {"task": "seq2seq-lm"}}


def test_onnx_size_limit_applies_when_the_job_makes_onnx():
    with pytest.raises(ValueError, match="^target.runtime: .* too large for a single ONNX file"):
        check_recipe_for_info(INT8, ORT, "hf", HUGE)
    check_recipe_for_info(INT8, PYTORCH, "pt2", HUGE)
    with pytest.raises(ValueError, match="too large"):
        check_recipe_for_info(Recipe(steps=[{"op": "export", "formats": ["onnx"]}]), PYTORCH, "pt2", HUGE)
    check_recipe_for_info(INT8, ORT, "onnx", HUGE)  # already ONNX (external data): nothing to export
    check_recipe_for_info(INT8, ORT, "hf", None)  # not inspected yet: the worker checks


@pytest.mark.parametrize("steps, allowed", [
    ([{"op": "quantize"}], True),
    ([{"op": "prune", "sparsity": 0.5}, {"op": "quantize", "method": "weight_only", "dtype": "int4",
                                          "group_size": 32}], True),
    ([{"op": "analyze"}, {"op": "quantize"}, {"op": "export", "formats": ["onnx"]}], True),
    ([{"op": "quantize"}, {"op": "analyze"}], False),
    ([{"op": "quantize", "method": "static"}], False),
    ([{"op": "quantize", "smoothing": 0.5}], False),
    ([{"op": "prune", "method": "structured", "sparsity": 0.5}], False),
    ([{"op": "finetune", "epochs": 1}], False),
])
def test_encoder_decoder_steps(steps, allowed):
    recipe = Recipe(steps=steps)
    if allowed:
        check_recipe_for_info(recipe, ORT, "hf", T5)
    else:
        with pytest.raises(ValueError, match="encoder-decoder"):
            check_recipe_for_info(recipe, ORT, "hf", T5)
