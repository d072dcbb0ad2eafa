"""The job report's notes (found by bench/zoo.py: weight-only int4 on convolutional OCR models delivered a file
larger than the original, and the report said it was "smaller, not faster")."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.core.tables import Job


def conv_only_model(path):
    """Two Convs and no MatMul: nothing for weight-only quantization (MatMul/Gemm weights) to take."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 8, 3, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])], "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 16, 16])], initializer=[w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_result_no_smaller_than_the_original_says_so(tmp_path, worker_env, db, add_model, add_job):
    from worker.tasks import run_job

    model = add_model(conv_only_model(tmp_path / "convs.onnx"), "onnx")
    job_id = add_job(model, steps=[{"op": "quantize", "method": "weight_only", "dtype": "int4",
                                    "granularity": "group", "group_size": 32}])
    run_job(job_id)
    with db() as session:
        job = session.get(Job, job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    metrics = job.metrics
    assert metrics["compression_ratio"] <= 1
    notes = " ".join(metrics["notes"])
    assert "not smaller than the baseline" in notes
    assert "it is smaller, not faster" not in notes
    assert "found no MatMul or Gemm weights" in notes and "embeddings" not in job.metrics["steps"][0]["details"]
    assert "measured on generated inputs" in notes  # no eval dataset: the report says how little it knows
