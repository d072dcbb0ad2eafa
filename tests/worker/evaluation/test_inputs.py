"""Generated evaluation inputs: defaults from the declared shapes, and what input specs change."""

import numpy as np
import pytest

from app.core.input_specs import from_json
from worker.errors import JobFailure
from worker.evaluation.inputs import generate_feeds, plan

VAD = [{"name": "input", "shape": ["N", "samples"], "dtype": "float32"},
       {"name": "state", "shape": [2, "N", 8], "dtype": "float32"},
       {"name": "sr", "shape": [], "dtype": "int64"}]


def test_without_specs_symbolic_dims_are_small_and_values_standard_normal():
    feeds = generate_feeds(VAD, batches=2)
    assert [list(a.shape) for a in feeds[0]] == [[4, 16], [2, 4, 8], []]
    assert feeds[0][0].dtype == np.float32 and feeds[0][2].dtype == np.int64
    assert 0 <= int(feeds[0][2]) <= 7


def test_shapes_dtypes_and_ranges_come_from_the_specs():
    specs = from_json({"input": {"shape": [3, 128], "range": [-0.5, 0.5]},
                       "state": {"shape": [2, 3, 8], "batch_axis": 1, "dtype": "float16"},
                       "sr": {"range": [100, 105]}})
    for feeds in generate_feeds(VAD, batches=3, specs=specs):
        signal, state, rate = feeds
        assert signal.shape == (3, 128) and signal.min() >= -0.5 and signal.max() < 0.5
        assert signal.std() < 0.35  # uniform on a unit interval, not standard normal
        assert state.shape == (2, 3, 8) and state.dtype == np.float16
        assert rate.shape == () and 100 <= int(rate) <= 105


def test_a_symbol_fixed_by_one_spec_holds_for_the_inputs_that_share_it():
    feeds = generate_feeds(VAD, batches=1, specs=from_json({"input": {"shape": [5, 64]}}))[0]
    assert feeds[1].shape == (2, 5, 8)  # the state's batch (axis 1) follows the signal's


def test_constants_are_exactly_the_value_in_every_batch():
    specs = from_json({"sr": {"value": 16000}, "state": {"value": 0.0, "shape": [2, 4, 8]}})
    batches = generate_feeds(VAD, batches=4, specs=specs)
    for feeds in batches:
        assert feeds[2].dtype == np.int64 and feeds[2].shape == () and int(feeds[2]) == 16000
        assert feeds[1].shape == (2, 4, 8) and not feeds[1].any()
    assert not np.array_equal(batches[0][0], batches[1][0])  # the signal is still drawn afresh


def test_a_single_number_takes_the_rank_of_its_input_and_a_nested_list_is_kept():
    inputs = [{"name": "rate", "shape": [1], "dtype": "int64"}, {"name": "table", "shape": [2, 2], "dtype": "float32"}]
    feeds = generate_feeds(inputs, batches=1, specs=from_json({"rate": {"value": 8000},
                                                               "table": {"value": [[1, 2], [3, 4]]}}))[0]
    assert feeds[0].tolist() == [8000]
    assert feeds[1].dtype == np.float32 and feeds[1].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_the_plan_says_how_each_input_is_made():
    described = [item.describe() for item in plan(VAD, from_json({"sr": {"value": 16000},
                                                                  "input": {"range": [-1, 1]}}))]
    assert described == ["input: uniform in [-1, 1), shape [4, 16] float32",
                         "state: standard normal, shape [2, 4, 8] float32",
                         "sr: the constant 16000, shape [] int64"]


def test_integer_ranges_are_clamped_to_the_dtype_and_a_constant_that_does_not_fit_is_named():
    inputs = [{"name": "code", "shape": [4], "dtype": "uint8"}]
    feeds = generate_feeds(inputs, batches=1, specs=from_json({"code": {"range": [-10, 1e30]}}))[0]
    assert feeds[0].dtype == np.uint8
    for value in (16000, 1.5, -1):
        with pytest.raises(JobFailure) as caught:
            generate_feeds(inputs, batches=1, specs=from_json({"code": {"value": value}}))
        assert caught.value.message == "input_specs.code.value: does not fit the input's dtype uint8"


def test_an_unnamed_dim_in_a_spec_ties_no_other_input_to_it():
    inputs = [{"name": "a", "shape": ["dim", "dim"], "dtype": "float32"},
              {"name": "b", "shape": ["dim", 3], "dtype": "float32"}]
    feeds = generate_feeds(inputs, batches=1, specs=from_json({"a": {"shape": [1, 512]}}))[0]
    assert feeds[0].shape == (1, 512) and feeds[1].shape == (4, 3)
