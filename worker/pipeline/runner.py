"""Runs a job on local files: load the model, measure the baseline, apply the recipe (or tune one), package the
result and report what was gained and lost.

The model travels through the steps in torch form (pruning, training, pytorch-target quantization) for .pt2
and Hugging Face uploads, and in ONNX form once an ONNX Runtime quantizer ran or when the upload was ONNX.
Baseline, every step and the result are measured by the same code, on the same inputs, with the target
runtime. Every delivered file is loaded back and run before the job succeeds; the report carries its provenance,
and a model card and an HTML report go with the model (worker.reporting). Nothing here touches the database or
the artifact store (worker.staging does, before and after).
"""

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from app.core.config import Settings
from worker import reporting
from worker.context import JobContext
from worker.pipeline import exports, floor, provenance, trials
from worker.pipeline.apply import Applied, apply_recipe
from worker.pipeline.files import Output, StagedJob, download_stem
from worker.pipeline.job_run import JobRun
from worker.reporting.summary import Subject


@dataclass
class PipelineResult:
    metrics: dict[str, Any]
    outputs: list[Output] = field(default_factory=list)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def run_pipeline(staged: StagedJob, workdir: Path, settings: Settings, ctx: JobContext,
                 deadline: float | None = None) -> PipelineResult:
    run = JobRun(staged, workdir, settings, ctx, deadline)
    ctx.progress(0.15, "measure", "measuring the baseline")
    original = run.original()
    baseline, baseline_outputs = run.evaluate(run.write(original, workdir / "baseline"), original)
    baseline_fidelity = run.fidelity(baseline_outputs)

    tuning_report = None
    if staged.tune is not None:
        applied, tuning_report = trials.tune(run, staged.tune, baseline, baseline_fidelity["cosine_mean"])
    else:
        applied = apply_recipe(run, staged.recipe, original, workdir, measure_steps=True)

    ctx.progress(0.9, "package", "packaging the compressed model")
    compressed = dict(applied.figures)
    delivered, encoding = exports.encode(applied.path, compressed)
    compressed.update(encoding)
    main = Output("model", run.artifact_format, delivered,
                  f"compressed.{run.extension}" + (".gz" if delivered != applied.path else ""))
    extra, layouts = exports.export_formats(run, applied.state, applied.exports, applied.path.parent)
    metrics = _report(run, baseline, baseline_fidelity, compressed, applied, tuning_report)
    layouts = {**applied.snapshot_layouts, **layouts}
    if layouts:
        metrics["exports"] = layouts
    metrics["provenance"] = provenance.collect(run, baseline, compressed, metrics.get("recipe") or staged.recipe)
    ctx.progress(0.93, "package", "writing the model card and the HTML report")
    stem = download_stem(staged.model_name)
    subject = Subject(model_name=staged.model_name, job_id=staged.job_id, model_id=staged.model_id,
                      model_file=f"{stem}-{main.filename}", model_format=main.format,
                      encoding=compressed.get("encoding"),
                      other_files=[f"{stem}-{o.filename}" for o in [*applied.snapshots, *extra]])
    documents = reporting.write_documents(metrics, subject, workdir / "documents")
    return PipelineResult(metrics=metrics, outputs=[main, *applied.snapshots, *extra, *documents])


def _report(run: JobRun, baseline: dict[str, Any], baseline_fidelity: dict[str, Any], compressed: dict[str, Any],
            applied: Applied, tuning_report: dict | None) -> dict[str, Any]:
    """The job's metrics: baseline and result measured alike, per-step records, and how they were measured."""
    staged = run.staged
    metrics = {
        "baseline": baseline,
        "compressed": compressed,
        "compression_ratio": _ratio(baseline["size_bytes"], compressed["size_bytes"]),
        "speedup": _ratio(baseline["latency_ms"]["p50"], compressed["latency_ms"]["p50"]),
        "fidelity": run.fidelity(applied.outputs),
        "steps": applied.steps,
        "source": {"format": staged.model_format, "size_bytes": staged.model_path.stat().st_size,
                   "baseline_is": f"the uploaded model as {run.extension} for {run.runtime}",
                   "baseline_fidelity_to_original": baseline_fidelity},
        "evaluation": run.data.description,
        "environment": {"device": run.device, "threads": run.settings.eval_threads, "runtime": run.runtime,
                        "onnxruntime": ort.__version__, "torch": torch.__version__,
                        "python": platform.python_version(), "machine": platform.machine()},
    }
    metrics.update(applied.reported)
    if tuning_report is not None:
        metrics["tuning"] = tuning_report
        metrics["recipe"] = tuning_report["trials"][tuning_report["best"]]["recipe"]
    notes = [step["details"]["warning"] for step in applied.steps
             if isinstance(step.get("details"), dict) and step["details"].get("warning")]
    smaller = metrics["compression_ratio"] > 1
    if not smaller:
        notes.append(f"the compressed model is not smaller than the baseline ({compressed['size_bytes']} bytes "
                     f"against {baseline['size_bytes']}): the recipe found little in this model to compress")
    if metrics["speedup"] < 1:
        notes.append(f"the compressed model is slower than the baseline on this device ({run.device}, "
                     f"{run.runtime}): " + ("it is smaller, not faster" if smaller else "neither smaller nor faster"))
    if run.data.description.get("inputs") == "generated":
        notes.append("fidelity was measured on generated inputs (no eval dataset): a compressed model can agree with "
                     "the original on random inputs and still fail on real ones; give an eval dataset of real "
                     "inputs to know what was lost")
    metrics["fidelity_floor"] = floor.judge(metrics, staged.min_fidelity)
    if not metrics["fidelity_floor"]["passed"]:
        metrics["degraded"] = True
        notes.append(metrics["fidelity_floor"]["message"] + (
            " (accepted: accept_degraded)" if staged.accept_degraded else ""))
    if notes:
        metrics["notes"] = notes
    return metrics
