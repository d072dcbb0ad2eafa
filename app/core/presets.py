"""Named recipes for the common goals, listed by GET /v1/presets and usable as `"preset": name` in a job."""

from dataclasses import dataclass
from typing import Any

from app.core.recipe import DistillStep, FinetuneStep, PruneStep, QuantizeStep, Recipe, Shrink, Student

# fast-encoder's student, also a tune candidate: on all-MiniLM-L6-v2 and real prose (int8, batch 16, 2 threads)
# three full-width layers ran 1.63x the original's int8 through the API, at held-out embedding cosine 0.929 (trained
# on 1,800 sentences without dropout and with a decaying learning rate, 8 epochs, then int8). Four layers at 0.75
# width reached 0.942 but ran only 1.39x (see docs/benchmarks.md).
FAST_ENCODER_STUDENT = Student(shrink=Shrink(depth=0.5, width=1.0))


@dataclass(frozen=True)
class Preset:
    description: str
    needs: tuple[str, ...]  # dataset roles the job must give
    recipe: Recipe
    # The job's fidelity floor when it gives none: set by presets that knowingly trade fidelity for size.
    min_fidelity: float | None = None

    def public(self, name: str) -> dict[str, Any]:
        """As GET /v1/presets shows it: the recipe with the fields the preset sets (the rest are defaults)."""
        return {"name": name, "description": self.description, "needs": list(self.needs),
                "recipe": self.recipe.model_dump(mode="json", exclude_unset=True), "min_fidelity": self.min_fidelity}


def _int8() -> QuantizeStep:
    return QuantizeStep(op="quantize", method="dynamic", dtype="int8")


PRESETS: dict[str, Preset] = {
    "int8-cpu": Preset(
        "int8 with per-channel weights for ONNX Runtime on CPU, the method chosen by model family and measured: "
        "static QDQ for convolutional nets (calibrated on your calibration dataset, else on the evaluation "
        "inputs), dynamic for transformers and recurrent nets, the other tried when the first is not faster "
        "than fp32 at output cosine 0.99. About 4x smaller. The safe default.", (),
        Recipe(steps=[QuantizeStep(op="quantize", method="auto", dtype="int8", granularity="per_channel")])),
    "int8-faithful": Preset(
        "Dynamic int8 with activation smoothing (SmoothQuant-style: outlier activation channels are divided out "
        "and folded into the weights, the strength chosen on your data): int8's size at nearly its speed, and "
        "far closer to the original on transformers (all-MiniLM-L6-v2 embedding cosine 0.997 against 0.993 for "
        "plain int8). Needs a calibration dataset: a few hundred samples like the ones the model will see (for "
        "a text model, a .jsonl of sentences). ONNX Runtime target.", ("calibration",),
        Recipe(steps=[QuantizeStep(op="quantize", method="dynamic", dtype="int8", granularity="per_channel",
                                   smoothing="auto")])),
    "int8-static-cpu": Preset(
        "Static int8 (QDQ) with activations calibrated on your data: no run-time range pass, MatMul outputs and "
        "residuals kept exact (all-MiniLM-L6-v2 embedding cosine 0.993, as dynamic int8). Needs a calibration "
        "dataset representative of what the model will see. ONNX Runtime target.", ("calibration",),
        Recipe(steps=[QuantizeStep(op="quantize", method="static", dtype="int8")])),
    "sparse50-int8": Preset(
        "50% SparseGPT pruning (the weights whose removal costs least on your calibration data, the rest "
        "corrected to make up for them), then dynamic int8, with no training to recover: the job's fidelity "
        "floor is output cosine 0.8 unless it sets min_fidelity. The file is delivered compressed.",
        ("calibration",),
        Recipe(steps=[PruneStep(op="prune", method="sparsegpt", sparsity=0.5), _int8()]), min_fidelity=0.8),
    "sparse50-finetune-int8": Preset(
        "50% magnitude pruning, fine-tuning that keeps the pruning masks, then dynamic int8.", ("train",),
        Recipe(steps=[PruneStep(op="prune", method="magnitude", sparsity=0.5),
                      FinetuneStep(op="finetune", epochs=3, lr=1e-4), _int8()])),
    "distill-half-int8": Preset(
        "Distil into a student with half the layers (transformers) initialised from the teacher's, then dynamic "
        "int8.", ("train",),
        Recipe(steps=[DistillStep(op="distill", student=Student(shrink=Shrink(depth=0.5)), epochs=3,
                                  temperature=2.0, alpha=0.5), _int8()])),
    "narrow-half-int8": Preset(
        "Distil into a student with half the width (MLP/CNN models), then dynamic int8.", ("train",),
        Recipe(steps=[DistillStep(op="distill", student=Student(shrink=Shrink(width=0.5)), epochs=5,
                                  temperature=2.0, alpha=0.7), _int8()])),
    "fast-encoder": Preset(
        "A faster student of a Hugging Face encoder, trained on your unlabelled text: half of the layers (those "
        "whose removal changes the output least on your texts; full width), distilled from the original "
        "(mean-pooled embedding cosine and hidden states over real tokens, early stopping on a tenth of the texts "
        "held out), then int8. all-MiniLM-L6-v2 on 2,000 sentences of real prose: see docs/benchmarks.md for its "
        "speed and embedding cosine against ONNX Runtime's int8 of the original. Needs a train dataset of "
        "unlabelled texts (a .jsonl of sentences like the ones the model will see; a thousand or more).",
        ("train",),
        Recipe(steps=[DistillStep(op="distill", student=FAST_ENCODER_STUDENT, alpha=1.0, lr=3e-4, epochs=8,
                                  early_stopping=2),
                      QuantizeStep(op="quantize", method="auto", dtype="int8")])),
    "int4-weights": Preset(
        "Weight-only int4 in groups of 32 (MatMulNBits for ONNX Runtime; packed int4 for PyTorch): about 7x "
        "smaller weights; on CPU not always faster.", (),
        Recipe(steps=[QuantizeStep(op="quantize", method="weight_only", dtype="int4", granularity="group",
                                   group_size=32)])),
    "int4-gptq": Preset(
        "Weight-only int4 in groups of 32, rounded by GPTQ on your data (each rounding error is compensated by "
        "the weights not yet rounded, so the layer's output on real inputs moves least): int4's size, far closer "
        "to the original than rounding to nearest (all-MiniLM-L6-v2 embedding cosine 0.997 against 0.971). Needs "
        "a calibration dataset: a few hundred samples like the ones the model will see. ONNX Runtime target.",
        ("calibration",),
        Recipe(steps=[QuantizeStep(op="quantize", method="weight_only", dtype="int4", group_size=32,
                                   algorithm="gptq")])),
}


def preset_recipe(name: str) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name].recipe.model_copy(deep=True)
