"""Dataset arrays against model inputs from shapes and dtypes alone (the worker's values checks are its own)."""

import pytest

from app.core.dataset_fit import Misfit, check_fit

STATEFUL = [{"name": "input", "shape": ["batch", 512], "dtype": "float32"},
            {"name": "state", "shape": [2, "batch", 128], "dtype": "float32"}]


def test_arrays_fit_by_name_with_a_batch_axis_left_out():
    arrays = {"state": ([10, 2, 128], "float32"), "input": ([10, 512], "float64")}
    pairs = check_fit(arrays, STATEFUL, "eval", {"state": 1})
    assert [(name, spec["name"]) for name, spec in pairs] == [("input", "input"), ("state", "state")]


@pytest.mark.parametrize("arrays, batch_axes, message", [
    ({"state": ([10, 128, 2], "float32"), "input": ([10, 512], "float32")}, {"state": 1},
     "eval dataset: array 'state' has shape (10, 128, 2) per-sample (128, 2), but model input 'state' expects "
     "(2, 128) (its batch axis 1 left out)"),
    ({"input": ([10, 512], "float32")}, None,
     "eval dataset: no array for model input 'state' (dataset has: input); an input that is a constant can be "
     "given in input_specs as a `value` instead"),
])
def test_misfits_name_the_array_and_the_input(arrays, batch_axes, message):
    with pytest.raises(Misfit) as caught:
        check_fit(arrays, STATEFUL, "eval", batch_axes)
    assert str(caught.value) == message


def test_float_data_never_feeds_integer_inputs_and_scalars_need_a_constant():
    with pytest.raises(Misfit, match="holds float32 values, but model input 'ids' takes int64"):
        check_fit({"x": ([4, 8], "float32")}, [{"name": "ids", "shape": ["b", 8], "dtype": "int64"}], "train")
    with pytest.raises(Misfit, match="model input 'sr' is a scalar"):
        check_fit({"sr": ([4], "int64")}, [{"name": "sr", "shape": [], "dtype": "int64"}], "calibration")
    assert check_fit({"x": ([4, 8], "int32")}, [{"name": "ids", "shape": ["b", 8], "dtype": "bfloat16"}], "eval")
