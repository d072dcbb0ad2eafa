"""Input specs: the schema's bounds and cross-field rules, and the checks against a model's declared inputs."""

import json

import pytest

from app.core.input_specs import MAX_VALUE_ELEMENTS, from_json, merged, parse_json, problems_against_model, to_json

VAD_INPUTS = [{"name": "input", "shape": ["N", "samples"], "dtype": "float32"},
              {"name": "state", "shape": [2, "N", 128], "dtype": "float32"},
              {"name": "sr", "shape": [], "dtype": "int64"}]
VAD_SPECS = {"input": {"shape": [1, 512]}, "state": {"shape": [2, 1, 128], "batch_axis": 1}, "sr": {"value": 16000}}


def test_the_issue_example_parses_and_round_trips_only_what_was_given():
    specs = parse_json(json.dumps(VAD_SPECS))
    assert specs["state"].batch_axis == 1 and specs["sr"].is_constant and not specs["input"].is_constant
    assert to_json(specs) == VAD_SPECS
    assert to_json(from_json(to_json(specs))) == VAD_SPECS
    assert problems_against_model(specs, VAD_INPUTS) == []


@pytest.mark.parametrize("specs, start", [
    ({"x": {}}, "input_specs.x: give at least one"),
    ({"x": {"shape": [-1, 3]}}, "input_specs.x.shape.0"),
    ({"x": {"shape": [1] * 9}}, "input_specs.x.shape"),
    ({"x": {"shape": [4096, 4096, 4096]}}, "input_specs.x: shape"),
    ({"x": {"dtype": "float64"}}, "input_specs.x.dtype"),
    ({"x": {"range": [1, 1]}}, "input_specs.x: range"),
    ({"x": {"range": [0, "inf"]}}, "input_specs.x.range.1"),
    ({"x": {"range": [0]}}, "input_specs.x.range"),
    ({"x": {"shape": [2, 3], "batch_axis": 2}}, "input_specs.x: batch_axis"),
    ({"x": {"batch_axis": -1}}, "input_specs.x.batch_axis"),
    ({"x": {"value": 1, "range": [0, 2]}}, "input_specs.x: value: a constant excludes range"),
    ({"x": {"value": 1, "batch_axis": 1}}, "input_specs.x: batch_axis"),
    ({"x": {"value": [[1, 2], [3]]}}, "input_specs.x: value: nested lists must be rectangular"),
    ({"x": {"value": [0.0] * (MAX_VALUE_ELEMENTS + 1)}}, "input_specs.x: value: more than"),
    ({"x": {"value": "16000"}}, "input_specs.x: value: must be"),
    ({"x": {"value": None}}, "input_specs.x: value: must be"),
    ({"x": {"value": 2 ** 64}}, "input_specs.x: value: integers must fit"),
    ({"x": {"value": [1, 2, 3], "shape": [2, 2]}}, "input_specs.x: value: its shape [3] does not broadcast"),
    ({"x": {"shape": [1], "colour": "red"}}, "input_specs.x.colour"),
    ({f"x{i}": {"shape": [1]} for i in range(65)}, "input_specs"),
    ({"": {"shape": [1]}}, "input_specs"),
])
def test_bad_specs_name_the_field(specs, start):
    with pytest.raises(ValueError) as caught:
        parse_json(json.dumps(specs))
    assert str(caught.value).startswith(start), str(caught.value)


def test_bad_json_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="^input_specs: not valid JSON"):
        parse_json("{'input': 1}")


def test_a_constant_broadcasts_to_its_shape_and_a_small_nested_list_is_kept():
    specs = parse_json(json.dumps({"flag": {"value": [1, 0], "shape": [3, 2], "dtype": "bool"}}))
    assert specs["flag"].value_shape() == [3, 2]
    assert parse_json('{"table": {"value": [[1.5, 2], [3, 4]]}}')["table"].value_shape() == [2, 2]


def test_model_check_names_unknown_inputs_with_the_model_inputs_and_contradicted_dims():
    specs = parse_json(json.dumps({"audio": {"shape": [1, 16]}, "state": {"shape": [3, 1, 128]},
                                   "input": {"shape": [1, 2, 3]}, "sr": {"dtype": "int32"}}))
    problems = problems_against_model(specs, VAD_INPUTS)
    assert problems[0] == "input_specs.audio: the model has no input 'audio'; its inputs are input, state, sr"
    assert problems[1].startswith("input_specs.state.shape: dim 0 is 3, but the model fixes it at 2")
    assert problems[2].startswith("input_specs.input.shape: rank 3")
    assert problems[3] == "input_specs.sr.dtype: int32, but the model's input 'sr' takes int64"


def test_a_single_number_fits_an_input_of_any_rank_but_a_batch_axis_must_exist():
    assert problems_against_model(parse_json('{"sr": {"value": 8000}}'),
                                  [{"name": "sr", "shape": [1], "dtype": "int64"}]) == []
    problems = problems_against_model(parse_json('{"input": {"batch_axis": 2}}'), VAD_INPUTS)
    assert problems == ["input_specs.input.batch_axis: 2 is outside the model's input 'input' of rank 2"]


def test_a_job_overrides_the_model_defaults_per_input():
    model = {"input": {"shape": [1, 512]}, "sr": {"value": 16000}}
    assert merged(model, {"sr": {"value": 8000}}) == {"input": {"shape": [1, 512]}, "sr": {"value": 8000}}
    assert merged(None, None) is None and merged(model, None) == model
