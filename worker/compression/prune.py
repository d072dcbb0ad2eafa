"""Pruning: unstructured (magnitude by sparsity or threshold, activation-aware, SparseGPT), 2:4 and structured.

Unstructured methods zero weights and return the masks, so later training can keep them zero. Structured
pruning really removes output channels / neurons (and the matching inputs of the layers that consume them),
so tensors and files get smaller without any sparse encoding.
"""

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
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


def _masks(scores: dict[str, torch.Tensor], tables: set[str], *, method: str, sparsity: float | None,
           threshold: float | None, pattern: str, scope: str) -> dict[str, torch.Tensor]:
    """Which weights stay, from their scores (magnitudes, or Wanda's magnitude times input norm)."""
    if threshold is not None:
        return {name: s >= threshold for name, s in scores.items()}
    if pattern == "2:4":
        return {name: _two_four_mask(s) for name, s in scores.items()}
    masks = {name: _row_mask(scores[name], sparsity) for name in tables}
    ranked = {name: s for name, s in scores.items() if name not in tables}
    if method == "activation_aware":  # Wanda compares weights within each output row
        masks.update({name: _row_mask(s, sparsity) for name, s in ranked.items()})
    elif scope == "global" and ranked:
        cut = _kth_threshold(torch.cat([s.flatten() for s in ranked.values()]), sparsity)
        masks.update({name: s > cut for name, s in ranked.items()})
    else:
        masks.update({name: s > _kth_threshold(s, sparsity) for name, s in ranked.items()})
    return masks


def prune_unstructured(module: nn.Module, *, method: str, sparsity: float | None, threshold: float | None,
                       scope: str, pattern: str, exclude: list[str], calibration: list[tuple] | None = None,
                       embeddings: bool = False, token_mask: int | None = None,
                       check: Callable[[], None] = lambda: None) -> tuple[dict[str, torch.Tensor], dict]:
    """Zero weights in place (`sparsegpt` also corrects the weights left); returns (masks by layer name, details).

    With `embeddings`, embedding tables are pruned too, always by magnitude within each token's vector (a lookup
    has no input activation to weigh, and ranking across tokens would empty the vectors of rare ones; a threshold
    applies to them as to every weight): on a small
    encoder the word embeddings hold half of the weights, so a sparse file stays large without them.
    """
    layers = prunable_layers(module, exclude, embeddings)
    if not any(isinstance(layer, PRUNABLE) for layer in layers.values()):
        raise JobFailure(ErrorCode.INVALID_RECIPE, "prune: no Linear or Conv2d layer left to prune (check exclude)")
    tables = {name for name, layer in layers.items() if isinstance(layer, nn.Embedding)}
    weighted = {n: layer for n, layer in layers.items() if n not in tables}
    if method in ("activation_aware", "sparsegpt") and not calibration:
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"{method} pruning needs calibration data")
    if method == "sparsegpt":
        magnitudes = {name: layers[name].weight.detach().abs().float() for name in tables}
        masks = _masks(magnitudes, tables, method="magnitude", sparsity=sparsity, threshold=None, pattern=pattern,
                       scope=scope)
        masks.update(prune_with_updates(module, weighted, calibration, sparsity=sparsity, pattern=pattern,
                                        token_mask=token_mask, check=check))
    else:
        scores = {name: layer.weight.detach().abs().float() for name, layer in layers.items()}
        if method == "activation_aware":
            norms = input_norms(module, weighted, calibration, check)
            for name in weighted:
                scores[name] = scores[name] * norms[name].reshape(1, -1, *([1] * (scores[name].dim() - 2)))
        masks = _masks(scores, tables, method=method, sparsity=sparsity, threshold=threshold, pattern=pattern,
                       scope=scope)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.mul_(masks[name].to(layer.weight.dtype))
    return masks, {"method": method, "pattern": pattern, "scope": scope,
                   "sparsity_target": sparsity, "threshold": threshold, "layers": len(layers) - len(tables),
                   **({"embedding_tables": sorted(tables)} if tables else {}),
                   **({"note": "2:4 sparsity speeds up only on CUDA GPUs of compute capability 8.0 or newer "
                               "(sparse tensor cores); elsewhere it only makes weights compressible"}
                      if pattern == "2:4" else {})}


# --- Pruning with weight updates (SparseGPT) -------------------------------------------------------------

UPDATE_BLOCK = 128  # input columns pruned together; the columns after a block get its accumulated error once
HESSIAN_DAMPING = 0.01  # of the mean Hessian diagonal: keeps the inverse stable when inputs are collinear


def prune_with_updates(module: nn.Module, layers: dict[str, nn.Module], calibration: list[tuple], *,
                       sparsity: float | None, pattern: str, token_mask: int | None = None,
                       check: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """SparseGPT (Frantar and Alistarh, 2023): each layer in turn, in forward order, with its input Hessian measured
    on the model as the layers before it were left; the weights that stay absorb each pruned weight's error, so
    the layer's output on the calibration data moves least. Returns the masks; weights are changed in place.

    Wanda only chooses which weights go; here the rest are corrected too, which matters most at 50% and 2:4.
    `token_mask` is the position of the attention mask among the model's inputs: padded tokens are left out.
    """
    masks = {}
    for name, layer in layers.items():
        check()
        hessians = _input_hessians(module, layer, calibration, token_mask, check)
        weight = layer.weight.detach()
        groups = len(hessians)
        rows = weight.reshape(groups, weight.shape[0] // groups, -1)
        kept = torch.ones_like(rows, dtype=torch.bool)
        updated = torch.empty_like(rows)
        for g, hessian in enumerate(hessians):
            updated[g], kept[g] = _obs_prune(rows[g].double(), hessian, sparsity, pattern)
        with torch.no_grad():
            layer.weight.copy_(updated.reshape(weight.shape))
        masks[name] = kept.reshape(weight.shape)
    return masks


class _LayerReached(Exception):
    """Raised once the layer's input is recorded: the rest of the forward is not needed."""


def _input_hessians(module: nn.Module, layer: nn.Module, calibration: list[tuple], token_mask: int | None,
                    check: Callable[[], None]) -> list[torch.Tensor]:
    """X^T X of the layer's input over the calibration data (per group of a grouped convolution): a convolution's
    input is unfolded into the patches its kernel sees, so its weight is a matrix over those patches too. Each
    forward stops at the layer (a layer called twice in one forward is measured at its first call)."""
    totals: list[torch.Tensor] = []
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def record(_layer, args):
        x = args[0].detach().double()
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                               stride=layer.stride)  # [batch, in * kh * kw, positions]
            per_group = patches.shape[1] // layer.groups
            inputs = [patches[:, g * per_group:(g + 1) * per_group].transpose(1, 2).reshape(-1, per_group)
                      for g in range(layer.groups)]
        else:
            mask = current["mask"]
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]
            inputs = [x.reshape(-1, x.shape[-1])]
        for g, rows in enumerate(inputs):
            if len(totals) <= g:
                totals.append(torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64))
            totals[g] += rows.T @ rows
        raise _LayerReached

    hook = layer.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for batch in calibration:
                check()
                current["mask"] = batch[token_mask] if token_mask is not None else None
                try:
                    module(*batch)
                except _LayerReached:
                    pass
    finally:
        hook.remove()
    if not totals:
        raise JobFailure(ErrorCode.INVALID_RECIPE, "sparsegpt: a layer to prune never ran on the calibration data")
    return totals


def _obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None,
               pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight matrix [outputs, inputs] pruned column by column (optimal brain surgeon, one input at a time):
    each pruned weight's error is spread over the inputs not yet visited, weighted by the inverse Hessian. Which
    weights go is chosen per block of columns by w^2 / [H^-1]_ii^2, the output error their removal costs."""
    w = weight.clone()
    columns = w.shape[1]
    if pattern == "2:4" and columns % 4:
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"2:4 sparsity needs an input width divisible by 4, got {columns}")
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(HESSIAN_DAMPING * torch.diag(h).mean())
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, columns, UPDATE_BLOCK):
        end = min(start + UPDATE_BLOCK, columns)
        block = w[:, start:end].clone()
        local = inverse[start:end, start:end]
        diagonal = torch.diag(local)
        errors = torch.zeros_like(block)
        if pattern != "2:4":
            cost = block.pow(2) / diagonal.pow(2)
            cut = int(sparsity * cost.numel())
            if cut:
                keep[:, start:end] = cost > cost.flatten().kthvalue(cut).values
        for i in range(end - start):
            if pattern == "2:4" and i % 4 == 0:
                cost = block[:, i:i + 4].pow(2) / diagonal[i:i + 4].pow(2)
                dropped = cost.topk(2, dim=1, largest=False).indices
                keep[:, start + i:start + i + 4].scatter_(1, dropped, False)
            column = block[:, i]
            kept = column * keep[:, start + i]
            error = (column - kept) / diagonal[i]
            block[:, i:] -= error.unsqueeze(1) * local[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ inverse[start:end, end:]
    return w.to(weight.dtype), keep


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
