"""Sparse weights in compressed-tensors' sparse-bitmask layout: smaller files that load back to identical weights,
with compressed-tensors' own reader as well as ours."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import pack, save_tiny_bert
from worker.compression import prune
from worker.errors import JobFailure
from worker.formats import sparse_safetensors


def _pruned_state(pattern: str | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    if pattern is not None:
        prune.prune_unstructured(model, method="magnitude", sparsity=0.5, pattern=pattern, threshold=None,
                                 scope="layer", exclude=[], calibration=None, check=lambda: None)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_a_sparse_file_is_smaller_says_its_layout_and_loads_back_identically(tmp_path: Path, pattern: str) -> None:
    from compressed_tensors.compressors import BitmaskCompressor
    from compressed_tensors.config import BitmaskConfig

    tensors = _pruned_state(pattern)
    save_file(tensors, str(tmp_path / "dense.safetensors"))
    config = sparse_safetensors.save(tensors, tmp_path / "sparse.safetensors")
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.6
    sparsity = config["sparsity_config"]
    assert (config["quant_method"], sparsity["format"]) == ("compressed-tensors", "sparse-bitmask")
    assert sparsity["sparsity_structure"] == pattern and sparsity["global_sparsity"] == 0.5
    assert sparsity["targets"] == ["0", "2"]
    assert sparse_safetensors.config_of(tmp_path / "sparse.safetensors") == config
    stored = load_file(str(tmp_path / "sparse.safetensors"))
    assert {"0.bitmask", "0.compressed", "0.row_offsets", "0.shape", "0.bias"} <= set(stored)
    assert "0.weight" not in stored
    ours = sparse_safetensors.decompress(stored)
    library = dict(BitmaskCompressor(config=BitmaskConfig(**sparsity)).decompress(str(tmp_path / "sparse.safetensors")))
    for back in (ours, library):
        assert set(back) == set(tensors) and all(torch.equal(back[name], tensors[name]) for name in tensors)


def test_dense_weights_keep_the_plain_layout(tmp_path: Path) -> None:
    tensors = _pruned_state(None)
    assert sparse_safetensors.save(tensors, tmp_path / "dense.safetensors") is None
    assert sparse_safetensors.config_of(tmp_path / "dense.safetensors") is None
    assert set(load_file(str(tmp_path / "dense.safetensors"))) == set(tensors)
    pruned = _pruned_state("unstructured")
    assert sparse_safetensors.save(pruned, tmp_path / "asked-dense.safetensors", sparse=False) is None


def test_parts_that_disagree_are_refused_before_anything_is_allocated() -> None:
    stored = sparse_safetensors.compress(_pruned_state("unstructured"), ["0.weight"])
    wrong_shape = {**stored, "0.shape": torch.tensor([100_000, 100_000])}
    with pytest.raises(ValueError, match="does not fit its bitmask"):
        sparse_safetensors.decompress(wrong_shape)
    with pytest.raises(ValueError, match="values for"):
        sparse_safetensors.decompress({**stored, "0.compressed": stored["0.compressed"][:-1]})
    with pytest.raises(ValueError, match="lacks"):
        sparse_safetensors.decompress({k: v for k, v in stored.items() if k != "0.row_offsets"})


def test_a_sparse_hugging_face_export_says_so_in_its_config_and_loads_back(tmp_path: Path) -> None:
    from worker.formats.hf import load_hf, save_hf

    save_tiny_bert(tmp_path / "bert", num_labels=None)
    hf = load_hf(pack(tmp_path / "bert", tmp_path / "bert.zip"), tmp_path / "load")
    prune.prune_unstructured(hf.model, method="magnitude", sparsity=0.5, pattern="2:4", threshold=None,
                             scope="layer", exclude=[], calibration=None, check=lambda: None)
    zipped, config = save_hf(hf, hf.model, tmp_path / "out", sparse=True)
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    with zipfile.ZipFile(zipped) as archive:
        assert json.loads(archive.read("model/config.json"))["quantization_config"] == config
    back = load_hf(zipped, tmp_path / "back")
    assert "quantization_config" not in back.config
    dense, again = hf.model.state_dict(), back.model.state_dict()
    assert all(torch.equal(dense[name], again[name]) for name in dense)


def test_a_sparse_directory_that_would_unpack_too_far_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = _pruned_state("unstructured")
    config = sparse_safetensors.save(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "quantization_config": config}))
    with pytest.raises(JobFailure, match="could unpack to"):
        sparse_safetensors.densify_hf_dir(folder, max_bytes=1000)
    assert sparse_safetensors.densify_hf_dir(folder, max_bytes=10**9)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert all(torch.equal(load_file(str(folder / "model.safetensors"))[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("embeddings", [False, True])
def test_an_encoder_file_is_small_only_when_its_word_embeddings_are_pruned_too(tmp_path: Path,
                                                                               embeddings: bool) -> None:
    """Shaped like MiniLM, where the word embeddings hold about half of the weights: 50% of the Linear weights
    alone leave the file above 0.6x of the dense one; with the tables pruned too it is about 0.55x."""
    import transformers
    from compressed_tensors.compressors import BitmaskCompressor
    from compressed_tensors.config import BitmaskConfig

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    prune.prune_unstructured(model, method="magnitude", sparsity=0.5, pattern="unstructured", threshold=None,
                             scope="layer", exclude=[], calibration=None, embeddings=embeddings)
    tensors = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "dense.safetensors"))
    config = sparse_safetensors.save(tensors, tmp_path / "sparse.safetensors")
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ("embeddings.word_embeddings" in config["sparsity_config"]["targets"]) == embeddings
    assert (ratio <= 0.6) == embeddings, ratio
    library = dict(BitmaskCompressor(config=BitmaskConfig(**config["sparsity_config"]))
                   .decompress(str(tmp_path / "sparse.safetensors")))
    assert set(library) == set(tensors) and all(torch.equal(library[name], tensors[name]) for name in tensors)
