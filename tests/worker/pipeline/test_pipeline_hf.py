"""Hugging Face uploads through the worker's task: text datasets, quantization, structured pruning, hf export."""

import zipfile

import pytest

from tests.helpers import pack, save_tiny_bert
from tests.worker.pipeline.test_pipeline import fetch, finished, run_job


@pytest.fixture
def encoder_archive(tmp_path):
    folder = tmp_path / "tiny-encoder"
    save_tiny_bert(folder, num_labels=None)
    return pack(folder, tmp_path / "tiny-encoder.zip")


@pytest.fixture
def sentence_archive(tmp_path):
    """The tiny encoder as a sentence-transformers model: mean pooling over real tokens."""
    import json

    folder = tmp_path / "tiny-sentence-encoder"
    save_tiny_bert(folder, num_labels=None)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return pack(folder, tmp_path / "tiny-sentence-encoder.zip")


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
    # per layer: QKV, attention output, FFN x2
    assert smoothing["alpha"] in (0.6, 0.7, 0.8, 0.9, 1.0) and smoothing["smoothed_inputs"] >= 4
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


def test_sparsegpt_keeps_more_of_an_encoder_than_wanda_at_the_same_sparsity(tmp_path, worker_env, db, add_model,
                                                                             add_job, add_text_dataset):
    folder = tmp_path / "encoder"
    save_tiny_bert(folder, num_labels=None, initializer_range=0.3)  # trained-size weights: pruning them shows
    row = add_model(pack(folder, tmp_path / "encoder.zip"), "hf")
    texts = {role: add_text_dataset(row, tmp_path / f"{role}.jsonl", count=32, labelled=False)
             for role in ("calibration", "eval")}
    steps = {}
    for method in ("activation_aware", "sparsegpt"):
        job_id = add_job(row, datasets=texts, accept_degraded=True,
                         steps=[{"op": "prune", "method": method, "pattern": "2:4"}])
        run_job(job_id)
        steps[method] = finished(db, job_id).metrics["steps"][0]
    wanda, sparsegpt = steps["activation_aware"], steps["sparsegpt"]
    assert sparsegpt["details"]["method"] == "sparsegpt"
    assert sparsegpt["details"]["layers"] == wanda["details"]["layers"]
    assert all(abs(layer["sparsity"] - 0.5) < 0.01 for layer in sparsegpt["details"]["per_layer"].values())
    assert sparsegpt["fidelity"]["cosine_mean"] > wanda["fidelity"]["cosine_mean"], (sparsegpt, wanda)


def test_generated_inputs_are_valid_for_text_models(tmp_path, worker_env, db, add_model, add_job, bert_archive):
    job_id = add_job(add_model(bert_archive, "hf"), runtime="pytorch",
                     steps=[{"op": "quantize", "method": "dynamic"}])
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    assert metrics["evaluation"]["inputs"] == "generated"
    assert metrics["fidelity"]["cosine_mean"] > 0.98


def test_pruning_recovered_by_distillation_into_the_current_model(tmp_path, worker_env, db, add_model, add_job,
                                                                   add_text_dataset):
    """Activation-aware 50% pruning of a sentence encoder, then recovery on unlabelled text with the pruned model as
    the student and the upload as the teacher: fidelity rises, the zeros stay (the word embeddings' too), and the
    sparse weights are exported in the bitmask layout."""
    import torch
    from safetensors import safe_open

    from worker.formats import sparse_safetensors

    folder = tmp_path / "encoder"
    # weights as large as a trained model's, so that pruning them costs fidelity (at BERT's initial 0.02 the
    # residual stream hides them); no dropout, so that a few epochs win it back
    save_tiny_bert(folder, num_labels=None, initializer_range=0.3, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    row = add_model(pack(folder, tmp_path / "encoder.zip"), "hf")
    texts = {role: add_text_dataset(row, tmp_path / f"{role}.jsonl", count=count, labelled=False)
             for role, count in (("calibration", 32), ("train", 96), ("eval", 32))}
    job_id = add_job(row, datasets=texts, steps=[
        {"op": "prune", "method": "activation_aware", "sparsity": 0.5, "embeddings": True},
        {"op": "distill", "student": {"current": True}, "alpha": 1.0, "epochs": 4, "lr": 0.003, "batch_size": 16},
        {"op": "export", "formats": ["safetensors", "safetensors-dense", "hf"]}])
    run_job(job_id)
    job = finished(db, job_id)
    pruned, recovered = job.metrics["steps"][:2]
    assert recovered["details"]["student"] == "current" and recovered["details"]["masks_kept"] > 0
    assert recovered["details"]["layer_transfer"] == {"weight": 1.0, "layers": 2}  # the encoder default
    assert recovered["fidelity_before"] == pruned["fidelity"]
    assert recovered["fidelity"]["cosine_mean"] > pruned["fidelity"]["cosine_mean"]
    assert pruned["details"]["embedding_tables"] == ["model.embeddings.position_embeddings",
                                                     "model.embeddings.token_type_embeddings",
                                                     "model.embeddings.word_embeddings"]
    for name, layer in pruned["details"]["per_layer"].items():  # the masks held through training
        assert recovered["details"]["per_layer"][name]["zeros"] >= layer["zeros"]
    assert abs(pruned["details"]["per_layer"]["model.embeddings.word_embeddings"]["sparsity"] - 0.5) < 0.01
    layouts = job.metrics["exports"]
    assert layouts["safetensors"]["layout"] == "sparse-bitmask" and layouts["safetensors-dense"]["layout"] == "dense"
    assert layouts["safetensors"]["size_bytes"] < 0.7 * layouts["safetensors-dense"]["size_bytes"]
    assert layouts["hf"]["layout"] == "dense"  # transformers 5 cannot read the bitmask layout back
    _, sparse_path = fetch(worker_env, job, tmp_path, fmt="safetensors")
    _, dense_path = fetch(worker_env, job, tmp_path, fmt="safetensors-dense")
    sparsity = sparse_safetensors.config_of(sparse_path)["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask" and "model.embeddings.word_embeddings" in sparsity["targets"]
    with safe_open(str(dense_path), framework="pt") as dense:
        plain = {key: dense.get_tensor(key) for key in dense.keys()}
    with safe_open(str(sparse_path), framework="pt") as sparse:
        back = sparse_safetensors.decompress({key: sparse.get_tensor(key) for key in sparse.keys()})
    assert set(back) == set(plain) and all(torch.equal(back[key], plain[key]) for key in plain)


def test_fast_encoder_preset_distills_a_shallower_student_judged_on_its_sentence_embedding(
        tmp_path, worker_env, db, add_model, add_job, add_text_dataset, sentence_archive):
    from app.core.presets import preset_recipe

    row = add_model(sentence_archive, "hf")
    train_id = add_text_dataset(row, tmp_path / "train.jsonl", count=60, labelled=False)
    steps = preset_recipe("fast-encoder").model_dump(mode="json")["steps"]
    job_id = add_job(row, steps=steps, datasets={"train": train_id}, accept_degraded=True)
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    distill_step, quantize_step = metrics["steps"]
    details = distill_step["details"]
    layers = details["layers"]
    assert (layers["teacher"], layers["student"], layers["by"]) == (2, 1, "removal measured on the train samples")
    assert [r["removed"] for r in layers["removals"]] == [i for i in (0, 1) if i not in layers["chosen"]]
    assert "feed_forward" not in details  # full width
    assert details["layer_transfer"] == {"weight": 1.0, "layers": 1}  # the student's layer stands in for both
    assert details["student_params"] < details["teacher_params"]
    stopping = details["early_stopping"]
    assert (stopping["train_samples"], stopping["held_out_samples"], stopping["patience"]) == (54, 6, 2)
    assert stopping["stopped_epoch"] == len(details["epochs"]) <= 8
    assert details["stopped"] in (None, "early_stopping") and details["best_epoch"] >= 1
    assert all(epoch["val_loss"] is not None for epoch in details["epochs"])  # the held-out texts
    assert quantize_step["op"] == "quantize" and metrics["compression_ratio"] > 1
    for fidelity in (metrics["fidelity"], distill_step["fidelity"], quantize_step["fidelity"]):
        assert fidelity["on"].startswith("sentence embedding (mean pooling")
        assert -1 <= fidelity["token_cosine_mean"] <= 1 and fidelity["top1_agreement"] is None
    assert metrics["fidelity_floor"]["cosine_mean"] == metrics["fidelity"]["cosine_mean"]


def test_tune_for_latency_with_train_texts_lists_a_student_it_has_no_time_for(tmp_path, worker_env, db, add_model,
                                                                             add_job, add_text_dataset,
                                                                             db_job_tune, encoder_archive):
    row = add_model(encoder_archive, "hf")
    train_id = add_text_dataset(row, tmp_path / "train.jsonl", count=400, labelled=False)
    job_id = add_job(row, datasets={"train": train_id})
    db_job_tune(job_id, {"metric": "fidelity", "max_loss": 0.01, "objective": "latency", "max_trials": 8,
                         "time_budget_s": 0.5, "search": None})
    run_job(job_id)
    tuning = finished(db, job_id).metrics["tuning"]
    assert [step["op"] for step in tuning["trials"][0]["recipe"]["steps"]] == ["quantize"]
    skipped_ops = [[step["op"] for step in entry["recipe"]["steps"]] for entry in tuning["skipped"]]
    assert ["distill", "quantize"] in skipped_ops
    assert "skipped for the time budget" in tuning["message"]
