"""Fidelity on padded text batches (found by bench/zoo.py: all-MiniLM-L6-v2's int8-faithful model scored 0.91 with
the padded positions counted, 0.998 on the real tokens)."""

import numpy as np
import pytest

from worker.evaluation.measure import fidelity


def test_padded_positions_do_not_count_when_masks_are_given():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    moved = hidden.copy()
    moved[0, 3:] = -hidden[0, 3:] * 10  # padding of the first sample: wildly different, real tokens identical
    unmasked = fidelity([[hidden]], [[moved]])
    masked = fidelity([[hidden]], [[moved]], [mask])
    assert unmasked["cosine_min"] < 0.5
    assert masked["cosine_mean"] == pytest.approx(1.0) and masked["cosine_min"] == pytest.approx(1.0)
    assert masked["rel_l2"] == pytest.approx(0.0, abs=1e-6)


def test_masks_leave_other_outputs_alone():
    """A [batch, classes] output whose width happens to equal the sequence length is not a per-token output."""
    mask = np.array([[1, 1, 0]], dtype=np.int64)
    logits, changed = np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, -3.0]])
    pooled = np.ones((1, 3, 2))  # per-token, masked: its last position differs but is padding
    pooled_changed = pooled.copy()
    pooled_changed[0, 2] = -5
    result = fidelity([[logits, pooled]], [[changed, pooled_changed]], [mask])
    expected = (1 + 4 - 9 + 4) / (np.sqrt(14 + 4) * np.sqrt(14 + 4))  # logits in full, then the 2 real tokens
    assert result["cosine_mean"] == pytest.approx(expected)
    assert result["top1_agreement"] == 0.0


def test_a_sentence_encoder_is_judged_on_its_pooled_embedding():
    from worker.evaluation.measure import sentence_embeddings

    rng = np.random.default_rng(0)
    states = rng.standard_normal((2, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    [[mean]] = sentence_embeddings([[states]], [mask], "mean")
    np.testing.assert_allclose(mean[1], states[1, :2].mean(axis=0), rtol=1e-6)  # padding left out
    [[cls]] = sentence_embeddings([[states]], [mask], "cls")
    np.testing.assert_array_equal(cls, states[:, 0])
    [[top]] = sentence_embeddings([[states]], [mask], "max")
    np.testing.assert_allclose(top[1], states[1, :2].max(axis=0), rtol=1e-6)
    # token states that move while their mean stays: the tokens' cosine drops, the embedding's does not
    moved = states.copy()
    moved[:, 0] += 1.0
    moved[:, 1] -= 1.0
    tokens = fidelity([[states]], [[moved]], [mask])
    pooled = fidelity([[states]], [[moved]], [mask], pooling="mean")
    assert tokens["cosine_mean"] < 0.9 and pooled["cosine_mean"] == pytest.approx(1.0)
    assert pooled["top1_agreement"] is None  # an embedding has no classes
