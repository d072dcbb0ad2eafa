"""ONNX models: validated with the checker and loaded by ONNX Runtime; external data is refused."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from app.core.errors import ErrorCode
from worker.errors import JobFailure
from worker.formats.loaded import LoadedModel
from worker.formats.suggestions import UNNAMED_DIM
from worker.runtime import ort_session

ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
             "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
             "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _load_checked(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise JobFailure(ErrorCode.INVALID_MODEL, f"not a readable ONNX model: {exc.__class__.__name__}") from None
    for where, tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
            raise JobFailure(ErrorCode.INVALID_MODEL,
                             f"{where} uses external data (location {location[:200]!r}); upload "
                             "a single self-contained .onnx file")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise JobFailure(ErrorCode.INVALID_MODEL, f"ONNX checker rejected the model: {str(exc)[:500]}") from None
    return model


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor the model holds and where: initializers, sparse initializers and node attributes, in the
    graph, in subgraphs (If/Loop/Scan bodies) and in local functions. Walked with lists, not recursion."""
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            for tensor in graph.initializer:
                yield f"initializer {tensor.name!r}", tensor
            for sparse in graph.sparse_initializer:
                yield f"sparse initializer {sparse.values.name!r}", sparse.values
                yield f"sparse initializer {sparse.values.name!r}", sparse.indices
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attribute in node.attribute:
            where = f"attribute {attribute.name!r} of {node.op_type} node {node.name!r}"
            for tensor in [attribute.t, *attribute.tensors]:
                yield where, tensor
            for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
                yield where, sparse.values
                yield where, sparse.indices
            graphs.extend([attribute.g, *attribute.graphs])


def _packed_weights(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """MatMulNBits weight initializers -> (bits, logical element count K x N); their scales are bookkeeping."""
    packed = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            packed[node.input[1]] = (attrs.get("bits", 4), attrs["K"] * attrs["N"])
            packed.update({name: (0, 0) for name in node.input[2:] if name})
    return packed


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _weights(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers of the graph and of its subgraphs, and the floating-point values of Constant nodes: some
    exporters (PaddlePaddle's, Silero's) store every weight as a Constant node or inside an If branch."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if node.op_type == "Constant" and attribute.name == "value" and attribute.t.data_type in FLOAT_TYPES:
                    yield attribute.t
                if attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """(params, nonzero params) over the weights, counting packed low-bit weights by their logical size;
    quantization scales and zero points are bookkeeping. Where a weight is stored (initializer, Constant node,
    subgraph) does not change the count."""
    packed = _packed_weights(model)
    total = nonzero = 0
    for tensor in _weights(model):
        if tensor.name.endswith(("_scale", "_zero_point")):
            continue
        array = onnx.numpy_helper.to_array(tensor)
        if tensor.name in packed:
            bits, count = packed[tensor.name]
            if count:
                # symmetric MatMulNBits stores value v as v + 2^(bits-1): a zero weight is the midpoint code
                codes = np.stack([array & 0xF, array >> 4], axis=-1).ravel() if bits == 4 else array.ravel()
                total += count
                nonzero += min(count, int(np.count_nonzero(codes != 2 ** (bits - 1))))
            continue
        total += array.size
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


def _describe(values) -> list[dict[str, Any]]:
    return [{"name": v.name, "shape": [d if isinstance(d, int) else (d or UNNAMED_DIM) for d in v.shape],
             "dtype": ORT_TYPES.get(v.type, v.type)} for v in values]


def inspect(path: Path) -> dict[str, Any]:
    model = _load_checked(path)
    try:
        session = ort_session(path, "cpu", optimize=False)
    except Exception as exc:  # its message names the worker's scratch path: show the file name instead
        reason = str(exc).replace(str(path), path.name)
        raise JobFailure(ErrorCode.INVALID_MODEL, f"ONNX Runtime cannot load the model: {reason[:500]}") from None
    params, nonzero = count_params(model)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"params": params, "nonzero_params": nonzero, "inputs": _describe(session.get_inputs()),
            "outputs": _describe(session.get_outputs()),
            "architecture": {"opset": [{"domain": o.domain or "ai.onnx", "version": o.version}
                                       for o in model.opset_import],
                             "producer": model.producer_name, "ops": ops}}


def load(path: Path) -> LoadedModel:
    info = inspect(path)
    return LoadedModel(format="onnx", inputs=info["inputs"], outputs=info["outputs"], onnx_path=path, info=info)
