"""Evaluation inputs generated from a model's input description, when no dataset is given.

Seeded, so the baseline and the compressed model see exactly the same inputs. Text-model inputs with a
fixed meaning get valid values: `attention_mask` all ones, `token_type_ids` all zeros.
"""

from typing import Any

import numpy as np

# Symbolic dims: the first (usually batch) gets a small batch, later ones a short sequence/feature length.
SYMBOLIC_FIRST_DIM = 4
SYMBOLIC_OTHER_DIM = 16
INT_HIGH = 8  # integer inputs (token ids, indices) stay small so any vocabulary accepts them


def concrete_shape(shape: list, symbols: dict[str, int]) -> list[int]:
    dims = []
    for position, dim in enumerate(shape):
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
        else:
            default = SYMBOLIC_FIRST_DIM if position == 0 else SYMBOLIC_OTHER_DIM
            dims.append(symbols.setdefault(str(dim), default))
    return dims


def generate_feeds(inputs: list[dict[str, Any]], batches: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    symbols: dict[str, int] = {}
    shapes = [concrete_shape(spec["shape"], symbols) for spec in inputs]
    feeds = []
    for _ in range(batches):
        batch = []
        for spec, shape in zip(inputs, shapes):
            dtype = spec["dtype"]
            if spec["name"] == "attention_mask":
                batch.append(np.ones(shape, dtype=dtype if dtype != "bool" else bool))
            elif spec["name"] == "token_type_ids":
                batch.append(np.zeros(shape, dtype=dtype))
            elif dtype == "bool":
                batch.append(rng.integers(0, 2, size=shape).astype(bool))
            elif dtype.startswith(("int", "uint")):
                batch.append(rng.integers(0, INT_HIGH, size=shape).astype(dtype))
            else:
                np_dtype = np.float16 if dtype == "float16" else np.float32
                batch.append(rng.standard_normal(size=shape).astype(np_dtype))
        feeds.append(batch)
    return feeds
