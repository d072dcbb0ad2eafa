"""ONNX inspection on graphs as other exporters write them (found by bench/zoo.py on PaddleOCR and Silero models)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.formats.onnx_format import count_params, inspect

WEIGHT = np.arange(1, 4 * 3 * 3 * 3 + 1, dtype=np.float32).reshape(4, 3, 3, 3) / 100
BIAS = np.array([0.0, 0.5, 0.0, -0.5], dtype=np.float32)  # two zeros: nonzero count differs from the total


def conv_model(weights_as: str) -> onnx.ModelProto:
    """One Conv whose weight and bias are initializers, Constant nodes, or Constant nodes inside an If branch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    tensors = [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS, "b")]
    shape = helper.make_node("Constant", [], ["unused_shape"], value=numpy_helper.from_array(np.array([1, 4]), "s"))
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in tensors]
    if weights_as == "initializers":
        graph = helper.make_graph([conv], "g", [x], [y], initializer=tensors)
    elif weights_as == "constants":
        graph = helper.make_graph([shape, *constants, conv], "g", [x], [y])
    else:
        branch = helper.make_graph([*constants, conv], "branch", [], [y])
        flag = helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True), "f"))
        choose = helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)
        graph = helper.make_graph([flag, choose], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_constant_node_weights_are_counted_like_initializers(tmp_path):
    expected = (WEIGHT.size + BIAS.size, WEIGHT.size + 2)
    for weights_as in ("initializers", "constants"):
        path = tmp_path / f"{weights_as}.onnx"
        onnx.save(conv_model(weights_as), str(path))
        assert count_params(onnx.load(str(path))) == expected, weights_as
        info = inspect(path)
        assert (info["params"], info["nonzero_params"]) == expected, weights_as


def test_weights_inside_if_branches_are_counted():
    # both branches hold the weights: a graph with two alternative weight sets holds both
    assert count_params(conv_model("if_branch")) == (2 * (WEIGHT.size + BIAS.size), 2 * (WEIGHT.size + 2))
