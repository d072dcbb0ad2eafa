import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import save_foreign_cnn
from worker.compression.normalize import default_opset, merge_duplicate_initializers, normalize, relative_change


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


def _conv_then(activation: list[onnx.NodeProto], opset: int, constants: dict[str, float]) -> onnx.ModelProto:
    """x -> Conv -> `activation` (reading "c", writing "y"), the activation's constants as Constant nodes (as
    Paddle writes them)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32), name))
             for name, v in constants.items()]
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"), *activation]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


PADDLE_HARD_SWISH = [helper.make_node("Add", ["c", "three"], ["a"]),
                     helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                     helper.make_node("Mul", ["c", "r"], ["m"]),
                     helper.make_node("Div", ["m", "six"], ["y"])]
HARD_SIGMOID_GATE = [helper.make_node("Add", ["three", "c"], ["a"]),
                     helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                     helper.make_node("Mul", ["r", "sixth"], ["g"]),
                     helper.make_node("Mul", ["g", "c"], ["y"])]
TORCH_HARD_SWISH = [helper.make_node("HardSigmoid", ["c"], ["g"], alpha=1 / 6, beta=0.5),
                    helper.make_node("Mul", ["c", "g"], ["y"])]


@pytest.mark.parametrize("activation", [PADDLE_HARD_SWISH, HARD_SIGMOID_GATE, TORCH_HARD_SWISH],
                         ids=["paddle", "gate-times-x", "hardsigmoid-times-x"])
def test_decomposed_hard_swish_becomes_one_hard_swish_at_opset_14(tmp_path, activation):
    source = tmp_path / "hswish.onnx"
    onnx.save(_conv_then(activation, 11, {"three": 3.0, "zero": 0.0, "six": 6.0, "sixth": 1 / 6}), str(source))
    rng = np.random.default_rng(2)
    inputs = [[rng.uniform(-4, 4, (1, 3, 8, 8)).astype(np.float32)] for _ in range(2)]
    path, details = normalize(source, tmp_path / "normalized.onnx", inputs)
    assert details["activations_fused"] == {"HardSwish": 1, "HardSigmoid": 0}
    assert details["opset"] == {"from": 11, "to": 14}
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Conv", "HardSwish"]
    assert relative_change(source, path, inputs) <= 1e-6


def test_hard_sigmoid_alone_and_shared_intermediates(tmp_path):
    """relu6(x + 3) / 6 becomes HardSigmoid; a product whose x + 3 is read elsewhere too is left as it is."""
    alone = _conv_then([helper.make_node("Add", ["c", "three"], ["a"]),
                        helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                        helper.make_node("Div", ["r", "six"], ["y"])], 13, {"three": 3.0, "zero": 0.0, "six": 6.0})
    shared = _conv_then([*PADDLE_HARD_SWISH[:3], helper.make_node("Div", ["m", "six"], ["d"]),
                         helper.make_node("Add", ["d", "a"], ["y"])], 13, {"three": 3.0, "zero": 0.0, "six": 6.0})
    inputs = [[np.random.default_rng(3).uniform(-4, 4, (1, 3, 8, 8)).astype(np.float32)]]
    for name, model, fused, ops in [("alone", alone, {"HardSwish": 0, "HardSigmoid": 1}, ["Conv", "HardSigmoid"]),
                                    ("shared", shared, None, None)]:
        source = tmp_path / f"{name}.onnx"
        onnx.save(model, str(source))
        path, details = normalize(source, tmp_path / f"{name}-normalized.onnx", inputs)
        if fused is None:
            assert not details.get("activations_fused", {}).get("HardSwish")
            continue
        assert details["activations_fused"] == fused
        assert [n.op_type for n in onnx.load(str(path)).graph.node] == ops
        assert relative_change(source, path, inputs) <= 1e-6


def test_fusion_that_moves_the_outputs_too_far_is_undone_and_the_rest_kept(tmp_path, monkeypatch):
    """A fused hard-swish rounds differently from its four ops; a graph that amplifies that past the threshold
    (the OCR detector) is normalized without the fusion (here: a threshold of 0, where only exact rewrites pass)."""
    import worker.compression.normalize as normalize_module

    source = tmp_path / "hswish.onnx"
    onnx.save(_conv_then(PADDLE_HARD_SWISH, 11, {"three": 3.0, "zero": 0.0, "six": 6.0}), str(source))
    inputs = [[np.random.default_rng(4).uniform(-4, 4, (1, 3, 8, 8)).astype(np.float32)]]
    monkeypatch.setattr(normalize_module, "MAX_RELATIVE_CHANGE", 0.0)
    path, details = normalize(source, tmp_path / "normalized.onnx", inputs)
    assert details["changed"] and details["activations_fused"] == {} and details["opset"]["to"] == 13
    assert details["activations_not_fused"].startswith("fusing them changed the outputs by")
    assert "HardSwish" not in [n.op_type for n in onnx.load(str(path)).graph.node]


def test_when_opset_14_is_out_of_reach_the_graph_still_reaches_13_unfused(tmp_path, monkeypatch):
    import worker.compression.normalize as normalize_module

    convert = normalize_module.version_converter.convert_version

    def without_14(model, version):
        if version >= 14:
            raise RuntimeError("no adapter")
        return convert(model, version)

    monkeypatch.setattr(normalize_module.version_converter, "convert_version", without_14)
    source = tmp_path / "hswish.onnx"
    onnx.save(_conv_then(PADDLE_HARD_SWISH, 11, {"three": 3.0, "zero": 0.0, "six": 6.0}), str(source))
    inputs = [[np.random.default_rng(5).uniform(-4, 4, (1, 3, 8, 8)).astype(np.float32)]]
    path, details = normalize(source, tmp_path / "normalized.onnx", inputs)
    assert details["opset"] == {"from": 11, "to": 13} and details["activations_fused"] == {}
    assert default_opset(onnx.load(str(path))) == 13
