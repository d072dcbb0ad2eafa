"""Graph normalization before quantization, for ONNX models from other exporters.

Exporters other than torch's (Paddle's paddle2onnx, older tf2onnx) write weights as Constant nodes, repeat the same
tensor under several names, list weights among the graph inputs and stop at opset 11 or 12. ONNX Runtime's
quantizers need weights as initializers ("Expected ... to be an initializer"), and per-channel QDQ needs
DequantizeLinear's `axis`, which exists from opset 13 on: static int8 on such graphs is invalid. Paddle also writes
hard-swish as Add(x, 3) / Clip(0, 6) / Mul / Div(6), four float passes per activation that no ONNX Runtime fusion
knows; they become one HardSwish (opset 14) or HardSigmoid op. Every rewrite here keeps the model's function;
`normalize` checks that on the job's inputs.
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from worker.runtime import open_runner

# Per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute) exist from opset 13.
PER_CHANNEL_OPSET = 13
# HardSwish exists from opset 14.
HARD_SWISH_OPSET = 14
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


def _keep(entries, wanted) -> int:
    """Keep the entries of a repeated protobuf field for which `wanted` holds; returns how many were dropped."""
    kept = [entry for entry in entries if wanted(entry)]
    dropped = len(entries) - len(kept)
    if dropped:
        del entries[:]
        entries.extend(kept)
    return dropped


def weights_out_of_inputs(model: onnx.ModelProto) -> int:
    """Initializers listed among the graph inputs (older exporters) are weights, not inputs: ONNX Runtime would let
    a caller override them, and the quantizers treat them as activations. Allowed from IR version 4 on."""
    if model.ir_version < 4:
        return 0
    weights = {t.name for t in model.graph.initializer}
    return _keep(model.graph.input, lambda i: i.name not in weights)


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
        _keep(graph.initializer, lambda t: t.name not in renamed)
    return len(renamed)


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    graph = model.graph
    used = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    return _keep(graph.initializer, lambda t: t.name in used)


def drop_initializer_shapes(model: onnx.ModelProto) -> int:
    """Remove the value_info entries of weights (newer torch exporters write them): ONNX Runtime's quantizer
    transposes Gemm weights, and the stale shapes then fail its shape inference."""
    weights = {t.name for t in model.graph.initializer}
    return _keep(model.graph.value_info, lambda v: v.name not in weights)


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


def _scalar(model: onnx.ModelProto, name: str) -> float | None:
    """The value of a one-element initializer, else None."""
    tensor = next((t for t in model.graph.initializer if t.name == name), None)
    if tensor is None or int(np.prod(tensor.dims)) != 1:
        return None
    return float(numpy_helper.to_array(tensor).ravel()[0])


def _equals(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))


class _Graph:
    """Producers and consumers of a graph's tensors, for matching small patterns."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in _all_nodes(model.graph):
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in model.graph.output}

    def only_feeds(self, name: str, node: onnx.NodeProto) -> bool:
        """`name` is read by `node` alone (so the node producing it can go once `node` is rewritten)."""
        return name not in self.outputs and [id(n) for n in self.consumers.get(name, [])] == [id(node)]

    def single(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def relu6_of_x_plus_3(self, name: str) -> str | None:
        """x when `name` is Clip(Add(x, 3), 0, 6) (min/max as inputs, or as attributes before opset 11)."""
        clip = self.single(name, "Clip")
        if clip is None:
            return None
        attributes = {a.name: a.f for a in clip.attribute}
        low = _scalar(self.model, clip.input[1]) if len(clip.input) > 1 and clip.input[1] else attributes.get("min")
        high = _scalar(self.model, clip.input[2]) if len(clip.input) > 2 and clip.input[2] else attributes.get("max")
        add = self.single(clip.input[0], "Add")
        if not (_equals(low, 0.0) and _equals(high, 6.0)) or add is None or not self.only_feeds(add.output[0], clip):
            return None
        for x, three in (add.input, reversed(add.input)):
            if _equals(_scalar(self.model, three), 3.0):
                return x
        return None

    def scaled_by_one_sixth(self, node: onnx.NodeProto) -> str | None:
        """y when `node` is Div(y, 6) or Mul(y, 1/6)."""
        if node.op_type == "Div" and _equals(_scalar(self.model, node.input[1]), 6.0):
            return node.input[0]
        if node.op_type == "Mul":
            for y, sixth in (node.input, reversed(node.input)):
                if _equals(_scalar(self.model, sixth), 1 / 6):
                    return y
        return None


def _hard_swish_match(graph: _Graph, node: onnx.NodeProto) -> tuple[str, str] | None:
    """("HardSwish" | "HardSigmoid", x) when `node` ends one of: x * relu6(x + 3) / 6 (either order of the
    product, the division before or after it), relu6(x + 3) / 6, x * HardSigmoid(x) with alpha 1/6 and beta 0.5."""
    if node.domain not in ("", "ai.onnx"):
        return None
    scaled = graph.scaled_by_one_sixth(node)
    if scaled is not None:
        x = graph.relu6_of_x_plus_3(scaled)
        if x is not None and graph.only_feeds(scaled, node):
            return "HardSigmoid", x
        product = graph.single(scaled, "Mul")
        if product is not None and graph.only_feeds(scaled, node):
            for x, gate in (product.input, reversed(product.input)):
                if graph.only_feeds(gate, product) and graph.relu6_of_x_plus_3(gate) == x:
                    return "HardSwish", x
    if node.op_type == "Mul":
        for x, gate_name in (node.input, reversed(node.input)):
            if not graph.only_feeds(gate_name, node):
                continue
            gate = graph.producer.get(gate_name)
            if gate is None or gate.domain not in ("", "ai.onnx"):
                continue
            if gate.op_type == "HardSigmoid":
                attributes = {a.name: a.f for a in gate.attribute}
                if (gate.input[0] == x and _equals(attributes.get("alpha", 0.2), 1 / 6)
                        and _equals(attributes.get("beta", 0.5), 0.5)):
                    return "HardSwish", x
            if gate.op_type in ("Div", "Mul"):
                scaled = graph.scaled_by_one_sixth(gate)
                if scaled is not None and graph.only_feeds(scaled, gate) and graph.relu6_of_x_plus_3(scaled) == x:
                    return "HardSwish", x
    return None


def fuse_hard_swish(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite decomposed hard-swish and hard-sigmoid activations (see _hard_swish_match) as one HardSwish or
    HardSigmoid node each; the nodes only they read are dropped. HardSwish needs opset 14: the caller upgrades
    the model first. Returns how many of each were rewritten."""
    created: set[str] = set()
    while True:
        graph = _Graph(model)
        found = next(((node, match) for node in model.graph.node if (match := _hard_swish_match(graph, node))),
                     None)
        if found is None:
            break
        node, (op_type, x) = found
        attributes = {"alpha": 1 / 6, "beta": 0.5} if op_type == "HardSigmoid" else {}
        fused = helper.make_node(op_type, [x], [node.output[0]], name=f"{node.name or node.output[0]}_{op_type}",
                                 **attributes)
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(position, fused)
        _drop_dead_nodes(model)
        created.add(fused.name)
    kept = [n.op_type for n in model.graph.node if n.name in created]
    return {"HardSwish": kept.count("HardSwish"), "HardSigmoid": kept.count("HardSigmoid")}


def has_hard_swish(model: onnx.ModelProto) -> bool:
    graph = _Graph(model)
    return any(_hard_swish_match(graph, node) for node in model.graph.node)


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Main-graph nodes whose outputs nothing reads, until none is left."""
    graph = model.graph
    while True:
        used = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


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


def _rewritten(source: Path, fuse_activations: bool) -> tuple[onnx.ModelProto, dict]:
    model = onnx.load(str(source))
    done = {"constants_to_initializers": constants_to_initializers(model),
            "weights_removed_from_inputs": weights_out_of_inputs(model),
            "duplicate_initializers_merged": merge_duplicate_initializers(model),
            "unused_initializers_dropped": drop_unused_initializers(model),
            "weight_shapes_dropped": drop_initializer_shapes(model),
            "unnamed_nodes_named": name_unnamed_nodes(model)}
    fuse = fuse_activations and has_hard_swish(model)
    upgraded, done["opset"] = upgrade_opset(model, HARD_SWISH_OPSET if fuse else PER_CHANNEL_OPSET)
    if fuse and "not_converted" in done["opset"]:  # per-channel int8 matters more than the fusion
        upgraded, done["opset"] = upgrade_opset(model, PER_CHANNEL_OPSET)
    model = upgraded
    done["activations_fused"] = fuse_hard_swish(model) if fuse and default_opset(model) >= HARD_SWISH_OPSET else {}
    return model, done


def normalize(source: Path, destination: Path, batches: list[list[np.ndarray]]) -> tuple[Path, dict]:
    """The model rewritten for the quantizers, and what was done. Returns `source` itself when nothing needed
    doing, and when the rewritten graph does not give the original's outputs on `batches` (said in the details).
    Fused activations round differently from their decomposition; where that moves the outputs past
    MAX_RELATIVE_CHANGE (the OCR detector of issue 11 amplifies it to 1.2e-4), the graph is rewritten again
    without fusing them."""
    model, done = _rewritten(source, fuse_activations=True)
    changed = (any(done[k] for k in done if k not in ("opset", "activations_fused"))
               or done["opset"]["from"] != done["opset"]["to"] or any(done["activations_fused"].values()))
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
    if not change <= MAX_RELATIVE_CHANGE and any(done["activations_fused"].values()):
        model, done = _rewritten(source, fuse_activations=False)
        done["activations_not_fused"] = f"fusing them changed the outputs by {change:.2e} (relative L2)"
        onnx.save(model, str(destination))
        change = relative_change(source, destination, batches)
    if not change <= MAX_RELATIVE_CHANGE:
        destination.unlink(missing_ok=True)
        return source, {**done, "changed": False, "output_change": change,
                        "reverted": "the normalized graph's outputs differ from the original's: quantizing the "
                                    "graph as uploaded"}
    return destination, {**done, "changed": True, "output_change": round(change, 9)}
