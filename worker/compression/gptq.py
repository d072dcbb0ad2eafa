"""GPTQ for ONNX MatMul weights, written into ONNX Runtime's MatMulNBits blocks.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the input rows of a weight one at a time and
spreads each row's rounding error over the rows not yet quantized, weighted by the inverse Hessian of the layer's
inputs (H = sum of x x^T over the calibration tokens), so the layer's output moves least on the data it sees.

ONNX Runtime 1.32 ships a GPTQ mode in its MatMulNBits quantizer; on all-MiniLM-L6-v2 (int4, block 32) it returned
embedding cosine 0.97570, round-to-nearest's figure to five digits, whatever the calibration data (padded,
unpadded or one sentence a batch): it re-quantizes the GPTQ result with fresh min/max scales. Here the integers
GPTQ picked are the ones stored, and only real tokens (attention_mask 1) enter H.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.runtime import intermediate_values

DAMPING = 0.01  # of the mean Hessian diagonal, added to it: keeps the inverse stable when inputs are collinear
LAZY_BLOCK = 128  # rows updated together; the rest get the accumulated error once per block


def quantizable_matmuls(model: onnx.ModelProto, excluded: set[str]) -> list[onnx.NodeProto]:
    """MatMuls with a 2-D constant float weight of at least one block."""
    initializers = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in excluded or node.input[1] not in initializers:
            continue
        weight = initializers[node.input[1]]
        if len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.FLOAT and min(weight.dims) >= 16:
            found.append(node)
    return found


def input_hessians(source: Path, nodes: list[onnx.NodeProto], calibration: list[list[np.ndarray]],
                   mask_position: int | None) -> tuple[dict[str, np.ndarray], int]:
    """H = X^T X per distinct MatMul input over the real calibration tokens, and how many tokens that was."""
    inputs = sorted({n.input[0] for n in nodes})
    hessians: dict[str, np.ndarray] = {}
    tokens = 0
    for feeds, values in intermediate_values(source, inputs, calibration):
        mask = feeds[mask_position] if mask_position is not None else None
        for name in inputs:
            rows = real_rows(values[name], mask).astype(np.float64)
            hessians[name] = hessians.get(name, 0) + rows.T @ rows
        tokens += real_rows(values[inputs[0]], mask).shape[0] if inputs else 0
    return hessians, tokens


def real_rows(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The activation as rows of features, padded positions dropped when the mask lines up with it."""
    if mask is not None and value.ndim == 3 and mask.shape == value.shape[:2]:
        return value[mask.astype(bool)]
    return value.reshape(-1, value.shape[-1])


def group_params(weights: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per output channel for one group of input rows ([N, rows])."""
    top = 2 ** bits - 1
    if symmetric:
        zero = np.full(weights.shape[0], 2 ** (bits - 1), dtype=np.float64)
        scale = np.abs(weights).max(axis=1) / (2 ** (bits - 1) - 1)
    else:
        low, high = np.minimum(weights.min(axis=1), 0), np.maximum(weights.max(axis=1), 0)
        scale = (high - low) / top
        zero = np.zeros_like(scale)
        np.divide(-low, scale, out=zero, where=scale > 0)
        zero = np.clip(np.round(zero), 0, top)
    return np.where(scale > 0, scale, 1.0), zero


def gptq(weight: np.ndarray, hessian: np.ndarray, *, bits: int, group_size: int,
         symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [K, N] (y = x @ weight) -> integers [N, K], scales and zero points [N, K / group_size].
    K must be a multiple of group_size."""
    w = weight.T.astype(np.float64).copy()  # output channels x input rows: rows of the weight are its columns
    k = w.shape[1]
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += DAMPING * np.mean(np.diag(h))
    inverse = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    top = 2 ** bits - 1
    codes = np.zeros(w.shape, dtype=np.uint8)
    groups = k // group_size
    scales = np.zeros((w.shape[0], groups))
    zeros = np.zeros((w.shape[0], groups))
    lazy = max(LAZY_BLOCK, group_size)
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        block = w[:, start:end].copy()
        errors = np.zeros_like(block)
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                g = column // group_size
                scales[:, g], zeros[:, g] = group_params(block[:, i:i + group_size], bits, symmetric)
            g = column // group_size
            q = np.clip(np.round(block[:, i] / scales[:, g]) + zeros[:, g], 0, top)
            codes[:, column] = q
            error = (block[:, i] - (q - zeros[:, g]) * scales[:, g]) / local[i, i]
            block[:, i:] -= np.outer(error, local[i, i:])
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes, scales.astype(np.float32), zeros.astype(np.uint8)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> bytes, two 4-bit codes a byte (the first in the low nibble)."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), dtype=values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits(node: onnx.NodeProto, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                 *, k: int, bits: int, group_size: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A MatMulNBits node (com.microsoft) computing x @ dequantized weight; int8 activations inside
    (accuracy_level 4, ONNX Runtime's fast path on x86)."""
    n, groups = scales.shape
    blob = pack(codes.reshape(n, groups, group_size), bits)
    prefix = f"{node.input[1]}_gptq"
    tensors = [numpy_helper.from_array(blob, f"{prefix}_q"), numpy_helper.from_array(scales.reshape(-1), f"{prefix}_s")]
    inputs = [node.input[0], tensors[0].name, tensors[1].name]
    if zeros is not None:
        tensors.append(numpy_helper.from_array(pack(zeros, bits).reshape(-1), f"{prefix}_z"))
        inputs.append(tensors[2].name)
    new = helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain="com.microsoft",
                           K=k, N=n, bits=bits, block_size=group_size, accuracy_level=4)
    return new, tensors


def quantize_model(source: Path, destination: Path, calibration: list[list[np.ndarray]], *, bits: int,
                   group_size: int, symmetric: bool, excluded: list[str], mask_position: int | None) -> dict:
    """Every quantizable MatMul of `source` as GPTQ MatMulNBits; returns what the report says about it."""
    model = onnx.load(str(source))
    nodes = quantizable_matmuls(model, set(excluded))
    hessians, tokens = input_hessians(source, nodes, calibration, mask_position)
    initializers = {t.name: t for t in model.graph.initializer}
    graph = model.graph
    replaced = {}
    for node in nodes:
        weight = numpy_helper.to_array(initializers[node.input[1]])
        k = weight.shape[0]
        padded = -k % group_size
        hessian = hessians[node.input[0]]
        if padded:  # MatMulNBits pads K up to whole blocks; padded rows are zero and never seen
            weight = np.pad(weight, ((0, padded), (0, 0)))
            hessian = np.pad(hessian, ((0, padded), (0, padded)))
        codes, scales, zeros = gptq(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric)
        replaced[node.output[0]] = matmul_nbits(node, codes, scales, None if symmetric else zeros, k=k, bits=bits,
                                           group_size=group_size)
    ordered = []
    for node in graph.node:
        if node.output[0] in replaced:
            new, tensors = replaced[node.output[0]]
            ordered.append(new)
            graph.initializer.extend(tensors)
        else:
            ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(destination))
    return {"quantized_matmuls": len(replaced), "calibration_tokens": tokens,
            "symmetric": symmetric, "damping": DAMPING}
