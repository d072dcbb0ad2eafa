import math

import numpy as np

from worker.evaluation.data import perplexity


def test_perplexity_counts_real_next_tokens_only():
    vocab = 4
    logits = np.zeros((2, 3, vocab), dtype=np.float32)  # uniform everywhere ...
    logits[0, 0, 2] = math.log(3.0)  # ... except text 0's first position: p(token 2) = 3 / 6
    ids = np.array([[1, 2, 3], [3, 1, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)  # text 1 has one pad at the end
    # counted: text 0 predicts 2 (p 1/2) and 3 (p 1/4); text 1 predicts 1 (p 1/4); the pad is not predicted
    expected = math.exp((math.log(2) + math.log(4) + math.log(4)) / 3)
    got = perplexity([[logits]], [[ids, mask]], ["input_ids", "attention_mask"])
    assert abs(got - expected) < 1e-5
    assert abs(perplexity([[logits]], [[ids]], ["input_ids"]) - math.exp(
        (math.log(2) + 3 * math.log(4)) / 4)) < 1e-5  # no mask: every next token counts
