"""Pruning: unstructured (magnitude by sparsity or threshold, activation-aware), 2:4 and structured.

Unstructured methods zero weights and return the masks, so later training can keep them zero. Structured
pruning really removes output channels / neurons (and the matching inputs of the layers that consume them),
so tensors and files get smaller without any sparse encoding.
"""

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from app.core.errors import ErrorCode
from worker.compression.quantize import compile_patterns
from worker.errors import JobFailure

PRUNABLE = (nn.Linear, nn.Conv2d)


def prunable_layers(module: nn.Module, exclude: list[str], embeddings: bool = False) -> dict[str, nn.Module]:
    kinds = (*PRUNABLE, nn.Embedding) if embeddings else PRUNABLE
    patterns = compile_patterns(exclude)
    return {name: layer for name, layer in module.named_modules()
            if isinstance(layer, kinds) and not any(rx.search(name) for rx in patterns)}


def _kth_threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(sparsity * scores.numel())
    if k == 0:
        return torch.tensor(-1.0)
    return torch.kthvalue(scores.flatten().float(), k).values


def _two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """Keep the 2 highest scores in every group of 4 consecutive input weights (per output row)."""
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % 4:
        raise JobFailure(ErrorCode.INVALID_RECIPE,
                         f"2:4 sparsity needs an input width divisible by 4, got {rows.shape[1]}")
    groups = rows.reshape(rows.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(scores.shape)


def input_norms(module: nn.Module, layers: dict[str, nn.Module], batches: list[tuple],
                check: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Per-input-feature L2 norms of each layer's input over the calibration data (Wanda's activation term)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def record(layer, args, _output):
            x = args[0].detach().float()
            if isinstance(layer, nn.Conv2d):
                x = x.transpose(0, 1).reshape(x.shape[1], -1).t()  # rows = positions, cols = in channels
            else:
                x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        return record

    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in batches:
                check()
                module(*batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: total.sqrt() for name, total in sums.items()}


def _row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest scores within each row (output channel, or one token's embedding vector)."""
    rows = scores.reshape(scores.shape[0], -1)
    k = int(sparsity * rows.shape[1])
    cut = rows.kthvalue(k, dim=1, keepdim=True).values if k else torch.full((rows.shape[0], 1), -1.0)
    return (rows > cut).reshape(scores.shape)


def prune_unstructured(module: nn.Module, *, method: str, sparsity: float | None, threshold: float | None,
                       scope: str, pattern: str, exclude: list[str], calibration: list[tuple] | None = None,
                       embeddings: bool = False,
                       check: Callable[[], None] = lambda: None) -> tuple[dict[str, torch.Tensor], dict]:
    """Zero weights in place; returns (masks by layer name, details).

    With `embeddings`, embedding tables are pruned too, always by magnitude within each token's vector (a lookup
    has no input activation to weigh, and ranking across tokens would empty the vectors of rare ones; a threshold
    applies to them as to every weight): on a small
    encoder the word embeddings hold half of the weights, so a sparse file stays large without them.
    """
    layers = prunable_layers(module, exclude, embeddings)
    if not any(isinstance(layer, PRUNABLE) for layer in layers.values()):
        raise JobFailure(ErrorCode.INVALID_RECIPE, "prune: no Linear or Conv2d layer left to prune (check exclude)")
    tables = {name for name, layer in layers.items() if isinstance(layer, nn.Embedding)}
    if method == "activation_aware":
        if not calibration:
            raise JobFailure(ErrorCode.INVALID_RECIPE, "activation_aware pruning needs calibration data")
        norms = input_norms(module, {n: layer for n, layer in layers.items() if n not in tables}, calibration, check)
        scores = {}
        for name, layer in layers.items():
            w = layer.weight.detach().abs().float()
            if name not in tables:
                w = w * norms[name].reshape(1, -1, *([1] * (w.dim() - 2)))
            scores[name] = w
    else:
        scores = {name: layer.weight.detach().abs().float() for name, layer in layers.items()}

    masks: dict[str, torch.Tensor] = {}
    if threshold is not None:
        masks = {name: layer.weight.detach().abs() >= threshold for name, layer in layers.items()}
    elif pattern == "2:4":
        masks = {name: _two_four_mask(s) for name, s in scores.items()}
    else:
        masks = {name: _row_mask(scores[name], sparsity) for name in tables}
        ranked = {name: s for name, s in scores.items() if name not in tables}
        if method == "activation_aware":  # Wanda compares weights within each output row
            masks.update({name: _row_mask(s, sparsity) for name, s in ranked.items()})
        elif scope == "global":
            cut = _kth_threshold(torch.cat([s.flatten() for s in ranked.values()]), sparsity)
            masks.update({name: s > cut for name, s in ranked.items()})
        else:
            masks.update({name: s > _kth_threshold(s, sparsity) for name, s in ranked.items()})
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.mul_(masks[name].to(layer.weight.dtype))
    return masks, {"method": method, "pattern": pattern, "scope": scope,
                   "sparsity_target": sparsity, "threshold": threshold, "layers": len(layers) - len(tables),
                   **({"embedding_tables": sorted(tables)} if tables else {}),
                   **({"note": "2:4 sparsity speeds up only on CUDA GPUs of compute capability 8.0 or newer "
                               "(sparse tensor cores); elsewhere it only makes weights compressible"}
                      if pattern == "2:4" else {})}


def layer_sparsity(module: nn.Module) -> dict[str, dict]:
    """Per-layer weight sparsity, for the report: every prunable layer, and the embedding tables that were pruned."""
    report = {}
    for name, layer in module.named_modules():
        weight = getattr(layer, "weight", None)
        if isinstance(layer, (*PRUNABLE, nn.Embedding)) and isinstance(weight, torch.Tensor):
            zeros = int((weight == 0).sum())
            if isinstance(layer, nn.Embedding) and zeros <= (layer.padding_idx is not None) * weight.shape[1]:
                continue
            report[name] = {"params": weight.numel(), "zeros": zeros,
                            "sparsity": round(zeros / max(weight.numel(), 1), 4), "shape": list(weight.shape)}
    return report


def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero pruned weights (after an optimizer step) so sparsity never grows back."""
    with torch.no_grad():
        for name, mask in masks.items():
            layer = module.get_submodule(name)
            layer.weight.mul_(mask.to(layer.weight.dtype))


# --- ONNX models: unstructured pruning straight on the weight initializers ---------------------------------

ONNX_WEIGHT_INPUTS = {"MatMul": 1, "Gemm": 1, "Conv": 1}


def prune_onnx(source, destination, *, method: str, sparsity: float | None, threshold: float | None, scope: str,
               pattern: str, exclude: list[str]) -> dict:
    if method != "magnitude":
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, f"prune method {method!r} needs a PyTorch model (.pt2 or "
                                                           "Hugging Face); ONNX uploads support magnitude pruning")
    model = onnx.load(str(source))
    patterns = compile_patterns(exclude)
    initializers = {t.name: t for t in model.graph.initializer}
    targets = {}
    for node in model.graph.node:
        index = ONNX_WEIGHT_INPUTS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in initializers:
            continue
        if any(rx.search(n) for rx in patterns for n in (node.name, node.input[index])):
            continue
        array = numpy_helper.to_array(initializers[node.input[index]])
        if array.ndim >= 2 and array.dtype in (np.float32, np.float16):
            # MatMul weights are [in, out] (and Gemm's may be): score per output row as torch would
            targets[node.input[index]] = (array, node.op_type == "MatMul" or _gemm_kn(node))
    if not targets:
        raise JobFailure(ErrorCode.INVALID_RECIPE, "prune: no MatMul/Gemm/Conv weight left to prune (check exclude)")
    scores = {name: torch.from_numpy(np.abs(a.T if kn else a).astype(np.float32)) for name, (a, kn) in targets.items()}
    if threshold is not None:
        masks = {name: s >= threshold for name, s in scores.items()}
    elif pattern == "2:4":
        masks = {name: _two_four_mask(s) for name, s in scores.items()}
    elif scope == "global":
        cut = _kth_threshold(torch.cat([s.flatten() for s in scores.values()]), sparsity)
        masks = {name: s > cut for name, s in scores.items()}
    else:
        masks = {name: s > _kth_threshold(s, sparsity) for name, s in scores.items()}
    for name, (array, kn) in targets.items():
        mask = masks[name].numpy()
        pruned = array * (mask.T if kn else mask)
        initializers[name].CopyFrom(numpy_helper.from_array(pruned.astype(array.dtype), name))
    onnx.save(model, str(destination))
    return {"method": method, "pattern": pattern, "scope": scope, "sparsity_target": sparsity,
            "threshold": threshold, "layers": len(targets)}


def _gemm_kn(node) -> bool:
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return node.op_type == "Gemm" and not trans_b


def onnx_layer_sparsity(path) -> dict[str, dict]:
    model = onnx.load(str(path), load_external_data=False)
    weights = {node.input[i] for node in model.graph.node
               for op, i in ONNX_WEIGHT_INPUTS.items() if node.op_type == op and len(node.input) > i}
    report = {}
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            array = numpy_helper.to_array(tensor)
            zeros = int((array == 0).sum())
            report[tensor.name] = {"params": int(array.size), "zeros": zeros,
                                   "sparsity": round(zeros / max(array.size, 1), 4), "shape": list(array.shape)}
    return report
