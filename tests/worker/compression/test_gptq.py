import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import save_onnx
from worker.compression import gptq
from worker.compression.quantize import quantize_onnx


def matmul_model(path, weight: np.ndarray):
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def correlated(rng, rows: int, k: int, seed: int = 7) -> np.ndarray:
    """Inputs that live near one low-rank subspace (the same for every call) with a few loud channels, as
    transformer activations do: where GPTQ's error feedback has something to exploit."""
    basis = np.random.default_rng(seed).standard_normal((8, k))
    x = rng.standard_normal((rows, 8)) @ basis + 0.05 * rng.standard_normal((rows, k))
    x[:, :3] *= 10
    return x.astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 40])
def test_stored_blocks_compute_the_dequantized_weight(tmp_path, symmetric, k):
    """What ONNX Runtime computes from the packed blocks is x @ (codes - zero) * scale, K padded to whole
    blocks included: the integers GPTQ chose are the ones that run."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, 24)).astype(np.float32)
    x = correlated(rng, 256, k)
    source = matmul_model(tmp_path / "m.onnx", weight)
    out = tmp_path / "q.onnx"
    details = gptq.quantize_model(source, out, [[x]], bits=4, group_size=32, symmetric=symmetric, excluded=[],
                                  mask_position=None)
    assert details["quantized_matmuls"] == 1 and details["calibration_tokens"] == 256
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["MatMulNBits"]

    padded = np.pad(weight, ((0, -k % 32), (0, 0)))
    hessian = np.pad(x.astype(np.float64).T @ x, ((0, -k % 32), (0, -k % 32)))
    codes, scales, zeros = gptq.gptq(padded, hessian, bits=4, group_size=32, symmetric=symmetric)
    assert codes.max() <= 15
    dequantized = (codes.astype(np.float32) - np.repeat(zeros, 32, axis=1)) * np.repeat(scales, 32, axis=1)
    expected = x @ dequantized.T[:k]
    got = run(out, x)
    # accuracy_level 4 quantizes the activations to int8 inside the kernel: close, not bit-equal
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_gptq_output_error_is_below_round_to_nearest(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((128, 64)).astype(np.float32)
    calibration, held_out = correlated(rng, 512, 128), correlated(np.random.default_rng(2), 512, 128)
    source = matmul_model(tmp_path / "m.onnx", weight)
    rtn, data_aware = tmp_path / "rtn.onnx", tmp_path / "gptq.onnx"
    common = {"method": "weight_only", "dtype": "int4", "granularity": "group", "group_size": 32, "exclude": [],
              "calibration_method": "minmax"}
    quantize_onnx(source, rtn, **common, calibration=None, algorithm="rtn")
    details = quantize_onnx(source, data_aware, **common, calibration=[[calibration]], algorithm="gptq")
    assert details["algorithm"] == "gptq" and details["gptq"]["calibration_samples"] == 512
    reference = held_out @ weight
    rtn_error = np.mean((run(rtn, held_out) - reference) ** 2)
    gptq_error = np.mean((run(data_aware, held_out) - reference) ** 2)
    assert gptq_error < 0.7 * rtn_error


def test_padded_positions_stay_out_of_the_hessian():
    value = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    rows = gptq.real_rows(value, mask)
    assert rows.shape == (3, 4)
    np.testing.assert_array_equal(rows, value[[0, 0, 1], [0, 1, 0]])
    assert gptq.real_rows(value, None).shape == (6, 4)


def test_dead_inputs_do_not_break_the_inverse():
    """An input channel that is always zero has no curvature: its weights are dropped, not divided by zero."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 32))
    x[:, 5] = 0
    codes, scales, zeros = gptq.gptq(rng.standard_normal((32, 8)), x.T @ x, bits=4, group_size=16,
                                     symmetric=False)
    assert np.isfinite(scales).all() and codes.shape == (8, 32)
    dequantized = (codes[:, 5].astype(float) - zeros[:, 0]) * scales[:, 0]
    np.testing.assert_allclose(dequantized, 0, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["gptq", "hqq"])
def test_mlp_algorithms_shrink_and_stay_faithful(tmp_path, algorithm):
    source = save_onnx(tmp_path / "m.onnx", 256, 512, 16)
    rng = np.random.default_rng(0)
    calibration = [[rng.standard_normal((4, 256)).astype(np.float32)] for _ in range(16)]
    out = tmp_path / "q.onnx"
    details = quantize_onnx(source, out, method="weight_only", dtype="int4", granularity="group", group_size=32,
                            exclude=["^node_linear_2$"], calibration_method="minmax", calibration=calibration,
                            algorithm=algorithm)
    assert details["algorithm"] == algorithm and details["excluded_nodes"]
    assert out.stat().st_size < 0.3 * source.stat().st_size
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "MatMulNBits" in ops and "MatMul" in ops  # the excluded layer stayed in float
    x = rng.standard_normal((4, 256)).astype(np.float32)
    a, b = run(source, x), run(out, x)
    assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_gptq_without_calibration_is_refused(tmp_path):
    source = save_onnx(tmp_path / "m.onnx", 64, 64, 8)
    with pytest.raises(Exception, match="calibration"):
        quantize_onnx(source, tmp_path / "q.onnx", method="weight_only", dtype="int4", granularity="group",
                      group_size=32, exclude=[], calibration_method="minmax", calibration=None, algorithm="gptq")
