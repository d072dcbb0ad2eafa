import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.app.core.vetting.test_dataset_files import TouchOnUnpickle, write_npz
from worker.dataset_arrays import DatasetArrays, batches, load_arrays, match_inputs, tokenize_texts
from worker.errors import JobFailure


def failure(call, *args, **kwargs) -> JobFailure:
    with pytest.raises(JobFailure) as caught:
        call(*args, **kwargs)
    return caught.value


def test_load_npz_keeps_file_order_and_splits_labels(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    mask = np.ones((6, 4), np.int64)
    path = write_npz(tmp_path / "d.npz", mask=mask, labels=np.arange(6), x=x)
    data = load_arrays(path, "npz")
    assert list(data.inputs) == ["mask", "x"]
    np.testing.assert_array_equal(data.inputs["x"], x)
    np.testing.assert_array_equal(data.labels, np.arange(6))
    assert data.texts is None


def test_load_safetensors(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": np.ones((3, 2), np.float16), "labels": np.array([0, 1, 1], np.int32)}, str(path))
    data = load_arrays(path, "safetensors")
    assert list(data.inputs) == ["x"] and data.inputs["x"].dtype == np.float16
    np.testing.assert_array_equal(data.labels, [0, 1, 1])
    assert len(load_arrays(path, "safetensors", limit=512).inputs["x"]) == 3  # a limit past the end reads all


def test_load_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    data = load_arrays(path, "jsonl")
    assert data.inputs == {} and data.texts == ["good", "bad"]
    assert data.labels.tolist() == [1, 0] and data.labels.dtype == np.int64
    path.write_text('{"text": "good"}\n')
    assert load_arrays(path, "jsonl").labels is None


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_values_are_refused_naming_the_sample(tmp_path, bad, what):
    x = np.zeros((8, 2, 3), np.float32)
    x[5, 1, 2] = bad
    x[7, 0, 0] = bad
    error = failure(load_arrays, write_npz(tmp_path / "d.npz", x=x), "npz")
    assert error.code == "invalid_dataset"
    assert error.message == f"array 'x' has {what} values, first at sample 5; datasets must hold finite values"


def test_negative_labels_are_refused(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((3, 2)), labels=np.array([0, -1, 2]))
    assert failure(load_arrays, path, "npz").message == "array 'labels' has a negative class id at sample 1"


def test_files_inspect_refuses_are_refused(tmp_path):
    marker = tmp_path / "unpickled"
    path = write_npz(tmp_path / "d.npz", x=np.array([TouchOnUnpickle(marker)] * 2, dtype=object))
    error = failure(load_arrays, path, "npz")
    assert error.code == "invalid_dataset" and "dtype object" in error.message
    assert not marker.exists()
    path = write_npz(tmp_path / "e.npz", x=np.zeros((4, 2)), labels=np.arange(5))
    assert failure(load_arrays, path, "npz").message == "array 'labels' has 5 samples but 'x' has 4"


def test_recorded_format_must_match_the_file(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((4, 2)))
    assert failure(load_arrays, path, "safetensors").message == (
        "the dataset file holds npz, but was recorded as safetensors")


MODEL_INPUTS = [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"},
                {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64"}]


def test_match_by_name_in_model_order_with_casts():
    data = DatasetArrays(inputs={"attention_mask": np.ones((4, 8), np.int32), "extra": np.zeros((4, 1)),
                                 "input_ids": np.arange(32, dtype=np.int32).reshape(4, 8)})
    ids, mask = match_inputs(data, MODEL_INPUTS, "eval")
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    np.testing.assert_array_equal(ids, np.arange(32).reshape(4, 8))


def test_single_input_matches_positionally_and_casts():
    data = DatasetArrays(inputs={"features": np.ones((5, 16), np.float64)})
    (matched,) = match_inputs(data, [{"name": "input", "shape": ["N", 16], "dtype": "float32"}], "calibration")
    assert matched.dtype == np.float32 and matched.shape == (5, 16)
    (as_half,) = match_inputs(data, [{"name": "input", "shape": [5, 16], "dtype": "float16"}], "calibration")
    assert as_half.dtype == np.float16


def test_shape_mismatch_names_both_shapes():
    data = DatasetArrays(inputs={"x": np.zeros((100, 12), np.float32)})
    error = failure(match_inputs, data, [{"name": "input", "shape": ["batch", 16], "dtype": "float32"}], "eval")
    assert error.code == "invalid_dataset"
    assert error.message == ("eval dataset: array 'x' has shape (100, 12) per-sample (12,), but model input "
                             "'input' expects (16,)")
    error = failure(match_inputs, data, [{"name": "input", "shape": ["batch", "seq", 12], "dtype": "float32"}],
                    "train")
    assert error.message.endswith("but model input 'input' expects (seq, 12)")


def test_a_scalar_input_is_pointed_to_input_specs():
    """bench/zoo.py: a voice-activity model's scalar sample rate `sr` got "per-sample (), but ... expects ()"."""
    data = DatasetArrays(inputs={"input": np.zeros((4, 512), np.float32), "sr": np.full((4,), 16000, np.int64)})
    error = failure(match_inputs, data, [{"name": "input", "shape": ["batch", "samples"], "dtype": "float32"},
                                         {"name": "sr", "shape": [], "dtype": "int64"}], "eval")
    assert error.code == "invalid_dataset"
    assert "model input 'sr' is a scalar" in error.message and "input_specs as a constant `value`" in error.message


def test_missing_input_lists_what_the_dataset_has():
    data = DatasetArrays(inputs={"input_ids": np.zeros((2, 4), np.int64), "x": np.zeros((2, 4), np.int64)})
    error = failure(match_inputs, data, MODEL_INPUTS, "eval")
    assert error.message == ("eval dataset: no array for model input 'attention_mask' (dataset has: input_ids, x); "
                             "an input that is a constant can be given in input_specs as a `value` instead")


def test_lossy_casts_are_refused():
    floats = DatasetArrays(inputs={"x": np.full((2, 4), 0.5, np.float32)})
    error = failure(match_inputs, floats, [{"name": "x", "shape": ["b", 4], "dtype": "int64"}], "eval")
    assert error.message == ("eval dataset: array 'x' holds float32 values, but model input 'x' takes int64; "
                             "store integer values")
    big = DatasetArrays(inputs={"x": np.array([[1], [2**40]], np.int64)})
    error = failure(match_inputs, big, [{"name": "x", "shape": ["b", 1], "dtype": "int32"}], "eval")
    assert error.message == ("eval dataset: array 'x' has values from 1 to 1099511627776, outside the int32 "
                             "range of model input 'x'")
    error = failure(match_inputs, DatasetArrays(inputs={"m": np.array([[0, 2]])}),
                    [{"name": "m", "shape": ["b", 2], "dtype": "bool"}], "eval")
    assert error.message == "eval dataset: array 'm' must hold only 0 and 1 to feed bool model input 'm'"
    (mask,) = match_inputs(DatasetArrays(inputs={"m": np.array([[0, 1]])}),
                           [{"name": "m", "shape": ["b", 2], "dtype": "bool"}], "eval")
    assert mask.dtype == np.bool_ and mask.tolist() == [[False, True]]


def test_unfeedable_model_dtype_and_text_dataset():
    data = DatasetArrays(inputs={"x": np.zeros((2, 4), np.float32)})
    error = failure(match_inputs, data, [{"name": "x", "shape": ["b", 4], "dtype": "bfloat16"}], "eval")
    assert error.code == "unsupported_model" and "bfloat16" in error.message
    error = failure(match_inputs, DatasetArrays(inputs={}, texts=["hi"]), MODEL_INPUTS, "train")
    assert error.message.startswith("train dataset holds texts (jsonl)")


def test_batches_keep_a_partial_batch_when_the_size_is_dynamic():
    x, labels = np.arange(10).reshape(5, 2), np.arange(5)
    result = batches([x, x * 2], 2, labels)
    assert result.dropped == 0
    assert [len(b[0][0]) for b in result.batches] == [2, 2, 1]
    np.testing.assert_array_equal(result.batches[2][0][1], [[16, 18]])
    np.testing.assert_array_equal(result.batches[2][1], [4])
    assert batches([x], 2).batches[0][1] is None


def test_static_batches_drop_the_partial_batch():
    x = np.arange(10).reshape(5, 2)
    result = batches([x], 2, np.arange(5), static=True)
    assert result.dropped == 1
    assert [b[1].tolist() for b in result.batches] == [[0, 1], [2, 3]]
    exact = batches([x], 5, static=True)
    assert exact.dropped == 0 and len(exact.batches) == 1


def test_static_batch_larger_than_the_dataset_fails():
    error = failure(batches, [np.zeros((3, 2))], 8, static=True, role="calibration")
    assert error.code == "invalid_dataset"
    assert error.message == "calibration dataset has 3 samples, fewer than the model's fixed batch size of 8"


@pytest.fixture
def tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "very", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(tmp_path))  # a local folder: nothing is downloaded


def test_tokenize_keeps_only_model_inputs(tokenizer):
    encoded = tokenize_texts(["good movie", "very bad movie !"], tokenizer, ["input_ids", "attention_mask"],
                             max_length=8)
    assert list(encoded) == ["input_ids", "attention_mask"]
    assert encoded["input_ids"].shape == (2, 6)  # padded to the longest text, not to max_length
    assert encoded["input_ids"][0].tolist() == [2, 5, 7, 3, 0, 0]
    assert encoded["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 1]
    truncated = tokenize_texts(["very " * 20], tokenizer, ["input_ids"], max_length=4)
    assert truncated["input_ids"].tolist() == [[2, 8, 8, 3]]


def test_tokenize_then_match(tokenizer):
    data = DatasetArrays(inputs=tokenize_texts(["good", "bad"], tokenizer, ["input_ids", "attention_mask"],
                                               max_length=6), labels=np.array([1, 0]))
    ids, mask = match_inputs(data, MODEL_INPUTS, "eval")
    assert ids.shape == mask.shape == (2, 3)


def test_tokenizer_without_any_model_input_fails(tokenizer):
    error = failure(tokenize_texts, ["good"], tokenizer, ["pixel_values"])
    assert error.message.startswith("the tokenizer produces input_ids, token_type_ids, attention_mask, none of "
                                    "which the model takes (pixel_values)")


def test_jsonl_written_by_json_dumps_roundtrips(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": i}) for i, t in enumerate(["a\u00e9", "b\nc"])))
    assert load_arrays(Path(path), "jsonl").texts == ["a\u00e9", "b\nc"]
