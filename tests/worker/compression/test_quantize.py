import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.helpers import make_mlp, save_onnx
from worker.compression.quantize import gemm_to_matmul, quantize_module, quantize_onnx


def q(**fields) -> dict:
    """quantize_module's keyword arguments: a quantize step's defaults, overridden by `fields`."""
    return {"method": "dynamic", "dtype": "int8", "granularity": "per_channel", "group_size": None, "exclude": [],
            **fields}


def q_onnx(**fields) -> dict:
    """quantize_onnx's keyword arguments: as q, plus the calibration method's default and no calibration data."""
    return q(**{"calibration_method": "minmax", "calibration": None, **fields})


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def cosine(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("fields, max_ratio", [
    ({"method": "dynamic"}, 0.35),
    ({"method": "weight_only", "dtype": "int8", "granularity": "group", "group_size": 32}, 0.4),
    ({"method": "weight_only", "dtype": "int4", "granularity": "group", "group_size": 32}, 0.25),
    ({"dtype": "fp16"}, 0.55),
])
def test_onnx_methods_shrink_and_stay_faithful(tmp_path, fields, max_ratio):
    source = save_onnx(tmp_path / "m.onnx", 256, 512, 16)
    out = tmp_path / "q.onnx"
    quantize_onnx(source, out, **q_onnx(**fields))
    assert out.stat().st_size < max_ratio * source.stat().st_size
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    assert cosine(run(source, x), run(out, x)) > 0.99


def test_onnx_static_int8_uses_calibration(tmp_path):
    source = save_onnx(tmp_path / "m.onnx", 64, 128, 8)
    rng = np.random.default_rng(0)
    calibration = [[rng.standard_normal((4, 64)).astype(np.float32)] for _ in range(8)]
    out = tmp_path / "s.onnx"
    details = quantize_onnx(source, out, **q_onnx(method="static", calibration_method="minmax",
                                                   calibration=calibration))
    assert details["calibration_samples"] == 32 and details["calibration_method"] == "minmax"
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    x = rng.standard_normal((4, 64)).astype(np.float32)
    assert cosine(run(source, x), run(out, x)) > 0.98


def attention_like(path):
    """h = x W1 + b1; a = h h^T (two activations); y = (a h) W2 + b2: the shapes of one attention block."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
               for name, shape in [("w1", (16, 8)), ("b1", (8,)), ("w2", (8, 8)), ("b2", (8,))]]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="proj"),
             helper.make_node("Add", ["b1", "h0"], ["h"], name="proj_bias"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["a"], name="scores"),
             helper.make_node("MatMul", ["a", "h"], ["c"], name="context"),
             helper.make_node("MatMul", ["c", "w2"], ["y0"], name="out"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="out_bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_static_int8_fuses_weight_matmuls_and_keeps_activation_products_in_float(tmp_path):
    source = attention_like(tmp_path / "a.onnx")
    rng = np.random.default_rng(1)
    calibration = [[rng.standard_normal((8, 4, 16)).astype(np.float32)] for _ in range(4)]
    out = tmp_path / "s.onnx"
    details = quantize_onnx(source, out, **q_onnx(method="static", calibration=calibration))
    assert details["kept_in_float"]["activation_matmuls"] == 2 and details["fused_int8_matmuls"] == 2
    nodes = onnx.load(str(out)).graph.node
    fused = [n for n in nodes if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 2 and all(len(n.input) == 7 for n in fused)  # each took its bias
    assert sorted(n.name for n in nodes if n.op_type == "MatMul") == ["context", "scores"]
    assert not any(n.op_type == "Add" for n in nodes)
    x = rng.standard_normal((8, 4, 16)).astype(np.float32)
    assert cosine(run(source, x), run(out, x)) > 0.99


def test_static_int8_leaves_the_residual_exact(tmp_path):
    """r feeds an int8 MatMul (3-D, as in a transformer: 2-D ones become Gemm) and the residual Add: the Add reads
    r itself, not r quantized to uint8 and back."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "w"),
               numpy_helper.from_array(np.zeros(16, np.float32), "b")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w"], ["m0"], name="dense"),
             helper.make_node("Add", ["m0", "b"], ["m"], name="dense_bias"),
             helper.make_node("Add", ["m", "r"], ["y"], name="residual")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 16])], weights)
    source = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(source))
    calibration = [[rng.standard_normal((8, 4, 16)).astype(np.float32)] for _ in range(4)]
    out = tmp_path / "s.onnx"
    details = quantize_onnx(source, out, **q_onnx(method="static", calibration=calibration))
    assert details["kept_in_float"]["float_consumers_reading_exact_inputs"] == 1
    nodes = {n.name: n for n in onnx.load(str(out)).graph.node}
    assert "r" in nodes["residual"].input
    assert not any(n.op_type == "DequantizeLinear" for n in nodes.values())


def test_gemm_rewrite_keeps_outputs(tmp_path):
    source = save_onnx(tmp_path / "m.onnx", 16, 32, 4)
    model = onnx.load(str(source))
    assert gemm_to_matmul(model) == 3
    onnx.save(model, str(tmp_path / "r.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    assert np.allclose(run(source, x), run(tmp_path / "r.onnx", x), atol=1e-5)


@pytest.mark.parametrize("fields", [{"method": "dynamic"}, {"method": "dynamic", "granularity": "per_tensor"},
                                    {"method": "weight_only", "dtype": "int8"},
                                    {"method": "weight_only", "dtype": "int4", "granularity": "group",
                                     "group_size": 16},
                                    {"dtype": "fp16"}, {"dtype": "bf16"}])
def test_module_methods_export_and_stay_faithful(tmp_path, fields):
    model, x = make_mlp(64, 128, 8), torch.randn(4, 64)
    want = model(x).detach()
    quantized, details = quantize_module(make_mlp(64, 128, 8), **q(**fields))
    got = quantized(x).detach()
    assert got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    path = tmp_path / "q.pt2"
    torch.export.save(torch.export.export(quantized, (x,)), str(path))
    reloaded = torch.export.load(str(path)).module()
    assert torch.allclose(reloaded(x), got, atol=1e-4)


def test_module_exclude_keeps_layer_in_float():
    quantized, details = quantize_module(make_mlp(16, 32, 4), **q(method="weight_only", exclude=["^4$"]))
    assert details["quantized_layers"] == 2 and type(quantized[4]) is torch.nn.Linear


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_weight_only_onnx_counts_logical_params(tmp_path, dtype):
    from worker.formats.onnx_format import count_params

    source = save_onnx(tmp_path / "m.onnx", 64, 128, 8)
    out = tmp_path / "q.onnx"
    quantize_onnx(source, out, **q_onnx(method="weight_only", dtype=dtype, granularity="group", group_size=32))
    assert count_params(onnx.load(str(out)))[0] == count_params(onnx.load(str(source)))[0]


def test_conv_net_static_int8_runs_as_qlinearconv_with_depthwise_and_tiny_layers_in_float(tmp_path):
    import onnxruntime as ort

    from tests.helpers import save_foreign_cnn
    from worker.compression.normalize import normalize
    from worker.compression.quantize import onnx_static_int8

    rng = np.random.default_rng(0)
    batches = [[rng.standard_normal((2, 3, 32, 32)).astype(np.float32)] for _ in range(2)]
    source, _ = normalize(save_foreign_cnn(tmp_path / "cnn.onnx", opset=11), tmp_path / "n.onnx", batches)
    out = tmp_path / "s.onnx"
    details = onnx_static_int8(source, out, granularity="per_channel", exclude=[], calibration_method="minmax",
                               calibration=batches, convolutional=True)
    assert details["kept_in_float"]["depthwise_convolutions"] == ["depthwise"]
    assert details["kept_in_float"]["tiny_layers"] == ["stem", "fc"]
    stored = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert stored["stem_w_int8"] == stored["dw_w_int8"] == onnx.TensorProto.INT8  # float compute, int8 file
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    fused = {n.name for n in optimized if n.op_type == "QLinearConv"}
    assert len(fused) == 2  # conv and pointwise, Relu fused in
    assert sum(n.op_type in ("Conv", "FusedConv") for n in optimized) == 2  # stem and depthwise stay in float
    x = batches[0][0]
    assert cosine(run(source, x), run(out, x)) > 0.99


def test_static_int8_errors_never_show_server_paths(tmp_path):
    from worker.errors import without_server_paths

    message = f"INVALID_GRAPH : Load model from {tmp_path}/job/step0.onnx failed: node (/layer.0/Conv_quant)"
    assert without_server_paths(message) == "INVALID_GRAPH : Load model from <path> failed: node " \
                                            "(/layer.0/Conv_quant)"


def test_conv_nets_keep_adds_of_constants_in_float_but_quantize_residual_adds(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from worker.compression.quantize import float_convolutions

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(np.full((1,), 3.0, np.float32), "three")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "three"], ["shifted"], name="plus_three"),
             helper.make_node("Add", ["shifted", "x"], ["y"], name="residual")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], weights)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert float_convolutions(path) == {"depthwise_convolutions": [], "tiny_layers": [],
                                        "adds_of_constants": ["plus_three"]}


def test_int8_weight_storage_is_folded_at_load_smaller_and_close(tmp_path):
    """Conv, depthwise and Gemm weights in int8 (Cast + Mul in the file): ONNX Runtime folds the decoding when the
    session loads, so the optimized graph has the fp32 model's ops, and the outputs stay close."""
    from tests.helpers import save_foreign_cnn
    from worker.compression.normalize import normalize
    from worker.compression.quantize import onnx_weights_int8

    rng = np.random.default_rng(0)
    batches = [[rng.standard_normal((2, 3, 32, 32)).astype(np.float32)]]
    source, _ = normalize(save_foreign_cnn(tmp_path / "cnn.onnx", opset=11), tmp_path / "n.onnx", batches)
    out = tmp_path / "w8.onnx"
    details = onnx_weights_int8(source, out, exclude=["^fc$"])
    assert details["weights_stored_int8"] == 4 and details["excluded_nodes"] == ["fc"]
    stored = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert stored["conv_w_int8"].data_type == onnx.TensorProto.INT8
    assert list(stored["conv_w_scale"].dims) == [32, 1, 1, 1]
    assert stored["fc_w"].data_type == onnx.TensorProto.FLOAT  # excluded
    assert out.stat().st_size < 0.4 * source.stat().st_size
    optimized = {}
    for name, path in (("fp32", source), ("int8 storage", out)):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp_path / f"{name}.optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized[name] = sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert optimized["int8 storage"] == optimized["fp32"] and "Cast" not in optimized["fp32"]
    x = batches[0][0]
    assert cosine(run(source, x), run(out, x)) > 0.999


def test_int8_weight_storage_leaves_weights_read_elsewhere_in_float():
    from onnx import TensorProto, helper, numpy_helper

    from worker.compression.quantize import store_weights_int8

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [w])
    model = helper.make_model(graph)
    assert store_weights_int8(model) == 0 and [t.name for t in model.graph.initializer] == ["w"]


def _matmul_chain(path, layers=4, width=16):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}")
               for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}" if i < layers - 1 else "y"],
                              name=f"mm{i}") for i in range(layers)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _in_float(path) -> set[str]:
    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"}


def test_partial_dynamic_int8_leaves_the_products_that_cost_most_in_float(tmp_path):
    from worker.compression.quantize import onnx_dynamic_int8_partial, weight_matmuls

    source = _matmul_chain(tmp_path / "chain.onnx")
    assert weight_matmuls(source) == ["mm0", "mm1", "mm2", "mm3"]
    scored = []

    def score(path, every_batch):  # pretends mm1's int8 costs the output most, mm3's next
        scored.append(every_batch)
        kept = _in_float(path)
        return 0.97 + 0.02 * ("mm1" in kept) + 0.005 * ("mm3" in kept)

    details = onnx_dynamic_int8_partial(source, tmp_path / "q.onnx", granularity="per_channel", exclude=[],
                                        score=score, line=0.994, groups=4, most=3)
    assert scored == [False] * 4 + [True, True]  # a scan of each run, then mm1, then mm1 and mm3 in float
    assert details["kept_in_float"] == ["mm1", "mm3"] and details["cosine"] == 0.995
    assert [r["first"] for r in details["sensitivity"]][:2] == ["mm1", "mm3"]
    assert _in_float(tmp_path / "q.onnx") == {"mm1", "mm3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx", "q.onnx"]


def test_partial_dynamic_int8_stops_at_the_most_runs_and_honours_exclude(tmp_path):
    from worker.compression.quantize import onnx_dynamic_int8_partial

    source = _matmul_chain(tmp_path / "chain.onnx", layers=6)
    details = onnx_dynamic_int8_partial(source, tmp_path / "q.onnx", granularity="per_channel", exclude=["^mm0$"],
                                        score=lambda path, every: 0.9, line=0.99, groups=5, most=2)
    assert details["excluded_nodes"] == ["mm0"] and len(details["kept_in_float"]) == 2
    assert details["weight_matmuls"] == 5 and details["cosine"] == 0.9
    assert _in_float(tmp_path / "q.onnx") == {"mm0", *details["kept_in_float"]}
