"""Tests for worker.formats.hf: tiny Hugging Face models made here, packed as uploads, never from the hub."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.helpers import pack
from worker.errors import JobFailure
from worker.formats.hf import export_hf_onnx, inspect_hf, load_hf, save_hf, verify_hf_zip

TINY = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64}


class SystemCall:
    """Unpickling this runs os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def classifier() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3)).eval()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory, classifier) -> Path:
    """save_pretrained output plus a tokenizer built offline from a small vocab.txt."""
    root = tmp_path_factory.mktemp("hf")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(95))]))
    folder = root / "bert"
    classifier.save_pretrained(folder)
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


@pytest.fixture()
def model_copy(tmp_path: Path, classifier_dir: Path) -> Path:
    """A copy of the classifier directory that a test may change."""
    return Path(shutil.copytree(classifier_dir, tmp_path / "src" / "bert"))


def failure(tmp_path: Path, folder: Path) -> JobFailure:
    with pytest.raises(JobFailure) as failed:
        load_hf(pack(folder, tmp_path / "upload.zip"), tmp_path)
    return failed.value


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_inspect_tiny_classifier(tmp_path: Path, classifier_dir: Path, classifier, suffix: str) -> None:
    info = inspect_hf(pack(classifier_dir, tmp_path / f"bert{suffix}"), tmp_path)
    assert info["params"] == sum(p.numel() for p in classifier.parameters())
    assert 0 < info["nonzero_params"] <= info["params"]
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i["shape"] == ["batch", "sequence"] and i["dtype"] == "int64" for i in info["inputs"])
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 3], "dtype": "float32"}]
    assert info["architecture"] == {"model_type": "bert", "class": "BertForSequenceClassification",
                                    "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                                    "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 512}
    assert info["tokenizer"] is True


def test_adapter_returns_the_model_logits(tmp_path: Path, classifier_dir: Path, classifier) -> None:
    hf = load_hf(pack(classifier_dir, tmp_path / "bert.zip"), tmp_path)
    assert hf.model_dir.name == "bert" and hf.tokenizer_dir == hf.model_dir
    assert hf.config["model_type"] == "bert" and not hf.model.training
    assert all(p.dtype == torch.float32 for p in hf.model.parameters())
    encoded = hf.tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    inputs = tuple(encoded[name] for name in hf.input_names)
    with torch.inference_mode():
        (logits,) = hf.module(*inputs)
        assert torch.equal(logits, hf.model(**encoded).logits)
        assert torch.allclose(logits, classifier(**encoded).logits, atol=1e-6)


def test_base_encoder_without_tokenizer(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "encoder"
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(folder)
    hf = load_hf(pack(folder, tmp_path / "encoder.tar.gz"), tmp_path)
    assert (hf.tokenizer, hf.tokenizer_dir) == (None, None)
    assert hf.input_names == ["input_ids", "attention_mask"]
    assert hf.outputs == [{"name": "last_hidden_state", "shape": ["batch", "sequence", 32], "dtype": "float32"}]
    inputs = hf.example_inputs(batch=2, seq=5)
    with torch.inference_mode():
        assert torch.equal(hf.module(*inputs)[0], hf.model(*inputs).last_hidden_state)


def test_unknown_model_type_is_refused(tmp_path: Path, model_copy: Path) -> None:
    edit_config(model_copy, model_type="totally-new-arch")
    refused = failure(tmp_path, model_copy)
    assert refused.code == "unsupported_architecture"
    assert "totally-new-arch" in refused.message


@pytest.mark.parametrize("changes", [{"auto_map": {"AutoModel": "modeling_evil.EvilModel"}},
                                     {"trust_remote_code": True}])
def test_remote_code_is_refused(tmp_path: Path, model_copy: Path, changes: dict) -> None:
    (model_copy / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    edit_config(model_copy, **changes)
    assert failure(tmp_path, model_copy).code == "remote_code_refused"


def test_malicious_pytorch_model_bin_is_refused_without_running(tmp_path: Path, model_copy: Path) -> None:
    marker = tmp_path / "pwned"
    (model_copy / "model.safetensors").unlink()
    torch.save({"weight": SystemCall(f"touch {marker}")}, model_copy / "pytorch_model.bin")
    assert failure(tmp_path, model_copy).code == "unsafe_weights"
    assert not marker.exists()


def test_clean_pytorch_model_bin_loads(tmp_path: Path, model_copy: Path, classifier) -> None:
    (model_copy / "model.safetensors").unlink()
    torch.save(classifier.state_dict(), model_copy / "pytorch_model.bin")
    hf = load_hf(pack(model_copy, tmp_path / "bert.zip"), tmp_path)
    inputs = hf.example_inputs()
    with torch.inference_mode():
        assert torch.allclose(hf.module(*inputs)[0], classifier(*inputs).logits, atol=1e-6)


def test_sharded_safetensors(tmp_path: Path, classifier) -> None:
    folder = tmp_path / "src" / "sharded"
    classifier.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    hf = load_hf(pack(folder, tmp_path / "sharded.zip"), tmp_path)
    inputs = hf.example_inputs()
    with torch.inference_mode():
        assert torch.allclose(hf.module(*inputs)[0], classifier(*inputs).logits, atol=1e-6)


def test_shard_index_pointing_outside_is_refused(tmp_path: Path, model_copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"classifier.bias": "../../outside.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert failure(tmp_path, model_copy).code == "missing_weights"


def test_missing_weights(tmp_path: Path, model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    assert failure(tmp_path, model_copy).code == "missing_weights"


def test_weights_that_do_not_fit_the_config(tmp_path: Path, model_copy: Path) -> None:
    edit_config(model_copy, id2label={str(i): f"L{i}" for i in range(5)},
                label2id={f"L{i}": i for i in range(5)})
    refused = failure(tmp_path, model_copy)
    assert refused.code == "weights_mismatch"
    assert "classifier.weight (weights [3, 32], config [5, 32])" in refused.message


def test_unsafe_archive_is_refused(tmp_path: Path, classifier_dir: Path) -> None:
    archive = pack(classifier_dir, tmp_path / "bert.zip")
    with zipfile.ZipFile(archive, "a") as out:
        out.writestr("../escape.txt", b"x")
    (tmp_path / "work").mkdir()
    with pytest.raises(JobFailure) as failed:
        load_hf(archive, tmp_path / "work")
    assert failed.value.code == "unsafe_archive"
    assert not (tmp_path / "escape.txt").exists()


def test_save_and_verify_round_trip(tmp_path: Path, classifier_dir: Path) -> None:
    hf = load_hf(pack(classifier_dir, tmp_path / "bert.tar.gz"), tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    zipped, config = save_hf(hf, hf.model, out, sparse=True)
    assert config is None  # a dense model keeps the plain layout
    names = set(zipfile.ZipFile(zipped).namelist())
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    again = verify_hf_zip(zipped, tmp_path)
    assert again.tokenizer is not None and again.input_names == hf.input_names
    inputs = hf.example_inputs()
    with torch.inference_mode():
        assert torch.equal(again.module(*inputs)[0], hf.module(*inputs)[0])


def test_export_onnx_runs_in_onnxruntime(tmp_path: Path, classifier_dir: Path) -> None:
    import onnxruntime as ort

    hf = load_hf(pack(classifier_dir, tmp_path / "bert.zip"), tmp_path)
    path = export_hf_onnx(hf, tmp_path / "bert.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == hf.input_names
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape == ["batch", "sequence"]
    inputs = hf.example_inputs(batch=4, seq=11, seed=3)
    (got,) = session.run(None, {name: t.numpy() for name, t in zip(hf.input_names, inputs)})
    with torch.inference_mode():
        expected = hf.module(*inputs)[0].numpy()
    assert np.abs(got - expected).max() < 1e-4


def _sentence_archive(folder: Path, modules: object, pooling: dict | None, path: str = "1_Pooling") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (folder / path).mkdir(parents=True, exist_ok=True)
        (folder / path / "config.json").write_text(json.dumps(pooling))
    return folder


POOLING_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]


@pytest.mark.parametrize("config, expected", [
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
    ({"pooling_mode_cls_token": True}, "cls"),
    ({"pooling_mode_max_tokens": True}, "max"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, None),  # two modes: not one embedding
    ({"pooling_mode_mean_sqrt_len_tokens": True}, None),  # a mode not computed here
    ({"pooling_mode_mean_tokens": "yes"}, None),
])
def test_a_sentence_transformers_archive_names_its_pooling(tmp_path: Path, config: dict, expected: str | None) -> None:
    from worker.formats.hf import sentence_pooling

    assert sentence_pooling(_sentence_archive(tmp_path / "m", POOLING_MODULES, config)) == expected


@pytest.mark.parametrize("modules, path", [
    ([{"path": "../outside", "type": "sentence_transformers.models.Pooling"}], "../outside"),  # leaves the archive
    ({"path": "1_Pooling"}, "1_Pooling"),  # not a list
    ([{"path": 3, "type": "sentence_transformers.models.Pooling"}], "1_Pooling"),
    (POOLING_MODULES * 2, "1_Pooling"),  # two pooling modules
])
def test_a_hostile_or_odd_modules_file_means_no_pooling(tmp_path: Path, modules: object, path: str) -> None:
    from worker.formats.hf import sentence_pooling

    folder = _sentence_archive(tmp_path / "inner" / "m", modules, {"pooling_mode_mean_tokens": True}, path)
    assert sentence_pooling(folder) is None
    (folder / "modules.json").write_text("[" * 100_000)  # not JSON a parser should recurse into
    assert sentence_pooling(folder) is None
    assert sentence_pooling(tmp_path / "nothing") is None


def test_a_sentence_encoder_upload_says_how_it_pools(tmp_path: Path) -> None:
    folder = tmp_path / "encoder"
    transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    _sentence_archive(folder, POOLING_MODULES, {"pooling_mode_mean_tokens": True})
    described = inspect_hf(pack(folder, tmp_path / "encoder.zip"), tmp_path / "work")
    assert described["architecture"]["sentence_pooling"] == "mean"
    assert "sentence_pooling" not in inspect_hf(pack(_without_modules(folder), tmp_path / "plain.zip"),
                                                tmp_path / "work2")["architecture"]


def _without_modules(folder: Path) -> Path:
    (folder / "modules.json").unlink()
    return folder
