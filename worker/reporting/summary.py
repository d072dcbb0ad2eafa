"""What the model card and the HTML report both say, read from a job's metrics: the results before and after, the
model after each measured step, the recipe in a line, and the numbers written for people. Plain text here: each
document escapes it for its own format."""

import math
import re
from dataclasses import dataclass, field
from typing import Any

# What a step's line shows of its settings, in this order (the rest, e.g. exclude patterns, is in the provenance).
STEP_SETTINGS = ("method", "dtype", "granularity", "group_size", "algorithm", "smoothing", "sparsity", "threshold",
                 "pattern", "scope", "epochs", "formats")
NAMED_SETTINGS = {"group_size", "smoothing", "sparsity", "threshold", "epochs"}  # shown as `sparsity 0.5`
LATENCY_SPREAD = ("p50", "p95", "min", "max", "mean", "stdev")  # over the repeated timed runs of one model
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass
class Subject:
    """What the documents are about: the tenant's model (its name is hostile input) and the files delivered."""

    model_name: str
    job_id: str | None
    model_id: str | None
    model_file: str  # the model artifact's download name
    model_format: str  # onnx, pt2, onnx-seq2seq
    encoding: str | None = None  # "gzip" when the model file is delivered gzip-compressed
    other_files: list[str] = field(default_factory=list)


def plain(text: Any) -> str:
    """One line of text: control characters (newlines included) become spaces."""
    return CONTROL.sub(" ", str(text))


def size_text(size: float | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def number(value: Any, digits: int = 4) -> str:
    if value is None or isinstance(value, bool):
        return "-"
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.{digits}g}"
    return plain(value)


def times(ratio: Any, better: str, worse: str) -> str:
    """A ratio as people say it: `3.9x smaller`; below 1 the other way round: `1.3x larger`."""
    if not isinstance(ratio, (int, float)) or ratio <= 0:
        return "-"
    return f"{ratio:.3g}x {better}" if ratio >= 1 else f"{1 / ratio:.3g}x {worse}"


def step_line(step: dict[str, Any]) -> str:
    """`quantize (dynamic, int8, per_channel)`, `prune (magnitude, sparsity 0.5, layer)`."""
    settings = []
    for name in STEP_SETTINGS:
        value = step.get(name)
        if value is None or value is False or value == []:
            continue
        if isinstance(value, list):
            settings.append(", ".join(map(str, value)))
        else:
            settings.append(f"{name} {value}" if name in NAMED_SETTINGS else str(value))
    student = step.get("student")
    if isinstance(student, dict):
        settings.append("student: the model as the steps before left it" if student.get("current") else
                        "student: a shrunk copy" if student.get("shrink") else "student: an uploaded model")
    return plain(str(step.get("op", "?")) + (f" ({', '.join(settings)})" if settings else ""))


def recipe_line(recipe: dict[str, Any] | None) -> str:
    steps = (recipe or {}).get("steps") or []
    return " then ".join(step_line(step) for step in steps if isinstance(step, dict)) or "no steps"


def cosine_name(fidelity: dict[str, Any] | None) -> str:
    """What the cosine compares: a sentence encoder's embedding (worker.pipeline.job_run), else the outputs."""
    judged = (fidelity or {}).get("on")
    return "sentence-embedding cosine" if isinstance(judged, str) and judged.startswith("sentence") else "output cosine"


def fidelity_of(figures: dict[str, Any] | None) -> float | None:
    value = (figures or {}).get("cosine_mean")
    return value if isinstance(value, (int, float)) else None


@dataclass
class Point:
    """The model at one moment of the job: the original, after a measured step, or as delivered."""

    label: str
    size_bytes: float | None
    latency: dict[str, Any]
    fidelity: float | None
    accuracy: float | None


def points(metrics: dict[str, Any]) -> list[Point]:
    """The original, each step that was measured after it changed the model, and the delivered model."""
    baseline, compressed = metrics.get("baseline") or {}, metrics.get("compressed") or {}
    original = (metrics.get("source") or {}).get("baseline_fidelity_to_original")
    found = [Point("original", baseline.get("size_bytes"), baseline.get("latency_ms") or {},
                   fidelity_of(original) if original else 1.0, baseline.get("accuracy"))]
    for index, step in enumerate(metrics.get("steps") or []):
        if isinstance(step, dict) and "size_bytes" in step and "latency_ms" in step:
            found.append(Point(f"{index + 1}. {plain(step.get('op', '?'))}", step["size_bytes"], step["latency_ms"],
                               fidelity_of(step.get("fidelity")), step.get("accuracy")))
    found.append(Point("delivered", compressed.get("size_bytes"), compressed.get("latency_ms") or {},
                       fidelity_of(metrics.get("fidelity")), compressed.get("accuracy")))
    return found


def _params(figures: dict[str, Any]) -> str:
    params, nonzero = figures.get("params"), figures.get("nonzero_params")
    if not isinstance(params, int) or not isinstance(nonzero, int):
        return "-"
    return f"{params:,} ({nonzero:,})"


def result_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, original, compressed, change) for the results table."""
    baseline, compressed = metrics.get("baseline") or {}, metrics.get("compressed") or {}
    fidelity = metrics.get("fidelity") or {}
    before_ms, after_ms = baseline.get("latency_ms") or {}, compressed.get("latency_ms") or {}
    rows = [("size", size_text(baseline.get("size_bytes")), size_text(compressed.get("size_bytes")),
             times(metrics.get("compression_ratio"), "smaller", "larger")),
            ("parameters (nonzero)", _params(baseline), _params(compressed), ""),
            ("latency p50 (ms)", number(before_ms.get("p50")), number(after_ms.get("p50")),
             times(metrics.get("speedup"), "faster", "slower")),
            ("latency p95 (ms)", number(before_ms.get("p95")), number(after_ms.get("p95")), ""),
            ("latency min-max (ms)", f"{number(before_ms.get('min'))}-{number(before_ms.get('max'))}",
             f"{number(after_ms.get('min'))}-{number(after_ms.get('max'))}", ""),
            (f"{cosine_name(fidelity)} to the original (mean)", "1", number(fidelity.get("cosine_mean")), ""),
            (f"{cosine_name(fidelity)} (worst sample)", "1", number(fidelity.get("cosine_min")), "")]
    if fidelity.get("token_cosine_mean") is not None:
        rows.append(("token-state cosine (mean)", "1", number(fidelity["token_cosine_mean"]), ""))
    if fidelity.get("top1_agreement") is not None:
        rows.append(("top-1 agreement", "1", number(fidelity["top1_agreement"]), ""))
    if baseline.get("accuracy") is not None or compressed.get("accuracy") is not None:
        rows.append(("accuracy", number(baseline.get("accuracy")), number(compressed.get("accuracy")), ""))
    if baseline.get("perplexity") is not None:
        rows.append(("perplexity (lower is better)", number(baseline.get("perplexity")),
                     number(compressed.get("perplexity")), ""))
    return rows


def tolerance_line(tuning: dict[str, Any]) -> float | None:
    """The worst metric a trial may have and still meet the tolerance (worker.pipeline.tuning.loss)."""
    base, max_loss = tuning.get("baseline_metric"), tuning.get("max_loss")
    if not isinstance(base, (int, float)) or not isinstance(max_loss, (int, float)):
        return None
    allowed = max_loss * max(abs(base), 1e-12)
    return base + allowed if tuning.get("metric") == "perplexity" else base - allowed


def chosen_recipe(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe that made the delivered model: a tuned job's best trial's, else the job's own."""
    recipe = (metrics.get("provenance") or {}).get("recipe") or metrics.get("recipe")
    return recipe if isinstance(recipe, dict) else None
