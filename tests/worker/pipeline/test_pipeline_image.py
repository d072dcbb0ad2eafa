"""Image models (ViT, ConvNeXt) from Hugging Face archives: `pixel_values` in, int8 out, .npz image datasets."""

import numpy as np
import pytest

from tests.helpers import pack, save_tiny_image_model
from tests.worker.pipeline.test_pipeline import finished, run_job


@pytest.fixture(params=["vit", "convnext"])
def image_archive(request, tmp_path):
    folder = tmp_path / request.param
    save_tiny_image_model(folder, request.param)
    return pack(folder, tmp_path / f"{request.param}.zip")


def test_image_model_is_described_and_quantized(tmp_path, worker_env, db, add_model, add_job, add_dataset,
                                                image_archive):
    row = add_model(image_archive, "hf")
    rng = np.random.default_rng(0)
    eval_id = add_dataset(row, tmp_path / "eval.npz", pixel_values=rng.standard_normal((24, 3, 32, 32)).astype(
        np.float32), labels=rng.integers(0, 3, 24))
    job_id = add_job(row, datasets={"eval": eval_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    assert metrics["evaluation"]["inputs"] == "eval dataset" and metrics["evaluation"]["input_shapes"][0][1:] == [
        3, 32, 32]
    assert metrics["baseline"]["accuracy"] is not None and metrics["fidelity"]["cosine_mean"] > 0.99
    assert metrics["compressed"]["size_bytes"] < metrics["baseline"]["size_bytes"]


def test_image_model_inspection_names_its_input(tmp_path, image_archive):
    from worker.formats.hf import load_hf

    loaded = load_hf(image_archive, tmp_path / "x")
    assert loaded.inputs == [{"name": "pixel_values", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    assert loaded.outputs[0]["name"] == "logits" and loaded.outputs[0]["shape"] == ["batch", 3]
