"""Hugging Face uploads through the worker's task: text datasets, quantization, structured pruning, hf export."""

import json
import zipfile

import numpy as np
import pytest

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.storage import open_storage
from app.core.tables import Dataset
from tests.helpers import VOCAB, pack, save_tiny_bert
from tests.worker.pipeline.test_pipeline import fetch, finished, run_job


@pytest.fixture
def bert_archive(tmp_path):
    folder = tmp_path / "tiny-bert"
    save_tiny_bert(folder, num_labels=3)
    return pack(folder, tmp_path / "tiny-bert.zip")


def test_hf_int8_with_text_eval_dataset(tmp_path, worker_env, db, add_model, add_job, add_text_dataset, bert_archive):
    row = add_model(bert_archive, "hf")
    eval_id = add_text_dataset(row, tmp_path / "eval.jsonl")
    job_id = add_job(row, datasets={"eval": eval_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    assert metrics["evaluation"]["inputs"] == "eval dataset" and metrics["evaluation"]["samples"] == 40
    assert metrics["baseline"]["accuracy"] is not None and metrics["compressed"]["accuracy"] is not None
    assert metrics["evaluation"]["input_shapes"][0] == [16, 10]  # padded to the longest text
    assert metrics["fidelity"]["cosine_mean"] > 0.99
    assert metrics["source"]["baseline_fidelity_to_original"]["cosine_min"] > 0.9999


def test_hf_int8_faithful_smooths_on_the_calibration_texts(tmp_path, worker_env, db, add_model, add_job,
                                                           add_text_dataset, bert_archive):
    from app.core.presets import preset_recipe

    row = add_model(bert_archive, "hf")
    calibration_id = add_text_dataset(row, tmp_path / "calibration.jsonl", count=48)
    eval_id = add_text_dataset(row, tmp_path / "eval.jsonl")
    steps = preset_recipe("int8-faithful").model_dump(mode="json")["steps"]
    job_id = add_job(row, steps=steps, datasets={"calibration": calibration_id, "eval": eval_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    [step] = metrics["steps"]
    smoothing = step["details"]["smoothing"]
    assert smoothing["alpha"] in (0.6, 0.7, 0.8, 0.9, 1.0) and smoothing["smoothed_inputs"] >= 4  # per layer: QKV, out, FFN x2
    assert smoothing["calibration_samples"] == 48
    assert metrics["compression_ratio"] > 1.5 and metrics["fidelity"]["cosine_mean"] > 0.99


def test_hf_int4_gptq_rounds_on_the_calibration_texts(tmp_path, worker_env, db, add_model, add_job,
                                                      add_text_dataset, bert_archive):
    from app.core.presets import preset_recipe

    row = add_model(bert_archive, "hf")
    calibration_id = add_text_dataset(row, tmp_path / "calibration.jsonl", count=32)
    steps = preset_recipe("int4-gptq").model_dump(mode="json")["steps"]
    job_id = add_job(row, steps=steps, datasets={"calibration": calibration_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    [step] = metrics["steps"]
    details = step["details"]
    assert (details["algorithm"], details["group_size"]) == ("gptq", 32)
    assert details["gptq"]["calibration_samples"] == 32 and details["gptq"]["quantized_matmuls"] >= 12  # 6 a layer
    assert 0 < details["gptq"]["calibration_tokens"] < 32 * 128  # real tokens only
    assert metrics["compression_ratio"] > 1.5 and metrics["fidelity"]["cosine_mean"] > 0.98


def test_hf_structured_pruning_exports_a_loadable_hf_model(tmp_path, worker_env, db, add_model, add_job,
                                                           bert_archive):
    from worker.formats.hf import load_hf

    job_id = add_job(add_model(bert_archive, "hf"), steps=[
        {"op": "prune", "method": "structured", "sparsity": 0.5}, {"op": "export", "formats": ["hf"]}])
    run_job(job_id)
    job = finished(db, job_id)
    assert job.metrics["compressed"]["params"] < job.metrics["baseline"]["params"]
    _, archive = fetch(worker_env, job, tmp_path, fmt="hf")
    assert any(name.endswith("config.json") for name in zipfile.ZipFile(archive).namelist())
    reloaded = load_hf(archive, tmp_path / "reload")
    assert reloaded.model.config.intermediate_size == 32
    assert reloaded.tokenizer is not None


def test_generated_inputs_are_valid_for_text_models(tmp_path, worker_env, db, add_model, add_job, bert_archive):
    job_id = add_job(add_model(bert_archive, "hf"), runtime="pytorch",
                     steps=[{"op": "quantize", "method": "dynamic"}])
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    assert metrics["evaluation"]["inputs"] == "generated"
    assert metrics["fidelity"]["cosine_mean"] > 0.98
