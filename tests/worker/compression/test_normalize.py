import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import save_foreign_cnn
from worker.compression.normalize import (default_opset, merge_duplicate_initializers, normalize,
                                          relative_change)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [[rng.standard_normal((2, 3, 32, 32)).astype(np.float32)] for _ in range(2)]


def test_foreign_graph_gets_initializers_opset_13_and_the_same_outputs(tmp_path, batches):
    source = save_foreign_cnn(tmp_path / "cnn.onnx", opset=11)
    path, details = normalize(source, tmp_path / "normalized.onnx", batches)
    assert path != source and details["changed"]
    assert details["constants_to_initializers"] == 11
    assert details["duplicate_initializers_merged"] == 1  # dw_b holds conv_b's bytes
    assert details["unused_initializers_dropped"] == 1
    assert details["opset"] == {"from": 11, "to": 13}
    model = onnx.load(str(path))
    assert default_opset(model) == 13
    assert not [n for n in model.graph.node if n.op_type == "Constant"]
    assert {t.name for t in model.graph.initializer} == {"stem_w", "stem_b", "conv_w", "conv_b", "dw_w", "pw_w",
                                                          "pw_b", "fc_w", "fc_b"}
    assert next(n for n in model.graph.node if n.name == "depthwise").input[2] == "conv_b"
    assert details["output_change"] <= 1e-6 and relative_change(source, path, batches) <= 1e-6


def test_a_clean_graph_is_left_as_it_is(tmp_path, batches):
    source = save_foreign_cnn(tmp_path / "cnn.onnx", opset=13, constants=False)
    model = onnx.load(str(source))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "unused"))
    next(t for t in model.graph.initializer if t.name == "dw_b").CopyFrom(
        numpy_helper.from_array(np.full(32, 0.2, np.float32), "dw_b"))
    onnx.save(model, str(source))
    path, details = normalize(source, tmp_path / "normalized.onnx", batches)
    assert path == source and not details["changed"]
    assert not (tmp_path / "normalized.onnx").exists()


def test_duplicates_read_by_a_subgraph_are_renamed_there_too():
    weight = np.ones((2,), np.float32)
    inner = helper.make_graph([helper.make_node("Add", ["x", "b"], ["z"])], "body", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Add", ["x", "a"], ["y"]),
             helper.make_node("If", ["c"], ["w"], then_branch=inner, else_branch=inner)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(weight, "a"), numpy_helper.from_array(weight, "b")])
    model = helper.make_model(graph)
    assert merge_duplicate_initializers(model) == 1
    body = model.graph.node[1].attribute[0].g
    assert body.node[0].input[1] == "a" and [t.name for t in model.graph.initializer] == ["a"]
