"""ONNX models: validated with the checker and loaded by ONNX Runtime; external data is refused."""

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from worker.errors import JobFailure
from worker.evaluation.runtime import ort_session

ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
             "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
             "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _load_checked(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise JobFailure("invalid_model", f"not a readable ONNX model: {exc.__class__.__name__}") from None
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise JobFailure("invalid_model", f"initializer {tensor.name!r} uses external data; upload a single "
                                              "self-contained .onnx file")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise JobFailure("invalid_model", f"ONNX checker rejected the model: {str(exc)[:500]}") from None
    return model


def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """(params, nonzero params) over the weights; quantization scales and zero points are bookkeeping."""
    total = nonzero = 0
    for tensor in model.graph.initializer:
        if tensor.name.endswith(("_scale", "_zero_point")):
            continue
        array = onnx.numpy_helper.to_array(tensor)
        total += array.size
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


def _describe(values) -> list[dict[str, Any]]:
    return [{"name": v.name, "shape": [d if isinstance(d, int) else (d or "dim") for d in v.shape],
             "dtype": ORT_TYPES.get(v.type, v.type)} for v in values]


def inspect(path: Path) -> dict[str, Any]:
    model = _load_checked(path)
    try:
        session = ort_session(path, "cpu")
    except Exception as exc:
        raise JobFailure("invalid_model", f"ONNX Runtime cannot load the model: {str(exc)[:500]}") from None
    params, nonzero = count_params(model)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"params": params, "nonzero_params": nonzero, "inputs": _describe(session.get_inputs()),
            "outputs": _describe(session.get_outputs()),
            "architecture": {"opset": [{"domain": o.domain or "ai.onnx", "version": o.version}
                                       for o in model.opset_import],
                             "producer": model.producer_name, "ops": ops}}


def load(path: Path):
    from worker.formats import LoadedModel

    info = inspect(path)
    return LoadedModel(format="onnx", inputs=info["inputs"], outputs=info["outputs"], onnx_path=path, info=info)
