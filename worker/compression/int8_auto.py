"""`quantize.method: "auto"`: int8 chosen by model family, then kept only if measurement agrees.

Convolutional nets run fastest as static QDQ (ONNX Runtime fuses the Conv chain into QLinearConv); dynamic int8
turns every Conv into ConvInteger plus a float rescale, 4-12x slower than fp32 on every CNN of
bench/cnn_int8_bench.py. Transformers and recurrent nets get dynamic int8 (their MatMuls quantized per row at run
time); a transformer whose dynamic int8 is faster than fp32 but under the line is tried next with the products that
cost its output most left in float ("dynamic_partial"). Each candidate is timed against the fp32 model on the job's
first eval batch (interleaved, so a busy machine slows both alike) and its outputs compared on all of them; the
next candidate is tried until one is faster than fp32 and faithful (output cosine >= FAITHFUL_COSINE). The last
candidate of every plan, "weights_int8", stores the weights in int8 and computes in float
(quantize.store_weights_int8): ONNX Runtime folds the decoding at load, so it runs as fast as fp32 from a file
about 4x smaller. It is kept when no int8 computation beats fp32 (small depthwise nets such as the OCR angle
classifier of issue 11, where the dequantize/quantize pairs cost more than the int8 convolutions save). If it is
not faithful either, the fastest faithful candidate is delivered (else the most faithful) with a warning.
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
# On generated inputs int8 error looks larger than on real data (all-MiniLM-L6-v2's dynamic int8: cosine 0.976 on
# random token ids, 0.992 on real sentences), so the line there is looser; the job's notes say such figures are weak.
GENERATED_FAITHFUL_COSINE = 0.95
RECURRENT_OPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}
CONV_OPS = {"Conv", "ConvTranspose"}
MATMUL_OPS = {"MatMul", "Gemm", "Attention", "MultiHeadAttention"}
# The candidates tried, in order, per family. "static_conv" quantizes the ops between convolutions too (QLinearConv
# chains) and leaves depthwise convolutions in float; "static_conv_depthwise" quantizes those too (tried whenever
# the net has some: on this VNNI CPU a plain MobileNet-style chain ran 1.66x fp32 with them in int8 against 1.35x,
# the OCR angle classifier 0.52x against 0.72x); "static" quantizes only the weight-bearing ops (on the OCR
# recognizer, whose attention layers follow the convolutions, it stayed faithful where static_conv did not).
PLANS = {"convolutional": ("static_conv", "static_conv_depthwise", "static", "dynamic", "weights_int8"),
         "transformer": ("dynamic", "dynamic_partial", "static", "weights_int8"),
         "recurrent": ("dynamic", "static", "weights_int8")}
# "dynamic_partial" is dynamic int8 with the products that cost the output most left in float
# (quantize.onnx_dynamic_int8_partial), tried only when plain dynamic int8 was faster than fp32 but under the line:
# on 300 sentences of real prose all-MiniLM-L6-v2's dynamic int8 measured output cosine 0.9896, its first layer's
# feed-forward output in float 0.9914 at 1.08x the size. Its scan scores each run on this many samples at most.
PARTIAL_SCAN_SAMPLES = 64
# "weights_int8" runs the fp32 graph once ONNX Runtime has folded its decoding, so its measured speedup is fp32
# against itself: on this shared 2-core machine such pairs measure 0.9-1.1x, and 0.73x in a busy spell. It counts
# as "not slower" above this, or when ONNX Runtime's optimized graph of it has the fp32 graph's ops (`folded`).
AT_PAR = 0.9
# Static int8 calibrated without data fits its activation ranges to generated inputs; real inputs can fall far
# outside them (bench/zoo.py: the OCR recognizer measured cosine 0.998 on generated inputs, 0.52 on real text lines).
GENERATED_CALIBRATION_WARNING = ("static int8 was calibrated on generated inputs (no calibration dataset): real "
                                 "inputs may fall outside the activation ranges it fixed, and its fidelity on them "
                                 "is unknown; give a calibration dataset of real inputs")
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
    folded: bool | None = None  # weights_int8: ONNX Runtime's optimized graph has the fp32 graph's ops
    smaller: bool | None = None  # its file is smaller than the fp32 model's
    error: str | None = None
    faithful_line: float = FAITHFUL_COSINE

    @property
    def faithful(self) -> bool:
        return self.cosine is not None and self.cosine >= self.faithful_line

    @property
    def good(self) -> bool:
        """Faster than fp32 and faithful: the search stops at the first such candidate."""
        return self.faithful and self.speedup is not None and self.speedup > 1.0

    def report(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "faithful_line"}


def decide(candidates: list[Candidate]) -> tuple[int, str, str | None]:
    """The candidate to keep among those measured: (index, why, warning or None). Faster than fp32 and faithful
    first (the fastest such); else int8 weight storage when faithful and at par with fp32 (AT_PAR); else the
    fastest faithful one, said loudly; else the most faithful one, said loudly. Raises ValueError when no
    candidate was measured."""
    measured = [i for i, c in enumerate(candidates) if c.error is None]
    if not measured:
        raise ValueError("no candidate could be measured")
    # a file no smaller than fp32's is no compression: such candidates count only when every one is
    measured = [i for i in measured if candidates[i].smaller is not False] or measured
    good = [i for i in measured if candidates[i].good]
    if good:
        best = max(good, key=lambda i: candidates[i].speedup)
        return best, f"{candidates[best].name}: faster than fp32 and faithful", None
    faithful = [i for i in measured if candidates[i].faithful]
    storage = [i for i in faithful if candidates[i].name == "weights_int8"
               and (candidates[i].folded or candidates[i].speedup >= AT_PAR)]
    if storage:
        kept = candidates[storage[0]]
        how = "the fp32 graph once ONNX Runtime folds the decoding, " if kept.folded else ""
        return storage[0], (f"{kept.name}: no int8 computation is faster than fp32 here; int8 weights with float "
                            f"compute run at fp32 speed ({how}measured {kept.speedup:.2f}x) from a smaller "
                            "file"), None
    if faithful:
        best = max(faithful, key=lambda i: candidates[i].speedup)
        kept = candidates[best]
        return best, f"{kept.name}: the fastest faithful candidate", (
            f"no int8 candidate is faster than fp32 on this CPU: delivering {kept.name} int8 at "
            f"{kept.speedup:.2f}x the speed of fp32 (output cosine {kept.cosine:.4f}); it is smaller, not faster")
    best = max(measured, key=lambda i: candidates[i].cosine)
    kept = candidates[best]
    return best, f"{kept.name}: the most faithful candidate", (
        f"no int8 candidate keeps output cosine >= {kept.faithful_line}: delivering {kept.name} int8 at output "
        f"cosine {kept.cosine:.4f} and {kept.speedup:.2f}x the speed of fp32")


def _worth_partial(candidates: list[Candidate]) -> bool:
    """Plain dynamic int8 was measured faster than fp32 but under the faithful line."""
    dynamic = next((c for c in candidates if c.name == "dynamic"), None)
    return bool(dynamic and dynamic.error is None and not dynamic.faithful and dynamic.speedup
                and dynamic.speedup > 1.0)


def _scan_batches(batches: list[list[np.ndarray]]) -> int:
    """How many of the eval batches hold the first PARTIAL_SCAN_SAMPLES samples (one at least)."""
    seen = 0
    for index, batch in enumerate(batches):
        seen += batch[0].shape[0]
        if seen >= PARTIAL_SCAN_SAMPLES:
            return index + 1
    return len(batches)


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


def loaded_ops(path: Path, folder: Path) -> list[str]:
    """The op types of the graph ONNX Runtime runs for `path` (its optimized graph, layout rewrites aside)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / f"{path.stem}.loaded.onnx")
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return sorted(n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False)
                      .graph.node)
    finally:
        Path(options.optimized_model_filepath).unlink(missing_ok=True)


def outputs_of(path: Path, batches: list[list[np.ndarray]], threads: int) -> list[list[np.ndarray]]:
    run = open_runner(path, "onnxruntime", "cpu", threads)
    return [run(batch) for batch in batches]


def _quantize(name: str, source: Path, destination: Path, *, granularity: str, exclude: list[str],
              calibration_method: str, calibration: list[list[np.ndarray]],
              score: Callable[[Path, bool], float], line: float) -> dict:
    if name == "dynamic":
        return quantize.onnx_dynamic_int8(source, destination, granularity=granularity, exclude=exclude)
    if name == "dynamic_partial":
        return quantize.onnx_dynamic_int8_partial(source, destination, granularity=granularity, exclude=exclude,
                                                  score=score, line=line)
    if name == "weights_int8":
        return quantize.onnx_weights_int8(source, destination, exclude=exclude)
    return quantize.onnx_static_int8(source, destination, granularity=granularity, exclude=exclude,
                                     calibration_method=calibration_method, calibration=calibration,
                                     convolutional=name.startswith("static_conv"),
                                     depthwise_in_float=name != "static_conv_depthwise")


def auto_int8(source: Path, destination: Path, *, granularity: str, exclude: list[str], calibration_method: str,
              calibration: list[list[np.ndarray]] | None, eval_batches: list[list[np.ndarray]], eval_inputs: str,
              threads: int, warmup: int, runs: int, check: Callable[[], None] = lambda: None,
              eval_masks: list[np.ndarray] | None = None, eval_pooling: str | None = None) -> dict:
    """int8 by family and measurement (module docstring). `calibration` is the calibration dataset's batches, or
    None to calibrate on `eval_batches` (described by `eval_inputs`, e.g. "generated"); `eval_masks` leave padded
    token positions out of the cosine, as the job's own fidelity does (counted, they pushed every int8 candidate of
    all-MiniLM-L6-v2 under the faithful line); `eval_pooling` judges a sentence encoder on its sentence embedding
(measure.sentence_embeddings), as the job does. `check` is called before each candidate, so a cancel is noticed."""
    family, counts = model_family(source)
    plan = PLANS[family]
    line = GENERATED_FAITHFUL_COSINE if eval_inputs == "generated" else FAITHFUL_COSINE
    if calibration:
        calibrated_on = {"data": "calibration dataset", "samples": int(sum(b[0].shape[0] for b in calibration))}
    else:
        calibrated_on = {"data": f"the job's evaluation inputs ({eval_inputs})",
                         "samples": int(sum(b[0].shape[0] for b in eval_batches))}
    reference = outputs_of(source, eval_batches, threads)
    scan = _scan_batches(eval_batches)

    def score(path: Path, every_batch: bool) -> float:
        check()
        batches = eval_batches if every_batch else eval_batches[:scan]
        masks = None if eval_masks is None else eval_masks[:len(batches)]
        return round(fidelity(reference[:len(batches)], outputs_of(path, batches, threads), masks,
                              eval_pooling)["cosine_mean"], 6)

    candidates: list[Candidate] = []
    results: dict[str, tuple[Path, dict]] = {}
    failures: list[JobFailure] = []
    has_depthwise = bool(quantize.float_convolutions(source)["depthwise_convolutions"])
    for name in plan:
        if name == "static_conv_depthwise" and not has_depthwise:
            continue
        if name == "dynamic_partial" and not _worth_partial(candidates):
            continue
        check()
        path = destination.with_suffix(f".{name}.onnx")
        candidate = Candidate(name, faithful_line=line)
        candidates.append(candidate)
        try:
            details = _quantize(name, source, path, granularity=granularity, exclude=exclude,
                                calibration_method=calibration_method, calibration=calibration or eval_batches,
                                score=score, line=line)
            outputs = outputs_of(path, eval_batches, threads)
            candidate.cosine = round(fidelity(reference, outputs, eval_masks, eval_pooling)["cosine_mean"], 6)
            fp32_ms, candidate_ms = paired_latency(source, path, eval_batches[0], threads, warmup, runs)
            if name == "weights_int8":
                candidate.folded = loaded_ops(path, path.parent) == loaded_ops(source, path.parent)
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
        candidate.smaller = candidate.size_bytes < source.stat().st_size
        results[name] = (path, details)
        if candidate.good and not (name == "static_conv" and has_depthwise):
            break
    if not results:
        raise failures[0] if failures else JobFailure(
            ErrorCode.QUANTIZATION_FAILED, "int8 (auto): no quantized candidate runs on this model")
    index, reason, warning = decide(candidates)
    kept = candidates[index]
    for name, (path, _) in results.items():
        if name != kept.name or not kept.smaller:
            path.unlink(missing_ok=True)
    if not kept.smaller:  # bench/zoo.py: Silero VAD, its weights inside If branches, came out 1.43x larger
        shutil.copyfile(source, destination)
        return {"method": "auto", "chosen_method": None, "family": family, "family_op_counts": counts,
                "candidates": [c.report() for c in candidates], "kept": "fp32",
                "reason": "no int8 candidate is smaller than the fp32 model",
                "warning": "int8 found nothing it could make smaller in this model (every candidate's file was at "
                           "least as large as the original's): the model is delivered in fp32"}
    path, details = results[kept.name]
    shutil.move(path, destination)
    report = {"method": "auto", "chosen_method": details["method"], "family": family, "family_op_counts": counts,
              "calibrated_on": calibrated_on if details["method"] == "static" else None,
              "candidates": [c.report() for c in candidates], "kept": kept.name, "reason": reason,
              "faithful_cosine": line, "chosen": details}
    if details["method"] == "static" and not calibration:
        warning = " ".join(filter(None, [warning, GENERATED_CALIBRATION_WARNING]))
    if warning:
        report["warning"] = warning
    return report
