"""Input specs proposed at inspection, on tiny ONNX graphs and on declared inputs alone."""

import pytest

from app.core.input_specs import from_json, problems_against_model
from tests.worker.input_models import STATE, save_image_model, save_stateful_model
from worker import formats
from worker.formats.suggestions import suggest


def test_an_image_model_with_symbolic_height_and_width_gets_224(tmp_path):
    info = formats.inspect(save_image_model(tmp_path / "image.onnx"), "onnx", tmp_path)
    assert info["suggested_input_specs"] == {"image": {"shape": [1, 3, 224, 224]}}
    assert "input 'image' looks like an image: suggested 224 x 224" in info["input_spec_notes"]
    assert any(note.startswith("could not tell the range of input 'image'") for note in info["input_spec_notes"])


def test_a_stateful_model_gets_its_state_batch_axis_and_a_constant_rate_and_says_what_it_cannot_tell(tmp_path):
    info = formats.inspect(save_stateful_model(tmp_path / "vad.onnx"), "onnx", tmp_path)
    suggested = info["suggested_input_specs"]
    assert suggested == {"input": {"shape": [1, 16]}, "state": {"shape": [2, 1, STATE], "batch_axis": 1},
                         "sr": {"value": 16000}}
    notes = info["input_spec_notes"]
    assert "could not tell the size of dim 1 ('samples') of input 'input'; suggested 16, give the length the " \
           "model needs" in notes
    assert any(note.startswith("input 'sr' looks like a sample rate") for note in notes)
    # A proposal is a valid job body as it stands.
    assert problems_against_model(from_json(suggested), info["inputs"]) == []


@pytest.mark.parametrize("inputs, specs", [
    ([{"name": "pixel_values", "shape": ["batch", "h", "w", 3], "dtype": "float32"}],
     {"pixel_values": {"shape": [1, 224, 224, 3]}}),
    ([{"name": "fixed", "shape": [1, 3, 32, 32], "dtype": "float32"}], {}),
    ([{"name": "x", "shape": ["dim", 3, "dim", "dim"], "dtype": "float32"}], {"x": {"shape": [1, 3, 224, 224]}}),
    ([{"name": "x", "shape": ["b", 1, "h", 32], "dtype": "float32"}], {"x": {"shape": [1, 1, 224, 32]}}),
    ([{"name": "sample_rate", "shape": [1], "dtype": "int64"}], {"sample_rate": {"value": 16000}}),
    ([{"name": "steps", "shape": [], "dtype": "int64"}], {}),
    ([{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
      {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"}],
     {"input_ids": {"shape": [1, 16]}, "attention_mask": {"shape": [1, 16]}}),
])
def test_suggestions_from_declared_inputs(inputs, specs):
    suggested, notes = suggest(inputs)
    assert suggested == specs
    assert notes  # ranges, lengths or settings it could not tell


def test_a_scalar_that_is_not_a_rate_is_flagged_not_guessed():
    _, notes = suggest([{"name": "steps", "shape": [], "dtype": "int64"}])
    assert notes[0] == "input 'steps' is a scalar: if it is a setting, give its constant value"


def test_notes_stay_readable_for_a_model_with_many_inputs():
    _, notes = suggest([{"name": f"x{i}", "shape": ["batch", "n"], "dtype": "float32"} for i in range(100)])
    assert len(notes) == 33 and notes[-1] == "... and 168 more notes like these"


def test_a_pt2_exports_dim_ranges_bound_the_suggested_sizes():
    inputs = [{"name": "signal", "shape": ["s0", "s1"], "dtype": "float32"}]
    suggested, notes = suggest(inputs, {"s0": [2, None], "s1": [64, 4096]})
    assert suggested == {"signal": {"shape": [2, 64]}}
    assert "dim 1 ('s1') of input 'signal': the export allows [64, 4096] ([min, max], null: no bound); " \
           "suggested 64" in notes
