"""Activation smoothing before int8 (the SmoothQuant idea, applied to an ONNX graph).

int8 with activations quantized per tensor loses most where a few input channels of a MatMul carry outliers:
one scale must cover them, so every other channel gets few levels. Smoothing divides each input channel j of a
MatMul by s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (measured on calibration data) and multiplies row j of
the weight by s_j: the product is unchanged in exact arithmetic, and the activation is flatter.

The division is an explicit `Mul` on the MatMul's input, not folded into the producer: in BERT-style encoders
the LayerNorm output that feeds Q/K/V also feeds the residual, which must stay exact. MatMuls that share an
input share one `Mul` and one s. A weight used anywhere else (tied embeddings) is left alone.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.evaluation import measure
from worker.runtime import intermediate_values, ort_session, run_onnx

SCALE_RANGE = (1e-2, 1e2)  # keeps a dead channel (max 0) or a huge one from making s degenerate


def smoothable_inputs(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls that take it with a 2-D constant weight used by that MatMul only."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is not None and len(weight.dims) == 2 and node.input[0] not in initializers:
            groups.setdefault(node.input[0], []).append(node)
    return {x: nodes for x, nodes in groups.items() if all(uses[n.input[1]] == 1 for n in nodes)}


def mask_position(source: Path) -> int | None:
    """Where `attention_mask` is among the model's inputs, if it takes one: padded positions are left out when
    candidates are compared (their outputs mean nothing)."""
    model = onnx.load(str(source), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in weights]
    return names.index("attention_mask") if "attention_mask" in names else None


def activation_channel_max(source: Path, calibration: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x_j| over the calibration batches, per input channel, for every smoothable MatMul input. Padded
    positions count too: on all-MiniLM-L6-v2 the int8 chosen from these maxima reached embedding cosine 0.99706,
    from real tokens' maxima only 0.99517 (the pads' LayerNorm outputs carry the same outlier channels)."""
    inputs = list(smoothable_inputs(onnx.load(str(source), load_external_data=False)))
    channel_max: dict[str, np.ndarray] = {}
    for _, values in intermediate_values(source, inputs, calibration):
        for name in inputs:
            value = values[name]
            current = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            channel_max[name] = np.maximum(channel_max[name], current) if name in channel_max else current
    return channel_max


def smooth(source: Path, destination: Path, channel_max: dict[str, np.ndarray], alpha: float) -> int:
    """Write the smoothed fp32 graph; returns how many activation tensors were smoothed."""
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    groups = {x: nodes for x, nodes in smoothable_inputs(model).items() if x in channel_max}
    muls: dict[str, onnx.NodeProto] = {}
    for x, nodes in groups.items():
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        if weight_max.shape != channel_max[x].shape:
            continue
        scale = np.maximum(channel_max[x], 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)
        scale = np.clip(scale, *SCALE_RANGE).astype(np.float32)
        inverse, smoothed = f"{x}_smooth_inverse", f"{x}_smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        muls[x] = helper.make_node("Mul", [x, inverse], [smoothed], name=f"{x}_smooth")
        for node, weight in zip(nodes, weights):
            node.input[0] = smoothed
            initializers[node.input[1]].CopyFrom(
                numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), node.input[1]))
    ordered = [muls[x] for x in muls if x in {i.name for i in graph.input}]
    for node in graph.node:
        ordered.append(node)
        ordered.extend(muls[out] for out in node.output if out in muls)
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(destination))
    return len(muls)


def output_cosine(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]],
                  masks: list[np.ndarray | None]) -> float:
    """Mean per-sample cosine of the first output, padded positions left out: how a candidate is judged on the
    calibration data."""
    return measure.fidelity([want[:1] for want in reference], [got[:1] for got in outputs], masks)["cosine_mean"]


def run_all(path: Path, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    session = ort_session(path, "cpu")
    return [run_onnx(session, feeds) for feeds in batches]
