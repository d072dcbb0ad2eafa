"""`quantize.method: "auto"`: int8 chosen by model family, then kept only if measurement agrees.

Convolutional nets run fastest as static QDQ (ONNX Runtime fuses the Conv chain into QLinearConv); dynamic int8
turns every Conv into ConvInteger plus a float rescale, 4-12x slower than fp32 on every CNN of
bench/cnn_int8_bench.py. Transformers and recurrent nets get dynamic int8 (their MatMuls quantized per row at run
time). Each candidate is timed against the fp32 model on the job's first eval batch (interleaved, so a busy
machine slows both alike) and its outputs compared on all of them; the next candidate is tried until one is
faster than fp32 and faithful (output cosine >= FAITHFUL_COSINE). If none is, the fastest faithful one is
delivered (else the most faithful) with a warning.
"""

import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from app.core.errors import ErrorCode
from worker.compression import quantize
from worker.errors import JobFailure
from worker.evaluation.measure import fidelity
from worker.runtime import open_runner

FAITHFUL_COSINE = 0.99
RECURRENT_OPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}
CONV_OPS = {"Conv", "ConvTranspose"}
MATMUL_OPS = {"MatMul", "Gemm", "Attention", "MultiHeadAttention"}
# The candidates tried, in order, per family. "static_conv" quantizes the ops between convolutions too (QLinearConv
# chains) and leaves depthwise convolutions in float; "static_conv_depthwise" quantizes those too (tried whenever
# the net has some: on this VNNI CPU a plain MobileNet-style chain ran 1.66x fp32 with them in int8 against 1.35x,
# the OCR angle classifier 0.52x against 0.72x); "static" quantizes only the weight-bearing ops (on the OCR
# recognizer, whose attention layers follow the convolutions, it stayed faithful where static_conv did not).
PLANS = {"convolutional": ("static_conv", "static_conv_depthwise", "static", "dynamic"),
         "transformer": ("dynamic", "static"),
         "recurrent": ("dynamic", "static")}
# Latency is measured in this many rounds, fp32 and candidate alternating.
ROUNDS = 5


def model_family(model_path: Path) -> tuple[str, dict]:
    """("recurrent" | "convolutional" | "transformer", the op counts that decided it)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    counts = {"recurrent": sum(ops[o] for o in RECURRENT_OPS), "convolution": sum(ops[o] for o in CONV_OPS),
              "matmul": sum(ops[o] for o in MATMUL_OPS)}
    if counts["recurrent"]:
        return "recurrent", counts
    if counts["convolution"] and counts["convolution"] >= counts["matmul"]:
        return "convolutional", counts
    return "transformer", counts


@dataclass
class Candidate:
    name: str
    speedup: float | None = None  # fp32 latency / candidate latency, measured side by side
    cosine: float | None = None
    latency_ms: float | None = None
    fp32_latency_ms: float | None = None
    size_bytes: int | None = None
    error: str | None = None

    @property
    def faithful(self) -> bool:
        return self.cosine is not None and self.cosine >= FAITHFUL_COSINE

    @property
    def good(self) -> bool:
        """Faster than fp32 and faithful: the search stops at the first such candidate."""
        return self.faithful and self.speedup is not None and self.speedup > 1.0

    def report(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def decide(candidates: list[Candidate]) -> tuple[int, str, str | None]:
    """The candidate to keep among those measured: (index, why, warning or None). Faster than fp32 and faithful
    first (the fastest such); else the fastest faithful one, said loudly; else the most faithful one, said
    loudly. Raises ValueError when no candidate was measured."""
    measured = [i for i, c in enumerate(candidates) if c.error is None]
    if not measured:
        raise ValueError("no candidate could be measured")
    good = [i for i in measured if candidates[i].good]
    if good:
        best = max(good, key=lambda i: candidates[i].speedup)
        return best, f"{candidates[best].name}: faster than fp32 and faithful", None
    faithful = [i for i in measured if candidates[i].faithful]
    if faithful:
        best = max(faithful, key=lambda i: candidates[i].speedup)
        kept = candidates[best]
        return best, f"{kept.name}: the fastest faithful candidate", (
            f"no int8 candidate is faster than fp32 on this CPU: delivering {kept.name} int8 at "
            f"{kept.speedup:.2f}x the speed of fp32 (output cosine {kept.cosine:.4f}); it is smaller, not faster")
    best = max(measured, key=lambda i: candidates[i].cosine)
    kept = candidates[best]
    return best, f"{kept.name}: the most faithful candidate", (
        f"no int8 candidate keeps output cosine >= {FAITHFUL_COSINE}: delivering {kept.name} int8 at output "
        f"cosine {kept.cosine:.4f} and {kept.speedup:.2f}x the speed of fp32")


def paired_latency(fp32_path: Path, candidate_path: Path, feeds: list[np.ndarray], threads: int, warmup: int,
                   runs: int) -> tuple[float, float]:
    """Median ms of fp32 and candidate on one batch, timed in alternating rounds."""
    runners = [open_runner(p, "onnxruntime", "cpu", threads) for p in (fp32_path, candidate_path)]
    for run in runners:
        for _ in range(warmup):
            run(feeds)
    times: list[list[float]] = [[], []]
    per_round = max(1, runs // ROUNDS)
    for _ in range(ROUNDS):
        for run, bucket in zip(runners, times):
            for _ in range(per_round):
                start = time.perf_counter()
                run(feeds)
                bucket.append((time.perf_counter() - start) * 1000)
    return float(np.median(times[0])), float(np.median(times[1]))


def outputs_of(path: Path, batches: list[list[np.ndarray]], threads: int) -> list[list[np.ndarray]]:
    run = open_runner(path, "onnxruntime", "cpu", threads)
    return [run(batch) for batch in batches]


def _quantize(name: str, source: Path, destination: Path, *, granularity: str, exclude: list[str],
              calibration_method: str, calibration: list[list[np.ndarray]]) -> dict:
    if name == "dynamic":
        return quantize.onnx_dynamic_int8(source, destination, granularity=granularity, exclude=exclude)
    return quantize.onnx_static_int8(source, destination, granularity=granularity, exclude=exclude,
                                     calibration_method=calibration_method, calibration=calibration,
                                     convolutional=name.startswith("static_conv"),
                                     depthwise_in_float=name != "static_conv_depthwise")


def auto_int8(source: Path, destination: Path, *, granularity: str, exclude: list[str], calibration_method: str,
              calibration: list[list[np.ndarray]] | None, eval_batches: list[list[np.ndarray]], eval_inputs: str,
              threads: int, warmup: int, runs: int, check: Callable[[], None] = lambda: None) -> dict:
    """int8 by family and measurement (module docstring). `calibration` is the calibration dataset's batches, or
    None to calibrate on `eval_batches` (described by `eval_inputs`, e.g. "generated"). `check` is called before
    each candidate, so a cancel is noticed."""
    family, counts = model_family(source)
    plan = PLANS[family]
    if calibration:
        calibrated_on = {"data": "calibration dataset", "samples": int(sum(b[0].shape[0] for b in calibration))}
    else:
        calibrated_on = {"data": f"the job's evaluation inputs ({eval_inputs})",
                         "samples": int(sum(b[0].shape[0] for b in eval_batches))}
    reference = outputs_of(source, eval_batches, threads)
    candidates: list[Candidate] = []
    results: dict[str, tuple[Path, dict]] = {}
    failures: list[JobFailure] = []
    has_depthwise = bool(quantize.float_convolutions(source)["depthwise_convolutions"])
    for name in plan:
        if name == "static_conv_depthwise" and not has_depthwise:
            continue
        check()
        path = destination.with_suffix(f".{name}.onnx")
        candidate = Candidate(name)
        candidates.append(candidate)
        try:
            details = _quantize(name, source, path, granularity=granularity, exclude=exclude,
                                calibration_method=calibration_method, calibration=calibration or eval_batches)
            candidate.cosine = round(fidelity(reference, outputs_of(path, eval_batches, threads))["cosine_mean"], 6)
            fp32_ms, candidate_ms = paired_latency(source, path, eval_batches[0], threads, warmup, runs)
        except JobFailure as exc:
            candidate.error, candidate.cosine = exc.message, None
            failures.append(exc)
            path.unlink(missing_ok=True)
            continue
        except Exception as exc:  # the quantized graph does not run: that candidate is out
            candidate.error, candidate.cosine = f"the quantized model does not run ({exc.__class__.__name__})", None
            path.unlink(missing_ok=True)
            continue
        candidate.latency_ms, candidate.fp32_latency_ms = round(candidate_ms, 4), round(fp32_ms, 4)
        candidate.speedup = round(fp32_ms / candidate_ms, 4)
        candidate.size_bytes = path.stat().st_size
        results[name] = (path, details)
        if candidate.good and not (name == "static_conv" and has_depthwise):
            break
    if not results:
        raise failures[0] if failures else JobFailure(
            ErrorCode.QUANTIZATION_FAILED, "int8 (auto): no quantized candidate runs on this model")
    index, reason, warning = decide(candidates)
    kept = candidates[index]
    for name, (path, _) in results.items():
        if name != kept.name:
            path.unlink(missing_ok=True)
    path, details = results[kept.name]
    shutil.move(path, destination)
    report = {"method": "auto", "chosen_method": details["method"], "family": family, "family_op_counts": counts,
              "calibrated_on": calibrated_on if details["method"] == "static" else None,
              "candidates": [c.report() for c in candidates], "kept": kept.name, "reason": reason,
              "faithful_cosine": FAITHFUL_COSINE, "chosen": details}
    if warning:
        report["warning"] = warning
    return report
