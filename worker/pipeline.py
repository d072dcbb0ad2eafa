"""Runs a recipe: load the model, measure the baseline, apply the steps in order, measure the result.

Baseline and compressed are measured by the same code, on the same generated inputs, in this process.
"""

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from app.config import Settings
from app.schemas.recipe import ExportStep, QuantizeStep, Recipe
from worker.compression.quantize import quantize_dynamic_int8
from worker.context import JobContext
from worker.evaluation import measure
from worker.evaluation.inputs import generate_feeds
from worker.formats import load_source

EVAL_BATCHES = 8


@dataclass
class PipelineResult:
    metrics: dict[str, Any]
    model_path: Path


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def run_pipeline(recipe: Recipe, model_path: Path, model_format: str, device: str, workdir: Path,
                 settings: Settings, ctx: JobContext) -> PipelineResult:
    ctx.progress(0.05, "load", f"loading {model_format} model")
    source = load_source(model_path, model_format, workdir, device)
    feeds = generate_feeds(source.inputs, batches=EVAL_BATCHES, seed=0)
    reference = [source.reference(batch) for batch in feeds]

    def evaluate(path: Path, label: str, fraction: float) -> dict[str, Any]:
        ctx.progress(fraction, "measure", f"measuring the {label} model")
        figures = measure.size_and_params(path)
        figures["latency_ms"] = measure.latency_ms(path, feeds[0], device, settings.eval_threads,
                                                   settings.latency_warmup, settings.latency_runs, ctx.check)
        figures["accuracy"] = None
        figures["fidelity"] = measure.fidelity(reference, measure.outputs(path, feeds, device,
                                                                          settings.eval_threads))
        return figures

    baseline = evaluate(source.onnx_path, "baseline", 0.15)
    current = source.onnx_path
    steps: list[dict[str, Any]] = []
    for index, step in enumerate(recipe.steps):
        ctx.progress(0.3 + 0.5 * index / len(recipe.steps), step.op, f"step {index + 1}/{len(recipe.steps)}: "
                                                                     f"{step.op}")
        started = time.perf_counter()
        record: dict[str, Any] = {"op": step.op}
        if isinstance(step, QuantizeStep):
            output = workdir / f"step{index}-quantize.onnx"
            record["details"] = quantize_dynamic_int8(current, output, step)
            current = output
        elif isinstance(step, ExportStep):
            record["details"] = {"formats": step.formats}
        record["seconds"] = round(time.perf_counter() - started, 3)
        record.update(measure.size_and_params(current))
        steps.append(record)
        ctx.check()

    compressed = evaluate(current, "compressed", 0.85)
    fidelity = compressed.pop("fidelity")
    export_fidelity = baseline.pop("fidelity")
    metrics = {
        "baseline": baseline,
        "compressed": compressed,
        "compression_ratio": _ratio(baseline["size_bytes"], compressed["size_bytes"]),
        "speedup": _ratio(baseline["latency_ms"]["p50"], compressed["latency_ms"]["p50"]),
        "fidelity": fidelity,
        "steps": steps,
        "source": {"format": model_format, "size_bytes": model_path.stat().st_size,
                   "baseline_is": "the fp32 ONNX form of the uploaded model" if model_format != "onnx"
                   else "the uploaded ONNX model",
                   "baseline_fidelity_to_original": export_fidelity},
        "evaluation": {"inputs": "generated", "batches": EVAL_BATCHES, "seed": 0,
                       "input_shapes": [list(a.shape) for a in feeds[0]],
                       "note": "no eval dataset given: fidelity is measured on seeded random inputs of the "
                               "model's input shapes, against the original model's own outputs"},
        "environment": {"device": device, "threads": settings.eval_threads, "runtime": "onnxruntime",
                        "onnxruntime": ort.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
    }
    return PipelineResult(metrics=metrics, model_path=current)
