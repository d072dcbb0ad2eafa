"""Encoder-decoder models (a tiny random T5) through the worker's task: two ONNX graphs, int8, one zip artifact."""

import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.core.tables import Job
from tests.helpers import pack, save_tiny_t5
from tests.worker.pipeline.test_pipeline import fetch, finished, run_job


@pytest.fixture
def t5(tmp_path):
    folder = tmp_path / "tiny-t5"
    model = save_tiny_t5(folder)
    return model, pack(folder, tmp_path / "tiny-t5.zip")


def test_t5_int8_delivers_both_graphs(tmp_path, worker_env, db, add_model, add_job, add_text_dataset, t5):
    model, archive = t5
    row = add_model(archive, "hf")
    eval_id = add_text_dataset(row, tmp_path / "eval.jsonl", count=24)
    job_id = add_job(row, datasets={"eval": eval_id})
    run_job(job_id)
    job = finished(db, job_id)
    metrics = job.metrics
    assert metrics["evaluation"]["inputs"] == "eval dataset" and metrics["evaluation"]["samples"] == 24
    assert metrics["evaluation"]["decoder_inputs"].startswith("the input text shifted right")
    assert metrics["fidelity"]["cosine_mean"] > 0.99
    assert metrics["compression_ratio"] > 1.3  # tiny: the embeddings (not quantized) weigh a lot
    assert set(metrics["steps"][0]["details"]) == {"encoder", "decoder"}

    _, path = fetch(worker_env, job, tmp_path, fmt="onnx-seq2seq")
    with zipfile.ZipFile(path) as archive:
        assert {"encoder.onnx", "decoder.onnx", "model.json", "README.md"} <= set(archive.namelist())
        manifest = json.loads(archive.read("model.json"))
        encoder = ort.InferenceSession(archive.read("encoder.onnx"), providers=["CPUExecutionProvider"])
        decoder = ort.InferenceSession(archive.read("decoder.onnx"), providers=["CPUExecutionProvider"])
    assert manifest["kv_cache"] is False and manifest["tokens"]["decoder_start_token_id"] == 0
    ids = np.array([[7, 9, 11, 13, 3], [8, 10, 3, 0, 0]], dtype=np.int64)
    mask = (np.arange(5) < np.array([[5], [3]])).astype(np.int64)
    decoder_ids = np.array([[0, 7, 9], [0, 8, 10]], dtype=np.int64)
    hidden = encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    logits = decoder.run(None, {"decoder_input_ids": decoder_ids, "encoder_hidden_states": hidden,
                                "encoder_attention_mask": mask})[0]
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         decoder_input_ids=torch.from_numpy(decoder_ids), use_cache=False).logits.numpy()
    assert logits.shape == expected.shape == (2, 3, 100)
    cosine = (logits * expected).sum() / (np.linalg.norm(logits) * np.linalg.norm(expected))
    assert cosine > 0.99


def test_t5_pytorch_target_is_a_clear_job_error(worker_env, db, add_model, add_job, t5):
    job_id = add_job(add_model(t5[1], "hf"), steps=[{"op": "quantize", "dtype": "int8"}], runtime="pytorch")
    run_job(job_id)
    with db() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed" and job.error_code == "invalid_recipe"
    assert "target.runtime" in job.error_message and "encoder-decoder" in job.error_message
