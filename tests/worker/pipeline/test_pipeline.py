"""Recipes end to end through the worker's task: datasets, both targets, pruning, exports."""

import gzip

import numpy as np
import onnxruntime as ort
import torch

from app.core.storage import open_storage
from app.core.tables import Job
from tests.helpers import make_mlp, save_onnx, save_pt2


def run_job(job_id):
    from worker.tasks import run_job as task

    task(job_id)


def finished(db, job_id) -> Job:
    with db() as session:
        job = session.get(Job, job_id)
        job.artifacts  # load while the session is open
    assert job.status == "succeeded", (job.error_code, job.error_message)
    return job


def fetch(settings, job, tmp_path, kind="model", fmt=None):
    artifact = next(a for a in job.artifacts if a.kind == kind and (fmt is None or a.format == fmt))
    path = tmp_path / artifact.filename
    open_storage(settings.resolved_storage_url()).get_file(artifact.storage_key, path)
    return artifact, path


def separable_data(rng, samples=256, features=16, classes=4):
    """A task a small MLP can learn: the label is the argmax of a fixed projection."""
    projection = rng.standard_normal((features, classes))
    x = rng.standard_normal((samples, features)).astype(np.float32)
    return x, np.argmax(x @ projection, axis=1).astype(np.int64), projection


def trained_mlp(x, labels, hidden=32, classes=4, batch=8):
    torch.manual_seed(0)
    model = make_mlp(x.shape[1], hidden, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        optimizer.step()
    return model.eval()


def test_eval_dataset_gives_accuracy_and_static_int8_uses_calibration(tmp_path, worker_env, db, add_model, add_job,
                                                                      add_dataset):
    rng = np.random.default_rng(0)
    x, labels, _ = separable_data(rng)
    model = trained_mlp(x, labels)
    path = tmp_path / "clf.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:8]),)), str(path))
    row = add_model(path, "pt2")
    eval_id = add_dataset(row, tmp_path / "eval.npz", x=x, labels=labels)
    calibration_id = add_dataset(row, tmp_path / "calib.npz", x=x[:64])
    job_id = add_job(row, steps=[{"op": "quantize", "method": "static", "dtype": "int8"}],
                     datasets={"eval": eval_id, "calibration": calibration_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    assert metrics["baseline"]["accuracy"] > 0.9
    assert metrics["compressed"]["accuracy"] >= metrics["baseline"]["accuracy"] - 0.05
    assert metrics["evaluation"]["inputs"] == "eval dataset" and metrics["evaluation"]["samples"] == 256
    assert metrics["steps"][0]["details"]["calibration_samples"] == 64


def test_pytorch_target_weight_only_int4_delivers_a_small_pt2(tmp_path, worker_env, db, add_model, add_job):
    path = save_pt2(tmp_path / "m.pt2", 256, 512, 8, batch=4)
    job_id = add_job(add_model(path, "pt2"), runtime="pytorch", steps=[
        {"op": "quantize", "method": "weight_only", "dtype": "int4", "granularity": "group", "group_size": 32}])
    run_job(job_id)
    job = finished(db, job_id)
    metrics = job.metrics
    assert metrics["environment"]["runtime"] == "pytorch"
    assert metrics["compression_ratio"] > 4
    assert metrics["fidelity"]["cosine_mean"] > 0.98
    assert metrics["baseline"]["params"] == metrics["compressed"]["params"]
    artifact, model_file = fetch(worker_env, job, tmp_path)
    assert artifact.format == "pt2"
    x = torch.randn(4, 256)
    reloaded = torch.export.load(str(model_file)).module()
    cos = torch.nn.functional.cosine_similarity(reloaded(x).flatten(), make_mlp(256, 512, 8)(x).flatten(), dim=0)
    assert cos > 0.98


def test_pytorch_target_default_int8_is_dynamic(tmp_path, worker_env, db, add_model, add_job):
    job_id = add_job(add_model(save_pt2(tmp_path / "m.pt2", 64, 128, 8), "pt2"), runtime="pytorch",
                     steps=[{"op": "quantize"}])
    run_job(job_id)
    details = finished(db, job_id).metrics["steps"][0]["details"]
    assert (details["method"], details["chosen_method"], details["quantized_layers"]) == ("auto", "dynamic", 3)


def test_pruned_model_is_delivered_compressed_and_loads_back_exactly(tmp_path, worker_env, db, add_model, add_job):
    path = save_onnx(tmp_path / "m.onnx", 128, 256, 8)
    # 70% of an untrained MLP's weights gone: far below the fidelity floor, delivered because the job says so
    job_id = add_job(add_model(path, "onnx"), steps=[{"op": "prune", "method": "magnitude", "sparsity": 0.7}],
                     accept_degraded=True)
    run_job(job_id)
    job = finished(db, job_id)
    metrics = job.metrics
    assert metrics["degraded"] is True
    compressed = metrics["compressed"]
    assert compressed["encoding"] == "gzip"
    assert abs(compressed["nonzero_params"] / compressed["params"] - 0.3) < 0.05
    assert compressed["size_bytes"] < 0.6 * metrics["baseline"]["size_bytes"]
    per_layer = metrics["steps"][0]["details"]["per_layer"]
    assert all(abs(info["sparsity"] - 0.7) < 0.02 for info in per_layer.values())
    artifact, packed = fetch(worker_env, job, tmp_path)
    assert artifact.filename.endswith(".onnx.gz")
    unpacked = tmp_path / "model.onnx"
    unpacked.write_bytes(gzip.decompress(packed.read_bytes()))
    assert unpacked.stat().st_size == compressed["uncompressed_size_bytes"]
    session = ort.InferenceSession(str(unpacked), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: np.ones((4, 128), np.float32)})[0].shape == (4, 8)


def test_prune_then_quantize_with_exports(tmp_path, worker_env, db, add_model, add_job):
    path = save_pt2(tmp_path / "m.pt2", 64, 128, 8, batch=4)
    job_id = add_job(add_model(path, "pt2"), steps=[
        {"op": "prune", "method": "structured", "sparsity": 0.5},
        {"op": "export", "formats": ["onnx", "pt2", "safetensors"]}], min_fidelity=0.5)
    run_job(job_id)
    job = finished(db, job_id)
    metrics = job.metrics
    assert metrics["compressed"]["params"] < 0.6 * metrics["baseline"]["params"]
    assert metrics["compressed"]["size_bytes"] < 0.6 * metrics["baseline"]["size_bytes"]
    assert sorted(a.format for a in job.artifacts if a.kind == "model") == ["onnx", "pt2", "safetensors"]
    _, weights = fetch(worker_env, job, tmp_path, fmt="safetensors")
    from safetensors.torch import load_file

    assert any(t.shape[0] == 64 for t in load_file(str(weights)).values())


def test_export_before_quantize_delivers_the_sparse_weights_and_the_int8_file(tmp_path, worker_env, db, add_model,
                                                                              add_job):
    """One job: the pruned fp32 weights in the sparse layout (written where the export step stands) and the int8
    ONNX model (the final one)."""
    path = save_pt2(tmp_path / "m.pt2", 64, 128, 8, batch=4)
    job_id = add_job(add_model(path, "pt2"), steps=[
        {"op": "prune", "method": "magnitude", "sparsity": 0.5},
        {"op": "export", "formats": ["safetensors", "safetensors-dense"]},
        {"op": "quantize", "method": "dynamic", "dtype": "int8"}], min_fidelity=0.5)
    run_job(job_id)
    job = finished(db, job_id)
    assert sorted(a.format for a in job.artifacts if a.kind == "model") == ["onnx", "safetensors", "safetensors-dense"]
    assert job.metrics["exports"]["safetensors"]["layout"] == "sparse-bitmask"
    assert "before quantization" in job.metrics["exports"]["safetensors"]["model"]
    assert job.metrics["steps"][1]["details"]["written_before_quantize"] == ["safetensors", "safetensors-dense"]
    from safetensors.torch import load_file

    _, dense = fetch(worker_env, job, tmp_path, fmt="safetensors-dense")
    weights = [t for name, t in load_file(str(dense)).items() if name.endswith("weight") and t.dim() == 2]
    assert weights and all(t.dtype == torch.float32 and (t == 0).float().mean() >= 0.45 for t in weights)
    _, onnx_file = fetch(worker_env, job, tmp_path, fmt="onnx")
    import onnx

    data = onnx_file.read_bytes()
    graph = onnx.load_from_string(gzip.decompress(data) if onnx_file.name.endswith(".gz") else data).graph
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)


def test_onnx_upload_cannot_target_pytorch(tmp_path, worker_env, db, add_model, add_job):
    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"), runtime="pytorch")
    run_job(job_id)
    with db() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed" and job.error_code == "unsupported_for_format"
    assert "pytorch" in job.error_message


def test_dataset_that_does_not_fit_the_model_fails_clearly(tmp_path, worker_env, db, add_model, add_job, add_dataset):
    row = add_model(save_onnx(tmp_path / "m.onnx", 16, 32, 4), "onnx")
    eval_id = add_dataset(row, tmp_path / "bad.npz", x=np.zeros((8, 12), np.float32))
    job_id = add_job(row, datasets={"eval": eval_id})
    run_job(job_id)
    with db() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed" and job.error_code == "invalid_dataset"
    assert "eval dataset" in job.error_message and "(16,)" in job.error_message


def test_weight_only_int4_with_only_a_group_size_runs_in_groups(tmp_path, worker_env, db, add_model, add_job):
    """`group_size` alone used to keep the per-channel default and fail inside ONNX Runtime."""
    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx", 256, 512, 8), "onnx"), steps=[
        {"op": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 32}])
    run_job(job_id)
    details = finished(db, job_id).metrics["steps"][0]["details"]
    assert (details["granularity"], details["group_size"], details["bits"]) == ("group", 32, 4)


def test_foreign_cnn_gets_normalized_and_static_int8_by_default(tmp_path, worker_env, db, add_model, add_job):
    """An opset-11 conv net with Constant weights (as Paddle and older exporters write them): the default quantize
    step normalizes it and tries static int8 first, which now gives valid graphs; the report says what was
    normalized, what was tried and measured, and what stayed in float."""
    from tests.helpers import save_foreign_cnn

    row = add_model(save_foreign_cnn(tmp_path / "cnn.onnx", opset=11), "onnx")
    job_id = add_job(row, steps=[{"op": "quantize"}])
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    details = metrics["steps"][0]["details"]
    assert details["method"] == "auto" and details["family"] == "convolutional"
    normalization = details["normalization"]
    assert normalization["constants_to_initializers"] == 11 and normalization["opset"] == {"from": 11, "to": 13}
    assert normalization["duplicate_initializers_merged"] == 1 and normalization["output_change"] <= 1e-6
    static = [c for c in details["candidates"] if c["name"].startswith("static")]
    assert static and all("error" not in c and c["cosine"] >= 0.99 for c in static)
    if details["chosen_method"] == "weights_int8":  # kept only when no int8 computation measured faster
        assert all(c["speedup"] <= 1.0 for c in details["candidates"] if c["name"] != "weights_int8")
    else:
        assert details["chosen_method"] == "static", details["candidates"]
        assert details["calibrated_on"]["data"] == "the job's evaluation inputs (generated)"
        assert details["chosen"]["kept_in_float"]["tiny_layers"] == ["stem", "fc"]
    assert metrics["fidelity"]["cosine_mean"] >= 0.99
    assert "warning" not in details or details["warning"] in metrics["notes"]
    if details["chosen_method"] == "static":  # calibrated on generated inputs: said loudly
        assert "calibrated on generated inputs" in details["warning"]


def cancelling_cnn(path):
    """y = conv_a(x) + conv_b(x) with W_b = -W_a + tiny noise: the fp32 output is the small difference, which any
    int8 rounding of the two convolutions drowns, so no int8 candidate can be faithful."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    near = (-w + 1e-3 * rng.standard_normal(w.shape)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "a"], ["ya"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "b"], ["yb"], name="b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="difference")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 16, 16])],
                              [numpy_helper.from_array(w, "a"), numpy_helper.from_array(near, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_auto_int8_that_cannot_stay_faithful_says_so_in_the_notes(tmp_path, worker_env, db, add_model, add_job):
    job_id = add_job(add_model(cancelling_cnn(tmp_path / "c.onnx"), "onnx"), steps=[{"op": "quantize"}],
                     accept_degraded=True)
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    details = metrics["steps"][0]["details"]
    assert [c["name"] for c in details["candidates"]] == ["static_conv", "static", "dynamic", "weights_int8"]
    assert all(c["cosine"] < 0.95 for c in details["candidates"])  # the line on generated inputs
    assert details["warning"].startswith("no int8 candidate keeps output cosine >= 0.95")
    assert details["warning"] in metrics["notes"] and metrics["degraded"] is True
