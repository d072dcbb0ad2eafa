"""Job data from datasets under input specs: batching along an input's batch axis, constants taken from the
specs, and the failure that names the inputs when the model does not run on them."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.core.input_specs import from_json
from worker.errors import JobFailure
from worker.evaluation.data import batch_size, inputs_do_not_run, prepare
from worker.formats.loaded import LoadedModel

VAD = LoadedModel(format="onnx", info={}, outputs=[{"name": "output", "shape": ["N", 4], "dtype": "float32"}],
                  inputs=[{"name": "input", "shape": ["N", "samples"], "dtype": "float32"},
                          {"name": "state", "shape": [2, "N", 8], "dtype": "float32"},
                          {"name": "sr", "shape": [], "dtype": "int64"}])
SPECS = from_json({"input": {"shape": [3, 128]}, "state": {"shape": [2, 3, 8], "batch_axis": 1},
                   "sr": {"value": 16000}})


def samples(count=10):
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((count, 128)).astype(np.float32),
            "state": rng.standard_normal((count, 2, 8)).astype(np.float32)}


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_samples_are_batched_along_each_inputs_batch_axis_with_constants_from_the_specs(tmp_path, fmt):
    arrays = samples()
    path = tmp_path / f"eval.{fmt}"
    np.savez(path, **arrays) if fmt == "npz" else save_file(arrays, str(path))
    data = prepare(VAD, {"eval": (path, fmt), "calibration": (path, fmt)}, SPECS)
    assert [[list(a.shape) for a in feeds] for feeds in data.eval_batches] == [
        [[3, 128], [2, 3, 8], []]] * 3 + [[[1, 128], [2, 1, 8], []]]
    first = data.eval_batches[0]
    np.testing.assert_array_equal(first[1][:, 2, :], arrays["state"][2])  # sample 2 sits at index 2 of axis 1
    np.testing.assert_array_equal(first[0][2], arrays["input"][2])
    assert all(int(feeds[2]) == 16000 for feeds in data.eval_batches + data.calibration)
    assert data.description["samples"] == 10 and data.description["calibration_samples"] == 10
    assert data.val is None  # training steps cannot take this layout


def test_a_per_sample_shape_is_checked_without_the_batch_axis(tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, input=samples()["input"], state=np.zeros((10, 8, 2), dtype=np.float32))
    with pytest.raises(JobFailure) as caught:
        prepare(VAD, {"eval": (path, "npz")}, SPECS)
    assert caught.value.message == ("eval dataset: array 'state' has shape (10, 8, 2) per-sample (8, 2), but "
                                    "model input 'state' expects (2, 8) (its batch axis 1 left out)")


def test_an_input_missing_from_the_dataset_is_named_with_the_way_to_give_it(tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, **samples())
    with pytest.raises(JobFailure) as caught:
        prepare(VAD, {"eval": (path, "npz")}, from_json({"state": {"batch_axis": 1}}))
    assert "no array for model input 'sr'" in caught.value.message and "`value`" in caught.value.message


def test_training_refuses_a_layout_it_cannot_feed(tmp_path):
    path = tmp_path / "train.npz"
    np.savez(path, **samples())
    with pytest.raises(JobFailure, match="batch_axis other than 0"):
        prepare(VAD, {"train": (path, "npz")}, SPECS)


def test_the_batch_size_is_read_at_the_batch_axis_of_the_first_data_input():
    assert batch_size(VAD.inputs) == (16, False)
    assert batch_size(VAD.inputs, SPECS) == (3, False)
    fixed = [{"name": "sr", "shape": [], "dtype": "int64"}, {"name": "state", "shape": [2, 5, 8], "dtype": "float32"}]
    assert batch_size(fixed, from_json({"sr": {"value": 1}, "state": {"batch_axis": 1}})) == (5, True)


def test_generated_inputs_that_do_not_run_name_the_made_up_inputs_and_what_to_give():
    specs = from_json({"sr": {"value": 16000}})
    data = prepare(VAD, {}, specs)
    failure = inputs_do_not_run(VAD, data, specs)
    assert failure.code == "input_spec_needed"
    assert failure.message.startswith("the model does not run on the generated inputs (input: standard normal, "
                                      "shape [4, 16] float32; state: standard normal, shape [2, 4, 8] float32); "
                                      "give input_specs for 'input', 'state': a concrete shape")
    assert "'sr'" not in failure.message.partition("; a starting point")[0]
    assert failure.message.endswith('a starting point, read from the declared inputs (lengths it cannot tell are '
                                    '16): {"input": {"shape": [1, 16]}, "state": {"shape": [2, 1, 8], '
                                    '"batch_axis": 1}}')


def test_dataset_batches_that_do_not_run_are_an_invalid_dataset_naming_the_shapes(tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, **samples())
    data = prepare(VAD, {"eval": (path, "npz")}, SPECS)
    failure = inputs_do_not_run(VAD, data, SPECS)
    assert failure.code == "invalid_dataset"
    assert failure.message.startswith("the model does not run on the eval dataset's batches (input [3, 128] float32, "
                                      "state [2, 3, 8] float32, sr [] int64)")


def test_inputs_all_made_from_specs_that_do_not_run_point_at_the_specs():
    data = prepare(VAD, {}, SPECS)
    failure = inputs_do_not_run(VAD, data, SPECS)
    assert failure.code == "input_spec_needed"
    assert failure.message.startswith("the model does not run on the inputs made from its input_specs (input: "
                                      "standard normal, shape [3, 128] float32; state: standard normal, shape "
                                      "[2, 3, 8] float32; sr: the constant 16000, shape [] int64); check the shapes")


def test_without_an_eval_dataset_the_calibration_data_is_measured(tmp_path):
    """Real inputs judge better than generated ones (all-MiniLM-L6-v2's smoothed int8: 0.89 on random token ids,
    0.998 on real sentences)."""
    from tests.app.core.vetting.test_dataset_files import write_npz

    loaded = LoadedModel(format="onnx", info={}, inputs=[{"name": "x", "shape": ["N", 4], "dtype": "float32"}],
                         outputs=[{"name": "y", "shape": ["N", 2], "dtype": "float32"}])
    path = write_npz(tmp_path / "cal.npz", x=np.arange(40, dtype=np.float32).reshape(10, 4),
                     labels=np.zeros(10, np.int64))
    data = prepare(loaded, {"calibration": (path, "npz")})
    assert data.description["inputs"] == "calibration dataset" and "calibration saw it" in data.description["note"]
    assert sum(len(b[0]) for b in data.eval_batches) == 10 and data.eval_labels is None
    assert data.calibration is not None
