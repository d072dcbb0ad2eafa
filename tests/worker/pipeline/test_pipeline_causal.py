"""Causal language models (GPT-2, LLaMA) from Hugging Face archives: int8, and int4 weight-only in groups."""

import pytest

from tests.helpers import pack, save_tiny_causal_lm
from tests.worker.pipeline.test_pipeline import finished, run_job


@pytest.fixture(params=["gpt2", "llama"])
def causal_archive(request, tmp_path):
    folder = tmp_path / request.param
    save_tiny_causal_lm(folder, request.param)
    return pack(folder, tmp_path / f"{request.param}.zip")


@pytest.mark.parametrize("step, min_ratio, min_cosine", [
    ({"op": "quantize"}, 1.4, 0.999),
    ({"op": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 32}, 4.0, 0.99),
])
def test_causal_lm_quantizes(tmp_path, worker_env, db, add_model, add_job, causal_archive, step, min_ratio,
                             min_cosine):
    job_id = add_job(add_model(causal_archive, "hf"), steps=[step])
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    assert metrics["compression_ratio"] > min_ratio  # tiny models: the embeddings and norms weigh a lot
    assert metrics["fidelity"]["cosine_mean"] > min_cosine


def test_causal_lm_int4_gptq_on_texts(tmp_path, worker_env, db, add_model, add_job, add_text_dataset,
                                      causal_archive):
    row = add_model(causal_archive, "hf")
    calibration_id = add_text_dataset(row, tmp_path / "calibration.jsonl", count=32)
    job_id = add_job(row, steps=[{"op": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 32,
                                  "algorithm": "gptq"}], datasets={"calibration": calibration_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    details = metrics["steps"][0]["details"]
    assert details["algorithm"] == "gptq" and details["gptq"]["quantized_matmuls"] >= 8  # 2 layers x >= 4 MatMuls
    assert metrics["fidelity"]["cosine_mean"] > 0.99
