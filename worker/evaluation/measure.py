"""One measurement routine for every model, baseline and compressed alike (same inputs, same process).

A model file is opened by the runtime the job targets (ONNX Runtime for .onnx, torch for .pt2) and timed and
compared in exactly the same way whatever it is.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from worker.formats.onnx_pair import is_pair, open_pair
from worker.runtime import open_runner

Runner = Callable[[list[np.ndarray]], list[np.ndarray]]


def latency_ms(run: Runner, feeds: list[np.ndarray], warmup: int, runs: int,
               check: Callable[[], None] = lambda: None) -> dict:
    """p50/p95 of single-batch runs after warm-up, and their spread (min, max, mean, standard deviation: how far
    one run is from another on this machine); `check` is called between runs so a cancel is noticed."""
    for _ in range(warmup):
        run(feeds)
    times = []
    for index in range(runs):
        if index % 20 == 0:
            check()
        start = time.perf_counter()
        run(feeds)
        times.append((time.perf_counter() - start) * 1000)
    spread = {"p50": np.percentile(times, 50), "p95": np.percentile(times, 95), "min": np.min(times),
              "max": np.max(times), "mean": np.mean(times), "stdev": np.std(times)}
    return {**{name: round(float(value), 4) for name, value in spread.items()}, "runs": runs,
            "batch_shape": [list(a.shape) for a in feeds]}


def _per_sample(batches: list[list[np.ndarray]]) -> np.ndarray:
    """Rows = samples (first axis of each output), columns = all outputs flattened side by side."""
    per_batch = []
    for batch in batches:
        rows = batch[0].shape[0] if batch[0].ndim > 0 else 1
        per_batch.append(np.concatenate([np.asarray(o, np.float64).reshape(rows, -1) for o in batch], axis=1))
    return np.concatenate(per_batch, axis=0)


def _real_positions(batches: list[list[np.ndarray]], masks: list[np.ndarray | None]) -> list[list[np.ndarray]]:
    """Per-token outputs ([batch, sequence, ...]) with the padded positions (mask 0) zeroed: what a model computes
    at padding is never used, and int8 may move it far without changing a real token's output."""
    def real(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if mask is None or mask.ndim != 2 or output.ndim < 3 or output.shape[:2] != mask.shape:
            return output
        return output * mask.reshape(mask.shape + (1,) * (output.ndim - 2)).astype(output.dtype)

    return [[real(o, mask) for o in batch] for batch, mask in zip(batches, masks, strict=True)]


def sentence_embeddings(batches: list[list[np.ndarray]], masks: list[np.ndarray | None] | None,
                        pooling: str) -> list[list[np.ndarray]]:
    """Each batch's first output [batch, sequence, hidden] pooled over its real tokens into [batch, hidden], the
    way sentence-transformers makes the embedding ("mean", "cls" or "max")."""
    pooled = []
    for index, batch in enumerate(batches):
        states = np.asarray(batch[0], np.float64)
        mask = masks[index] if masks is not None and masks[index] is not None else np.ones(states.shape[:2])
        real = (np.asarray(mask) != 0)[..., None]
        if pooling == "cls":
            pooled.append([states[:, 0]])
        elif pooling == "max":
            pooled.append([np.where(real, states, -np.inf).max(axis=1)])
        else:
            pooled.append([(states * real).sum(axis=1) / np.maximum(real.sum(axis=1), 1)])
    return pooled


def fidelity(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]],
             masks: list[np.ndarray | None] | None = None, pooling: str | None = None) -> dict[str, Any]:
    """Output cosine per sample (all outputs flattened), relative L2 and top-1 agreement; with `masks` (one
    attention mask per batch), padded positions of per-token outputs are left out. With `pooling`, what is compared
    is the sentence embedding pooled from the first output (sentence_embeddings), not the token states."""
    if pooling is not None:
        reference, candidate = sentence_embeddings(reference, masks, pooling), sentence_embeddings(candidate, masks,
                                                                                                  pooling)
        masks = None
    if masks is not None:
        reference, candidate = _real_positions(reference, masks), _real_positions(candidate, masks)
    ref, cand = _per_sample(reference), _per_sample(candidate)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.where(norms > 0, (ref * cand).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    rel_l2 = float(np.linalg.norm(ref - cand) / max(np.linalg.norm(ref), 1e-30))
    top1 = None
    if pooling is None and reference[0][0].ndim == 2 and reference[0][0].shape[1] > 1:  # looks like [batch, classes]
        agree = [np.mean(np.argmax(r[0], 1) == np.argmax(c[0], 1)) for r, c in zip(reference, candidate)]
        top1 = round(float(np.mean(agree)), 6)
    return {"cosine_mean": round(float(cosine.mean()), 6), "cosine_min": round(float(cosine.min()), 6),
            "rel_l2": round(rel_l2, 6), "top1_agreement": top1, "samples": int(ref.shape[0])}


def measure_file(path: Path, runtime: str, device: str, threads: int, feeds: list[list[np.ndarray]],
                 warmup: int, runs: int, check: Callable[[], None]) -> tuple[dict[str, Any], list[list[np.ndarray]]]:
    """Latency on the first batch and outputs on every batch, with the runtime the job targets (an
    encoder-decoder's pair of graphs runs as one model: worker.formats.onnx_pair)."""
    run = open_pair(path, device, threads) if is_pair(path) else open_runner(path, runtime, device, threads)
    outputs = []
    for batch in feeds:
        check()
        outputs.append(run(batch))
    return latency_ms(run, feeds[0], warmup, runs, check), outputs
