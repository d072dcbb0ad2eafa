import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import save_conv_only_onnx
from worker.compression import smoothing
from worker.compression.quantize import quantize_onnx


def outlier_model(path, features=64, hidden=128, seed=0):
    """x -> LayerNorm -> (MatMul W1, and a residual Add) -> MatMul W2: three of the LayerNorm's output channels
    are 60x the rest, as in transformer encoders, and the LayerNorm output also feeds the residual."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(features, np.float32)
    gamma[[3, 17, 40]] = 60.0
    w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, features)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "ln"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(features, np.float32), "beta"),
         numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def batches(count=6, seed=1, features=64):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((8, features)).astype(np.float32)] for _ in range(count)]


def test_smoothing_keeps_the_fp32_outputs_and_the_residual(tmp_path):
    source = outlier_model(tmp_path / "m.onnx")
    channel_max = smoothing.activation_channel_max(source, batches())
    assert set(channel_max) == {"ln", "a"} and channel_max["ln"][3] > 30 * np.median(channel_max["ln"])
    smoothed = tmp_path / "s.onnx"
    assert smoothing.smooth(source, smoothed, channel_max, 0.8) == 2
    x = batches(1, seed=7)[0][0]
    np.testing.assert_allclose(run(smoothed, x), run(source, x), rtol=1e-4, atol=1e-4)
    graph = onnx.load(str(smoothed)).graph
    residual = next(n for n in graph.node if n.name == "residual")
    assert residual.input[1] == "ln"  # the residual still takes the unsmoothed LayerNorm output
    assert [n.op_type for n in graph.node].count("Mul") == 2


def test_a_weight_used_elsewhere_is_not_smoothed(tmp_path):
    source = outlier_model(tmp_path / "m.onnx")
    model = onnx.load(str(source))
    model.graph.node.append(helper.make_node("Gather", ["w1", "idx"], ["tied"], name="tied_embedding", axis=0))
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "idx"))
    model.graph.output.append(helper.make_tensor_value_info("tied", TensorProto.FLOAT, None))
    assert set(smoothing.smoothable_inputs(model)) == {"a"}


def test_smoothed_dynamic_int8_is_more_faithful_and_reports_its_choice(tmp_path):
    source = outlier_model(tmp_path / "m.onnx")
    options = {"method": "dynamic", "dtype": "int8", "granularity": "per_channel", "group_size": None,
               "exclude": [], "calibration_method": "minmax", "calibration": batches()}
    plain, smoothed = tmp_path / "plain.onnx", tmp_path / "smoothed.onnx"
    quantize_onnx(source, plain, **options)
    details = quantize_onnx(source, smoothed, **options, smoothing="auto")
    x = batches(2, seed=9)[0][0]
    reference = run(source, x)
    assert cosine(reference, run(smoothed, x)) > cosine(reference, run(plain, x))
    assert details["smoothing"]["alpha"] in (0.6, 0.7, 0.8, 0.9, 1.0) and details["smoothing"]["smoothed_inputs"] == 2
    assert set(details["smoothing"]["calibration_cosine_by_alpha"]) == {"0.6", "0.7", "0.8", "0.9", "1.0"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "plain.onnx", "smoothed.onnx"]


def test_smoothed_static_int8_with_a_fixed_alpha(tmp_path):
    source = outlier_model(tmp_path / "m.onnx")
    out = tmp_path / "static.onnx"
    details = quantize_onnx(source, out, method="static", dtype="int8", granularity="per_channel", group_size=None,
                            exclude=[], calibration_method="minmax", calibration=batches(), smoothing=1.0)
    assert details["method"] == "static" and details["smoothing"]["alpha"] == 1.0
    assert "calibration_cosine_by_alpha" not in details["smoothing"]
    x = batches(1, seed=5)[0][0]
    assert cosine(run(source, x), run(out, x)) > 0.98


def test_candidates_are_compared_on_real_tokens_only():
    rng = np.random.default_rng(0)
    want = rng.standard_normal((2, 5, 8)).astype(np.float32)
    got = want.copy()
    got[:, 3:] = rng.standard_normal((2, 2, 8))  # the outputs differ only where the mask says padding
    mask = np.array([[1, 1, 1, 0, 0]] * 2, dtype=bool)
    assert smoothing.output_cosine([[want]], [[got]], [mask]) > 0.999999
    assert smoothing.output_cosine([[want]], [[got]], [None]) < 0.9


def test_smoothing_a_model_without_matmul_inputs_says_it_did_nothing(tmp_path):
    """bench/zoo.py: int8-faithful on convolutional OCR nets smoothed nothing and said nothing."""
    source = save_conv_only_onnx(tmp_path / "convs.onnx")
    calibration = [[np.random.default_rng(seed).standard_normal((2, 3, 16, 16)).astype(np.float32)]
                   for seed in range(2)]
    details = quantize_onnx(source, tmp_path / "q.onnx", method="dynamic", dtype="int8", granularity="per_channel",
                            group_size=None, exclude=[], calibration_method="minmax", calibration=calibration,
                            smoothing=0.5)
    assert details["smoothing"]["smoothed_inputs"] == 0
    assert "smoothing found no MatMul input to smooth" in details["warning"]
