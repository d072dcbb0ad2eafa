"""Recipe rules that depend on more than one field."""

import pytest
from pydantic import ValidationError

from app.core.recipe import QuantizeStep


def test_a_group_size_implies_groups() -> None:
    step = QuantizeStep(op="quantize", method="weight_only", dtype="int4", group_size=32)
    assert (step.granularity, step.group_size) == ("group", 32)
    assert QuantizeStep(op="quantize", method="weight_only", granularity="group").group_size == 128


def test_a_group_size_with_another_granularity_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match="group_size needs granularity 'group'"):
        QuantizeStep(op="quantize", method="weight_only", dtype="int4", granularity="per_channel", group_size=32)
