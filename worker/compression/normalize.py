"""Graph normalization before quantization, for ONNX models from other exporters.

Exporters other than torch's (Paddle's paddle2onnx, older tf2onnx) write weights as Constant nodes, repeat the same
tensor under several names, list weights among the graph inputs and stop at opset 11 or 12. ONNX Runtime's
quantizers need weights as initializers ("Expected ... to be an initializer"), and per-channel QDQ needs
DequantizeLinear's `axis`, which exists from opset 13 on: static int8 on such graphs is invalid. Every rewrite here
keeps the model's function; `normalize` checks that on the job's inputs.
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from worker.runtime import open_runner

# Per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute) exist from opset 13.
PER_CHANNEL_OPSET = 13
# Normalized outputs must match the original's this closely (relative L2 over all eval outputs): the rewrites are
# exact, only the order of float operations may change.
MAX_RELATIVE_CHANGE = 1e-4


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, those inside If/Loop/Scan bodies included (a body may read the main graph's initializers)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for body in attribute.graphs:
                yield from _all_nodes(body)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Constant nodes of the main graph holding a tensor (`value`) become initializers of the same name."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    moved, kept = [], []
    for node in graph.node:
        value = [a for a in node.attribute if a.name == "value"]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value and node.output[0] not in outputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value[0].t)
            tensor.name = node.output[0]
            moved.append(tensor)
        else:
            kept.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(moved)
    return len(moved)


def weights_out_of_inputs(model: onnx.ModelProto) -> int:
    """Initializers listed among the graph inputs (older exporters) are weights, not inputs: ONNX Runtime would let
    a caller override them, and the quantizers treat them as activations. Allowed from IR version 4 on."""
    if model.ir_version < 4:
        return 0
    weights = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in weights]
    removed = len(model.graph.input) - len(kept)
    if removed:
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return removed


def _rename_inputs(model: onnx.ModelProto, renamed: dict[str, str]) -> None:
    for node in _all_nodes(model.graph):
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]


def merge_duplicate_initializers(model: onnx.ModelProto) -> int:
    """Initializers with the same type, shape and bytes are read under one name (the first one's)."""
    graph = model.graph
    protected = {o.name for o in graph.output} | {i.name for i in graph.input}
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    for tensor in graph.initializer:
        if tensor.name in protected or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        data = numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(np.ascontiguousarray(data).tobytes()).digest())
        if key in first:
            renamed[tensor.name] = first[key]
        else:
            first[key] = tensor.name
    if renamed:
        _rename_inputs(model, renamed)
        kept = [t for t in graph.initializer if t.name not in renamed]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return len(renamed)


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    graph = model.graph
    used = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(kept)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return dropped


def drop_initializer_shapes(model: onnx.ModelProto) -> int:
    """Remove the value_info entries of weights (newer torch exporters write them): ONNX Runtime's quantizer
    transposes Gemm weights, and the stale shapes then fail its shape inference."""
    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    dropped = len(model.graph.value_info) - len(kept)
    if dropped:
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return dropped


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Unique names for nameless nodes: the quantizers leave layers in float by name."""
    taken = {node.name for node in model.graph.node}
    named = 0
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)
            named += 1
    return named


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, version: int = PER_CHANNEL_OPSET) -> tuple[onnx.ModelProto, dict]:
    """The model at `version` of the default domain if it is older (onnx.version_converter); unchanged when the
    converter cannot do it (static per-channel int8 then fails cleanly and another candidate is kept)."""
    before = default_opset(model)
    if before >= version:
        return model, {"from": before, "to": before}
    try:
        converted = version_converter.convert_version(model, version)
    except Exception as exc:
        return model, {"from": before, "to": before,
                       "not_converted": f"onnx.version_converter: {exc.__class__.__name__}: {str(exc)[:200]}"}
    return converted, {"from": before, "to": version}


def _outputs(path: Path, batches: list[list[np.ndarray]]) -> list[np.ndarray]:
    run = open_runner(path, "onnxruntime", "cpu", 1)
    return [np.asarray(o, np.float64).ravel() for batch in batches for o in run(batch)]


def relative_change(original: Path, normalized: Path, batches: list[list[np.ndarray]]) -> float:
    """Relative L2 distance between the two models' outputs on `batches`, all outputs together."""
    before = np.concatenate(_outputs(original, batches))
    after = np.concatenate(_outputs(normalized, batches))
    if before.shape != after.shape:
        return float("inf")
    return float(np.linalg.norm(before - after) / max(np.linalg.norm(before), 1e-30))


def normalize(source: Path, destination: Path, batches: list[list[np.ndarray]]) -> tuple[Path, dict]:
    """The model rewritten for the quantizers, and what was done. Returns `source` itself when nothing needed
    doing, and when the rewritten graph does not give the original's outputs on `batches` (said in the details)."""
    model = onnx.load(str(source))
    done = {"constants_to_initializers": constants_to_initializers(model),
            "weights_removed_from_inputs": weights_out_of_inputs(model),
            "duplicate_initializers_merged": merge_duplicate_initializers(model),
            "unused_initializers_dropped": drop_unused_initializers(model),
            "weight_shapes_dropped": drop_initializer_shapes(model),
            "unnamed_nodes_named": name_unnamed_nodes(model)}
    model, done["opset"] = upgrade_opset(model)
    changed = any(done[k] for k in done if k != "opset") or done["opset"]["from"] != done["opset"]["to"]
    if not changed:
        return source, {**done, "changed": False}
    onnx.save(model, str(destination))
    try:
        change = relative_change(source, destination, batches)
    except Exception as exc:
        destination.unlink(missing_ok=True)
        return source, {**done, "changed": False,
                        "reverted": f"the normalized graph does not run ({exc.__class__.__name__}): quantizing the "
                                    "graph as uploaded"}
    if not change <= MAX_RELATIVE_CHANGE:
        destination.unlink(missing_ok=True)
        return source, {**done, "changed": False, "output_change": change,
                        "reverted": "the normalized graph's outputs differ from the original's: quantizing the "
                                    "graph as uploaded"}
    return destination, {**done, "changed": True, "output_change": round(change, 9)}
