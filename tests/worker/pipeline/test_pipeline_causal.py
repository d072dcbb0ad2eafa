"""Causal language models (GPT-2, LLaMA) from Hugging Face archives: int8, int4 weight-only in groups, and
perplexity on eval texts (reported, and as a tune metric)."""

import json
import math

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


@pytest.fixture
def gpt2(tmp_path):
    folder = tmp_path / "gpt2"
    model = save_tiny_causal_lm(folder, "gpt2")
    return model, folder, pack(folder, tmp_path / "gpt2.zip")


def torch_perplexity(model, folder, texts):
    """exp of the mean next-token cross-entropy, each text run alone (no padding)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(total / count)


def test_causal_lm_perplexity_on_eval_texts(tmp_path, worker_env, db, add_model, add_job, add_text_dataset, gpt2):
    model, folder, archive = gpt2
    row = add_model(archive, "hf")
    eval_path = tmp_path / "eval.jsonl"
    eval_id = add_text_dataset(row, eval_path, count=24)
    job_id = add_job(row, datasets={"eval": eval_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    texts = [json.loads(line)["text"] for line in eval_path.read_text().splitlines()]
    expected = torch_perplexity(model, folder, texts)
    assert 50 < expected < 200  # random weights over a 100-word vocabulary: near uniform
    assert metrics["baseline"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert metrics["compressed"]["perplexity"] == pytest.approx(expected, rel=0.02)
    assert metrics["baseline"]["accuracy"] is None


def test_tune_on_perplexity(tmp_path, worker_env, db, add_model, add_job, add_text_dataset, db_job_tune, gpt2):
    row = add_model(gpt2[2], "hf")
    eval_id = add_text_dataset(row, tmp_path / "eval.jsonl", count=16)
    search = [{"steps": [{"op": "quantize"}]},
              {"steps": [{"op": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 32}]}]
    job_id = add_job(row, datasets={"eval": eval_id})
    db_job_tune(job_id, {"metric": "perplexity", "max_loss": 0.05, "objective": "size", "max_trials": 8,
                         "time_budget_s": None, "search": search})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    tuning = metrics["tuning"]
    baseline = metrics["baseline"]["perplexity"]
    assert tuning["baseline_metric"] == baseline
    for trial in tuning["trials"]:
        assert trial["meets_tolerance"] == (trial["metric"] <= baseline * 1.05)
    best = tuning["trials"][tuning["best"]]
    assert metrics["compressed"]["perplexity"] == pytest.approx(best["metric"])
