"""Multi-step recipes, training steps, analysis and accuracy-aware tuning through the worker's task."""

import numpy as np
import torch

from tests.helpers import save_onnx
from tests.worker.pipeline.test_pipeline import finished, run_job, separable_data, trained_mlp


def upload_classifier(tmp_path, add_model, add_dataset, hidden=64, train_samples=512):
    rng = np.random.default_rng(0)
    x, labels, projection = separable_data(rng, samples=train_samples + 256)
    model = trained_mlp(x[:train_samples], labels[:train_samples], hidden=hidden)
    path = tmp_path / "clf.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:8]),)), str(path))
    row = add_model(path, "pt2")
    train_id = add_dataset(row, tmp_path / "train.npz", x=x[:train_samples], labels=labels[:train_samples])
    eval_id = add_dataset(row, tmp_path / "eval.npz", x=x[train_samples:], labels=labels[train_samples:])
    return row, {"train": train_id, "eval": eval_id}


def test_prune_finetune_quantize_records_every_step_and_keeps_masks(tmp_path, worker_env, db, add_model, add_job,
                                                                    add_dataset):
    row, datasets = upload_classifier(tmp_path, add_model, add_dataset)
    job_id = add_job(row, datasets=datasets, steps=[
        {"op": "prune", "method": "magnitude", "sparsity": 0.6},
        {"op": "finetune", "epochs": 3, "lr": 0.003, "batch_size": 32, "quantization_aware": True},
        {"op": "quantize", "method": "dynamic", "dtype": "int8"}])
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    prune_step, finetune_step, quantize_step = metrics["steps"]
    for step in metrics["steps"]:
        assert {"size_bytes", "params", "latency_ms", "fidelity", "accuracy"} <= set(step), step["op"]
    assert finetune_step["nonzero_params"] == prune_step["nonzero_params"]  # masks kept: no regrowth
    assert finetune_step["accuracy"] >= prune_step["accuracy"]
    assert len(finetune_step["details"]["epochs"]) == 3 and finetune_step["details"]["quantization_aware_bits"] == 8
    assert quantize_step["size_bytes"] < prune_step["size_bytes"]
    assert metrics["compressed"]["accuracy"] == quantize_step["accuracy"]


def test_distill_into_a_narrower_student(tmp_path, worker_env, db, add_model, add_job, add_dataset):
    row, datasets = upload_classifier(tmp_path, add_model, add_dataset, hidden=128)
    job_id = add_job(row, datasets=datasets, steps=[
        {"op": "distill", "student": {"shrink": {"width": 0.25}}, "epochs": 4, "lr": 0.005, "alpha": 0.7,
         "temperature": 2.0}])
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    details = metrics["steps"][0]["details"]
    assert details["student_params"] < 0.3 * details["teacher_params"]
    assert metrics["compressed"]["params"] == details["student_params"]
    assert 1 <= details["best_epoch"] <= 4
    assert metrics["compressed"]["accuracy"] > 0.7


def test_analyze_reports_layers_and_a_valid_suggestion(tmp_path, worker_env, db, add_model, add_job):
    from app.core.recipe import Recipe

    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx", 32, 64, 8), "onnx"), steps=[{"op": "analyze"}])
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    layers = metrics["analysis"]["layers"]
    assert len(layers) == 3 and abs(sum(layer["param_share"] for layer in layers) - 1) < 1e-6
    assert all({"min", "max", "mean", "std", "histogram", "sensitivity"} <= set(layer) for layer in layers)
    Recipe.model_validate(metrics["analysis"]["suggested_recipe"])
    assert metrics["compression_ratio"] == 1.0  # analysis alone changes nothing


def test_tuning_returns_the_smallest_model_within_tolerance(tmp_path, worker_env, db, add_model, add_job, db_job_tune):
    row = add_model(save_onnx(tmp_path / "m.onnx", 64, 128, 8), "onnx")
    job_id = add_job(row)
    search = [{"steps": [{"op": "quantize", "method": "dynamic", "dtype": "fp16"}]},
              {"steps": [{"op": "quantize", "method": "dynamic"}]},
              {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.9}]}]
    db_job_tune(job_id, {"metric": "fidelity", "max_loss": 0.02, "objective": "size", "max_trials": 3,
                         "search": search})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    tuning = metrics["tuning"]
    assert [t["meets_tolerance"] for t in tuning["trials"]] == [True, True, False]
    assert tuning["best"] == 1 and tuning["met_tolerance"] is True
    assert metrics["recipe"]["steps"][0]["dtype"] == "int8"
    assert metrics["compressed"]["size_bytes"] == tuning["trials"][1]["size_bytes"]
    assert tuning["pareto_front"]


def test_tuning_says_plainly_when_nothing_meets_the_tolerance(tmp_path, worker_env, db, add_model, add_job,
                                                              db_job_tune):
    row = add_model(save_onnx(tmp_path / "m.onnx", 64, 128, 8), "onnx")
    job_id = add_job(row, min_fidelity=0.5)  # the most faithful trial is still a heavily pruned untrained MLP
    db_job_tune(job_id, {"metric": "fidelity", "max_loss": 0.0, "objective": "size", "max_trials": 2,
                         "search": [{"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.8}]},
                                    {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]}]})
    run_job(job_id)
    job = finished(db, job_id)
    tuning = job.metrics["tuning"]
    assert tuning["met_tolerance"] is False and tuning["best"] == 1
    assert "no candidate met" in tuning["message"]
    assert any(a.kind == "model" for a in job.artifacts)
