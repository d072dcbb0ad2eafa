"""Encoder-decoder uploads (a tiny random T5): loading, inspection, and the two-graph ONNX form."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import pack, save_tiny_t5
from worker.compression.quantize import quantize_onnx
from worker.formats import onnx_pair
from worker.formats.hf import describe, load_hf
from worker.formats.hf_seq2seq import export_pair


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5") / "tiny-t5"
    model = save_tiny_t5(folder)
    hf = load_hf(pack(folder, folder.parent / "tiny-t5.zip"), folder.parent / "work")
    return model, hf


def test_t5_loads_with_encoder_and_decoder_inputs(t5):
    model, hf = t5
    info = describe(hf)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["inputs"] == [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
                              {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"},
                              {"name": "decoder_input_ids", "shape": ["batch", "decoder_sequence"], "dtype": "int64"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", "decoder_sequence", 100], "dtype": "float32"}]
    assert info["architecture"]["task"] == "seq2seq-lm" and info["architecture"]["class"] == \
        "T5ForConditionalGeneration"
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], dtype=np.int64)
    assert hf.decoder_inputs(ids).tolist() == [[0, 5, 6, 7], [0, 8, 9, 0]]  # start token 0, then the text
    inputs = hf.example_inputs(batch=2, seq=6, decoder_seq=3)
    with torch.inference_mode():
        (logits,) = hf.module(*inputs)
        expected = model(input_ids=inputs[0], attention_mask=inputs[1], decoder_input_ids=inputs[2]).logits
    assert logits.shape == (2, 3, 100) and torch.allclose(logits, expected, atol=1e-6)


def test_export_pair_and_quantize_each_graph(tmp_path: Path, t5):
    model, hf = t5
    pair = export_pair(hf, tmp_path / "pair.zip")  # checked inside on other batch and lengths than exported
    with zipfile.ZipFile(pair) as archive:
        manifest = json.loads(archive.read("model.json"))
    assert manifest["decoder"]["inputs"] == ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    assert manifest["tokens"] == {"decoder_start_token_id": 0, "eos_token_id": 3} and not manifest["kv_cache"]
    params, _ = onnx_pair.count_pair_params(pair)
    assert params >= sum(p.numel() for p in model.parameters())  # the shared embedding is in both graphs

    int4 = tmp_path / "int4.zip"
    details = onnx_pair.map_graphs(pair, int4, lambda graph, new: quantize_onnx(
        graph, new, method="weight_only", dtype="int4", granularity="group", group_size=32, exclude=[],
        calibration_method="minmax", calibration=None))
    assert details["encoder"]["bits"] == details["decoder"]["bits"] == 4
    assert int4.stat().st_size < 0.8 * pair.stat().st_size
    feeds = [np.array([[5, 6, 7, 8]]), np.ones((1, 4), np.int64), np.array([[0, 5]])]
    reference, quantized = (onnx_pair.open_pair(path, "cpu", 1)(feeds)[0] for path in (pair, int4))
    cosine = (reference * quantized).sum() / (np.linalg.norm(reference) * np.linalg.norm(quantized))
    assert reference.shape == (1, 2, 100) and cosine > 0.98


def test_t5_encoder_alone_is_a_plain_text_model(tmp_path: Path, t5):
    import transformers

    folder = tmp_path / "t5-encoder"
    transformers.T5EncoderModel(t5[0].config).save_pretrained(folder)
    hf = load_hf(pack(folder, tmp_path / "t5-encoder.zip"), tmp_path / "work")
    assert hf.task is None and hf.input_names == ["input_ids", "attention_mask"]
    assert hf.output_names == ["last_hidden_state"]
