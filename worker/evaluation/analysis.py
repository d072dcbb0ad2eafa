"""The `analyze` step: per-layer weight statistics, per-layer sensitivity, and a suggested recipe.

Sensitivity of a layer is how much the model's outputs move when that layer alone is compressed, with the
other layers untouched: d = 1 - mean cosine similarity (outputs flattened per sample) against the unmodified
model, for three variants: `int8` (symmetric, per output channel), `int4` (symmetric, groups of 32 inputs, or per
output channel when 32 does not divide the input width) and `prune50` (the 50% smallest-magnitude weights
zeroed). Layers are Linear/Conv2d modules for torch models and the weight initializers of MatMul/Gemm/Conv nodes
for ONNX models; every weight is restored exactly afterwards.

The suggested recipe follows fixed rules (constants below) so that a user can see why each choice was made:
- quantize: dynamic int8 per channel, excluding layers whose int8 sensitivity is an outlier
  (> OUTLIER_FACTOR x the median and > OUTLIER_FLOOR);
- prune (magnitude, per layer): layers with prune50 sensitivity >= PRUNE_HIGH stay dense; the others are pruned to
  50% when all of them are below PRUNE_LOW, else to 30%; no prune step when no layer qualifies;
- torch models whose int4 sensitivity is below INT4_TINY everywhere get weight-only int4 (group 32) for the
  pytorch target as an alternative in the rationale.
`exclude` entries are exact, anchored names: the ONNX node name for ONNX models; for torch models both the module
name (`^fc$`, what pruning and the pytorch target match) and its weight's name (`^fc\\.weight$`, what the ONNX
file made for the onnxruntime target names it). No recipe (None) is suggested for a model without such layers.
"""

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from app.core.recipe import PruneStep, QuantizeStep, Recipe
from worker.compression.modules import count_weights, quantize_weight
from worker.compression.prune import ONNX_WEIGHT_INPUTS, PRUNABLE
from worker.formats.onnx_format import count_params
from worker.runtime import run_onnx

MAX_BATCHES = 4  # sensitivity runs 3 variants per layer over these batches: keep it bounded
MAX_LAYERS = 64  # beyond this, only the largest layers get a sensitivity
INT4_GROUP = 32
VARIANTS = ("int8", "int4", "prune50")
OUTLIER_FACTOR = 10.0
OUTLIER_FLOOR = 1e-3
PRUNE_LOW = 0.01  # prune50 sensitivity under this: the layer tolerates 50%
PRUNE_HIGH = 0.05  # at or above this: the layer is left dense
INT4_TINY = 1e-3

Outputs = list[list[np.ndarray]]  # per batch, the model's outputs


def _compressed_rows(rows: torch.Tensor, variant: str) -> torch.Tensor:
    """A [output channels, inputs] float32 weight as `variant` would leave it (quantized values dequantized)."""
    if variant == "prune50":
        k = rows.numel() // 2
        if k == 0:
            return rows.clone()
        cut = rows.abs().flatten().kthvalue(k).values
        return rows * (rows.abs() > cut)
    bits = 8 if variant == "int8" else 4
    group = INT4_GROUP if bits == 4 and rows.shape[1] % INT4_GROUP == 0 else None
    q, scale = quantize_weight(rows, bits, group)
    if group:
        return (q.float().reshape(rows.shape[0], -1, group) * scale.unsqueeze(2)).reshape(rows.shape)
    return q.float() * scale


def _per_sample(batches: Outputs) -> np.ndarray:
    """Rows = samples (first axis), columns = every output flattened side by side."""
    rows = []
    for outputs in batches:
        count = outputs[0].shape[0] if outputs[0].ndim else 1
        rows.append(np.concatenate([np.asarray(o, np.float64).reshape(count, -1) for o in outputs], axis=1))
    return np.concatenate(rows, axis=0)


def _distance(reference: Outputs, candidate: Outputs) -> float:
    """1 - mean per-sample cosine similarity (unrounded: int8 effects are often far below 1e-6)."""
    ref, cand = _per_sample(reference), _per_sample(candidate)
    ref_norm, cand_norm = np.linalg.norm(ref, axis=1), np.linalg.norm(cand, axis=1)
    norms = ref_norm * cand_norm
    both_zero = (ref_norm == 0) & (cand_norm == 0)
    cosine = np.where(norms > 0, (ref * cand).sum(axis=1) / np.maximum(norms, 1e-300), np.where(both_zero, 1.0, 0.0))
    return max(0.0, float(1.0 - cosine.mean()))


def _layer_stats(name: str, kind: str, values: np.ndarray, bins: int) -> dict:
    flat = values.ravel()
    counts, edges = np.histogram(flat, bins=bins)
    return {"name": name, "kind": kind, "shape": list(values.shape), "params": int(flat.size),
            "param_share": 0.0, "min": float(flat.min()), "max": float(flat.max()),
            "mean": float(flat.mean(dtype=np.float64)), "std": float(flat.std(dtype=np.float64)),
            "sparsity": float(np.count_nonzero(flat == 0) / flat.size),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}, "sensitivity": None}


def _measure(layers: list[dict], reference: Outputs, outputs_with: Callable[[int, str], Outputs],
             check: Callable[[], None]) -> list[int]:
    """Fill in the sensitivity of the largest MAX_LAYERS layers; returns their indices."""
    largest = sorted(range(len(layers)), key=lambda i: -layers[i]["params"])[:MAX_LAYERS]
    for index in sorted(largest):
        sensitivity = {}
        for variant in VARIANTS:
            check()
            sensitivity[variant] = _distance(reference, outputs_with(index, variant))
        layers[index]["sensitivity"] = sensitivity
    return sorted(largest)


def _anchored(name: str) -> str:
    return f"^{re.escape(name)}$"


def _listing(layers: list[dict], variant: str) -> str:
    return ", ".join(f"{layer['name']} ({layer['sensitivity'][variant]:.2e})" for layer in layers)


def _as_dict(recipe: Recipe) -> dict:
    """A recipe as the report shows it: the fields the suggestion sets."""
    return recipe.model_dump(mode="json", exclude_unset=True)


def _suggest(layers: list[dict], measured: list[int], quantize_patterns: Callable[[str], list[str]],
             torch_model: bool) -> tuple[dict, list[str]]:
    """The recipe and the reasons for each of its choices, from the measured sensitivities."""
    analysed = [layers[i] for i in measured]
    rationale = []

    int8 = np.array([layer["sensitivity"]["int8"] for layer in analysed])
    median = float(np.median(int8))
    outliers = [layer for layer in analysed
                if layer["sensitivity"]["int8"] > max(OUTLIER_FACTOR * median, OUTLIER_FLOOR)]
    quantize = QuantizeStep(op="quantize", method="dynamic", dtype="int8", granularity="per_channel",
                            exclude=[p for layer in outliers for p in quantize_patterns(layer["name"])])
    if outliers:
        rationale.append(f"quantize: dynamic int8 per channel, except {_listing(outliers, 'int8')}: their int8 "
                         f"sensitivity is over {OUTLIER_FACTOR:g}x the median ({median:.2e}) and over "
                         f"{OUTLIER_FLOOR:g}, so they stay in full precision")
    else:
        rationale.append(f"quantize: dynamic int8 per channel on every layer: no int8 sensitivity is over "
                         f"{OUTLIER_FACTOR:g}x the median ({median:.2e}) and over {OUTLIER_FLOOR:g}")

    dense = [layer for layer in analysed if layer["sensitivity"]["prune50"] >= PRUNE_HIGH]
    dense_names = {layer["name"] for layer in dense}
    prunable = [layer for layer in layers if layer["name"] not in dense_names]
    steps: list[PruneStep | QuantizeStep] = []
    if not prunable:
        rationale.append(f"prune: none; every layer's prune50 sensitivity is at least {PRUNE_HIGH:g}")
    else:
        tolerant = all(layer["sensitivity"] is None or layer["sensitivity"]["prune50"] < PRUNE_LOW
                       for layer in prunable)
        sparsity = 0.5 if tolerant else 0.3
        steps.append(PruneStep(op="prune", method="magnitude", sparsity=sparsity, scope="layer",
                               exclude=[_anchored(layer["name"]) for layer in dense]))
        why = (f"every pruned layer's prune50 sensitivity is below {PRUNE_LOW:g}" if tolerant else
               f"some pruned layers have a prune50 sensitivity between {PRUNE_LOW:g} and {PRUNE_HIGH:g}")
        rationale.append(f"prune: magnitude {sparsity:.0%} per layer: {why}")
        if dense:
            rationale.append(f"prune: {_listing(dense, 'prune50')} stay dense: prune50 sensitivity of at least "
                             f"{PRUNE_HIGH:g}")
    steps.append(quantize)

    int4_worst = max(layer["sensitivity"]["int4"] for layer in analysed)
    if torch_model and int4_worst < INT4_TINY:
        alternative = Recipe(steps=[QuantizeStep(op="quantize", method="weight_only", dtype="int4",
                                                 granularity="group", group_size=INT4_GROUP)])
        rationale.append(f"alternative for target.runtime 'pytorch': {json.dumps(_as_dict(alternative))} (weights half "
                         f"the size of int8 ones): every layer's int4 sensitivity is below "
                         f"{INT4_TINY:g} (worst {int4_worst:.2e})")
    return _as_dict(Recipe(steps=steps)), rationale


def _result(layers: list[dict], measured: list[int], reference: Outputs, total_params: int,
            quantize_patterns: Callable[[str], list[str]], torch_model: bool) -> dict:
    weight_params = sum(layer["params"] for layer in layers)
    zeros = sum(layer["sparsity"] * layer["params"] for layer in layers)
    for layer in layers:
        layer["param_share"] = layer["params"] / weight_params
    totals = {"params": total_params, "weight_params": weight_params,
              "sparsity": zeros / weight_params if weight_params else 0.0}
    if not layers:
        return {"layers": [], "totals": totals, "suggested_recipe": None,
                "rationale": ["no Linear/Conv2d (torch) or MatMul/Gemm/Conv weight (ONNX) found: nothing to "
                              "compress, so no recipe is suggested"]}
    recipe, rationale = _suggest(layers, measured, quantize_patterns, torch_model)
    samples = sum(outputs[0].shape[0] if outputs[0].ndim else 1 for outputs in reference)
    notes = [f"sensitivity = 1 - mean output cosine similarity over {samples} samples when one layer alone is "
             f"quantized (int8 per channel; int4 per group of {INT4_GROUP}, or per channel) or magnitude-pruned "
             "to 50%"]
    if len(measured) < len(layers):
        share = sum(layers[i]["param_share"] for i in measured)
        notes.append(f"{len(layers)} layers: sensitivity measured on the {len(measured)} largest ({share:.1%} of "
                     "the weights) to bound the work; the others have sensitivity null, are pruned and quantized "
                     "with the rest, and are never excluded")
    return {"layers": layers, "totals": totals, "suggested_recipe": recipe, "rationale": notes + rationale}


# --- torch modules -----------------------------------------------------------------------------------------

def _module_outputs(module: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> Outputs:
    results = []
    with torch.no_grad():
        for batch in batches:
            result = module(*batch)
            flat = result if isinstance(result, (list, tuple)) else [result]
            results.append([t.detach().float().cpu().numpy() for t in flat if isinstance(t, torch.Tensor)])
    return results


def analyze_module(module: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]], check=lambda: None,
                   bins: int = 32) -> dict:
    """Statistics, sensitivity and a suggested recipe for a torch module (run as it is: in eval mode)."""
    if not batches:
        raise ValueError("analyze needs at least one batch of inputs")
    batches = batches[:MAX_BATCHES]
    found = [(name, layer) for name, layer in module.named_modules()
             if isinstance(layer, PRUNABLE) and layer.weight.is_floating_point() and layer.weight.numel()]
    layers = [_layer_stats(name, type(layer).__name__, layer.weight.detach().float().cpu().numpy(), bins)
              for name, layer in found]
    check()
    reference = _module_outputs(module, batches)

    def outputs_with(index: int, variant: str) -> Outputs:
        weight = found[index][1].weight
        original = weight.detach().clone()
        try:
            rows = _compressed_rows(original.float().reshape(original.shape[0], -1), variant)
            with torch.no_grad():
                weight.copy_(rows.reshape(original.shape).to(original.dtype))
            return _module_outputs(module, batches)
        finally:
            with torch.no_grad():
                weight.copy_(original)

    measured = _measure(layers, reference, outputs_with, check)

    def quantize_patterns(name: str) -> list[str]:
        # module name for the pytorch target; its weight's name for the ONNX file the onnxruntime target gets
        return [_anchored(name), _anchored(f"{name}.weight")]

    return _result(layers, measured, reference, count_weights(module)[0], quantize_patterns, torch_model=True)


# --- ONNX models -------------------------------------------------------------------------------------------

def _onnx_weights(model: onnx.ModelProto) -> list[tuple[str, str, str, bool]]:
    """(layer name, op type, initializer name, stored as [inputs, outputs]) for each float weight, once each."""
    initializers = {t.name: t for t in model.graph.initializer}
    found, seen = [], set()
    for node in model.graph.node:
        index = ONNX_WEIGHT_INPUTS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in initializers:
            continue
        tensor = initializers[node.input[index]]
        rank = 2 if node.op_type in ("MatMul", "Gemm") else None
        is_float = tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
        if tensor.name in seen or not is_float or (len(tensor.dims) != rank if rank else len(tensor.dims) < 3):
            continue
        seen.add(tensor.name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kn = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0))
        found.append((node.name or tensor.name, node.op_type, tensor.name, kn))
    return found


def _onnx_outputs(model: onnx.ModelProto, batches: list[list[np.ndarray]]) -> Outputs:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    return [run_onnx(session, batch) for batch in batches]


def analyze_onnx(path: Path, batches: list[list[np.ndarray]], check=lambda: None, bins: int = 32) -> dict:
    """Statistics, sensitivity and a suggested recipe for an ONNX file (left untouched: a copy is modified in
    memory for each variant and run with ONNX Runtime on the CPU)."""
    if not batches:
        raise ValueError("analyze needs at least one batch of inputs")
    batches = batches[:MAX_BATCHES]
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    found = _onnx_weights(model)
    arrays = [numpy_helper.to_array(initializers[weight]) for _, _, weight, _ in found]
    layers = [_layer_stats(name, op, array.astype(np.float32), bins)
              for (name, op, _, _), array in zip(found, arrays)]
    check()
    reference = _onnx_outputs(model, batches)

    def outputs_with(index: int, variant: str) -> Outputs:
        _, _, weight, kn = found[index]
        array = arrays[index]
        rows = torch.tensor(array.T if kn else array.reshape(array.shape[0], -1), dtype=torch.float32)
        changed = _compressed_rows(rows, variant).numpy()
        changed = (changed.T if kn else changed.reshape(array.shape)).astype(array.dtype)
        tensor = initializers[weight]
        original = onnx.TensorProto()
        original.CopyFrom(tensor)
        try:
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(changed), weight))
            return _onnx_outputs(model, batches)
        finally:
            tensor.CopyFrom(original)

    measured = _measure(layers, reference, outputs_with, check)
    return _result(layers, measured, reference, count_params(model)[0], lambda name: [_anchored(name)],
                   torch_model=False)
