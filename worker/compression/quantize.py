"""Dynamic int8 quantization with ONNX Runtime's quantization tools.

Per-channel int8 weights are the default: on CPU they keep far more fidelity than per-tensor at the same
size (see DESIGN.md). Activations are quantized on the fly at run time.
"""

import logging
import re
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from app.schemas.recipe import QuantizeStep
from worker.errors import JobFailure

log = logging.getLogger(__name__)

QUANTIZABLE_OPS = ["MatMul", "Gemm", "Conv", "Attention", "LSTM", "GRU"]


def excluded_nodes(model_path: Path, patterns: list[str]) -> list[str]:
    """Node names matching any `exclude` regex (by node name or by the name of its weight input)."""
    if not patterns:
        return []
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise JobFailure("invalid_recipe", f"exclude: invalid regular expression: {exc}") from None
    model = onnx.load(str(model_path), load_external_data=False)
    matched = []
    for node in model.graph.node:
        names = [node.name, *node.input]
        if any(rx.search(n) for rx in compiled for n in names if n):
            matched.append(node.name)
    return matched


def quantize_dynamic_int8(source: Path, destination: Path, step: QuantizeStep) -> dict:
    prepared = destination.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:  # pre-processing only helps; quantize the model as it is when it fails
        log.info("quantization pre-processing skipped: %s", exc)
        prepared = source
    exclude = excluded_nodes(prepared, step.exclude)
    # ONNX Runtime rewrites Gemm as MatMul + Add before quantizing, naming the MatMul "<gemm name>_MatMul".
    exclude_with_rewrites = exclude + [f"{name}_MatMul" for name in exclude]
    try:
        quantize_dynamic(str(prepared), str(destination), weight_type=QuantType.QInt8,
                         per_channel=step.granularity == "per_channel", op_types_to_quantize=QUANTIZABLE_OPS,
                         nodes_to_exclude=exclude_with_rewrites, extra_options={"MatMulConstBOnly": True})
    except Exception as exc:
        raise JobFailure("quantization_failed", f"ONNX Runtime quantization failed: {exc.__class__.__name__}: "
                                                f"{str(exc)[:300]}") from None
    finally:
        if prepared != source:
            prepared.unlink(missing_ok=True)
    return {"method": "dynamic", "dtype": "int8", "granularity": step.granularity, "excluded_nodes": exclude,
            "tool": "onnxruntime.quantization.quantize_dynamic"}
