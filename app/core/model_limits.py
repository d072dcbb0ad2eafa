"""What a job may ask of a model, judged from the model's inspected `info` (the API cannot load models).

Two rules: a model whose ONNX form would pass protobuf's 2 GiB limit cannot be compressed for ONNX Runtime (the
pytorch target is fine), and encoder-decoder models (T5 family) take the steps that work on their two ONNX graphs.
The worker applies the same rules to the model it loads, in case `info` was missing at submission.
"""

from typing import Any

from app.core.recipe import AnalyzeStep, ExportStep, PruneStep, QuantizeStep, Recipe, Target

ONNX_MAX_BYTES = 2 * 1024**3  # protobuf's limit on one serialized message: a single .onnx file
ONNX_BYTES_PER_PARAM = 4  # torch models are exported in fp32 (Hugging Face models are loaded as fp32)
# info.architecture.task of Hugging Face models the pipeline treats specially (worker.formats.hf)
CAUSAL_LM_TASK = "causal-lm"  # perplexity on texts
SEQ2SEQ_TASK = "seq2seq-lm"  # two ONNX graphs


def onnx_bytes_estimate(info: dict[str, Any]) -> int:
    return int(info.get("params") or 0) * ONNX_BYTES_PER_PARAM


def needs_onnx(recipe: Recipe, target: Target) -> bool:
    """Whether the job makes an ONNX file of the model: the onnxruntime target, or an 'onnx' export."""
    return target.runtime == "onnxruntime" or any(
        isinstance(step, ExportStep) and "onnx" in step.formats for step in recipe.steps)


def is_seq2seq(info: dict[str, Any] | None) -> bool:
    return bool(info) and (info.get("architecture") or {}).get("task") == SEQ2SEQ_TASK


def check_recipe_for_info(recipe: Recipe, target: Target, model_format: str, info: dict[str, Any] | None) -> None:
    """Raises ValueError naming the field when the model (as inspected) cannot take the recipe."""
    if not info:
        return
    estimate = onnx_bytes_estimate(info)
    if model_format != "onnx" and estimate > ONNX_MAX_BYTES and needs_onnx(recipe, target):
        raise ValueError(f"target.runtime: the model has {info['params']:,} parameters, about "
                         f"{estimate / 1024**3:.1f} GiB as fp32 ONNX: too large for a single ONNX file (protobuf's "
                         "2 GiB limit); compress it with target.runtime 'pytorch' and no 'onnx' export")
    if is_seq2seq(info):
        _check_seq2seq(recipe, target)


def _check_seq2seq(recipe: Recipe, target: Target) -> None:
    """Encoder-decoders become two ONNX graphs (encoder, decoder): int8 dynamic and weight-only round-to-nearest
    apply to each; calibrated methods, training and the pytorch target do not (yet)."""
    what = "encoder-decoder models (T5 family)"
    if target.runtime != "onnxruntime":
        raise ValueError(f"target.runtime: {what} are compressed for 'onnxruntime' only (an encoder and a decoder "
                         "graph)")
    quantized = False
    for index, step in enumerate(recipe.steps):
        where = f"recipe.steps.{index}"
        if isinstance(step, QuantizeStep):
            quantized = True
            if step.method == "static" or step.smoothing is not None or step.algorithm != "rtn":
                raise ValueError(f"{where}: calibrated or searched rounding (static, smoothing, gptq, hqq) is not "
                                 f"available for {what} yet; use method 'dynamic' or weight-only round-to-nearest")
        elif isinstance(step, PruneStep):
            if step.method != "magnitude":
                raise ValueError(f"{where}.method: {step.method!r} pruning is not available for {what}; "
                                 "use 'magnitude'")
        elif isinstance(step, AnalyzeStep) and quantized:
            raise ValueError(f"{where}: analyze after quantize is not available for {what} (two graphs); "
                             "analyze before quantizing")
        elif isinstance(step, ExportStep):
            if "pt2" in step.formats:
                raise ValueError(f"{where}.formats: 'pt2' is not available for {what}")
        elif step.op in ("distill", "finetune"):
            raise ValueError(f"{where}.op: {step.op} is not available for {what} yet")
