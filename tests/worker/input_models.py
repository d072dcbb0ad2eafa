"""Tiny ONNX graphs (onnx.helper) whose inputs the declared shapes alone do not describe: an image model with
symbolic height and width, and a streaming model with a signal, a state whose batch is axis 1 and a scalar
sample rate, padded in reflect mode so that it needs at least MIN_SAMPLES samples."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_SAMPLES = 64  # reflect padding of 63 on each side needs 64 samples
STATE = 8


def save_image_model(path: Path) -> Path:
    """image [N, 3, H, W] float -> per-channel means through a 3x4 MatMul: [N, 4]."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["logits"])],
        "image", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def save_stateful_model(path: Path) -> Path:
    """input [N, samples] float, state [2, N, STATE] float, sr [] int64 -> output [N, 4], stateN [2, N, STATE].

    The signal is padded in reflect mode by MIN_SAMPLES - 1 on each side (ONNX Runtime refuses shorter ones);
    the state's mean over its first axis joins the signal's features, so its batch must be the signal's."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(np.array([0, MIN_SAMPLES - 1, 0, MIN_SAMPLES - 1], dtype=np.int64), "pads"),
        numpy_helper.from_array(rng.standard_normal((1, STATE)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((STATE, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(1 / 16000, dtype=np.float32), "per_hz"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Pad", ["input", "pads"], ["padded"], mode="reflect"),
        helper.make_node("ReduceMean", ["padded"], ["level"], axes=[1], keepdims=1),
        helper.make_node("MatMul", ["level", "w1"], ["features"]),
        helper.make_node("ReduceMean", ["state"], ["memory"], axes=[0], keepdims=0),
        helper.make_node("Add", ["features", "memory"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["scores"]),
        helper.make_node("Cast", ["sr"], ["sr_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sr_float", "per_hz"], ["rate"]),
        helper.make_node("Mul", ["scores", "rate"], ["output"]),
        helper.make_node("Mul", ["state", "half"], ["stateN"]),
    ]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "samples"]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", STATE]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", STATE])],
        initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


STATEFUL_SPECS = {"input": {"shape": [1, 2 * MIN_SAMPLES]}, "state": {"shape": [2, 1, STATE], "batch_axis": 1},
                  "sr": {"value": 16000}}
