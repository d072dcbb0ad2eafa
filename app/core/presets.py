"""Named recipes for the common goals, listed by GET /v1/presets and usable as `"preset": name` in a job."""

from typing import Any

from app.core.recipe import Recipe

PRESETS: dict[str, dict[str, Any]] = {
    "int8-cpu": {
        "description": "Dynamic int8 with per-channel weights for ONNX Runtime on CPU: about 4x smaller, faster on "
                       "CPU, output cosine typically above 0.99. The safe default.",
        "needs": [],
        "recipe": {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8",
                              "granularity": "per_channel"}]},
    },
    "int8-static-cpu": {
        "description": "Static int8 (QDQ) with activations calibrated on your data: the fastest int8 on CPU where "
                       "the calibration data is representative.",
        "needs": ["calibration"],
        "recipe": {"steps": [{"op": "quantize", "method": "static", "dtype": "int8"}]},
    },
    "sparse50-int8": {
        "description": "50% activation-aware (Wanda) pruning, then dynamic int8. The file is delivered compressed.",
        "needs": ["calibration"],
        "recipe": {"steps": [{"op": "prune", "method": "activation_aware", "sparsity": 0.5},
                             {"op": "quantize", "method": "dynamic", "dtype": "int8"}]},
    },
    "sparse50-finetune-int8": {
        "description": "50% magnitude pruning, fine-tuning that keeps the pruning masks, then dynamic int8.",
        "needs": ["train"],
        "recipe": {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5},
                             {"op": "finetune", "epochs": 3, "lr": 1e-4},
                             {"op": "quantize", "method": "dynamic", "dtype": "int8"}]},
    },
    "distill-half-int8": {
        "description": "Distil into a student with half the layers (transformers) initialised from the teacher's, "
                       "then dynamic int8.",
        "needs": ["train"],
        "recipe": {"steps": [{"op": "distill", "student": {"shrink": {"depth": 0.5}}, "epochs": 3,
                              "temperature": 2.0, "alpha": 0.5},
                             {"op": "quantize", "method": "dynamic", "dtype": "int8"}]},
    },
    "narrow-half-int8": {
        "description": "Distil into a student with half the width (MLP/CNN models), then dynamic int8.",
        "needs": ["train"],
        "recipe": {"steps": [{"op": "distill", "student": {"shrink": {"width": 0.5}}, "epochs": 5,
                              "temperature": 2.0, "alpha": 0.7},
                             {"op": "quantize", "method": "dynamic", "dtype": "int8"}]},
    },
    "int4-weights": {
        "description": "Weight-only int4 in groups of 32 (MatMulNBits for ONNX Runtime; packed int4 for PyTorch): "
                       "about 7x smaller weights; on CPU not always faster.",
        "needs": [],
        "recipe": {"steps": [{"op": "quantize", "method": "weight_only", "dtype": "int4", "granularity": "group",
                              "group_size": 32}]},
    },
}


def preset_recipe(name: str) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return Recipe.model_validate(PRESETS[name]["recipe"])
