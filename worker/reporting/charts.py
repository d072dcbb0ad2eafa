"""The HTML report's charts, drawn with matplotlib and written as inline SVG: text as paths (no font files), no
metadata, no namespace URLs, ids prefixed per chart so several charts share a page.

Labels are this module's own words, step ops and trial numbers: nothing a tenant typed reaches matplotlib (and
its mathtext parser is off all the same).
"""

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from worker.reporting.summary import Point

STYLE = {"svg.fonttype": "path", "svg.hashsalt": "modelpress", "text.parse_math": False, "font.size": 9,
         "axes.spines.top": False, "axes.spines.right": False}
NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}
BLUE, ORANGE, GREEN, GREY, RED = "#1f77b4", "#ff7f0e", "#2ca02c", "#888888", "#d62728"
_charts = count(1)


@contextmanager
def _figure(width: float = 6.4, height: float = 3.0) -> Iterator[Figure]:
    with matplotlib.rc_context(STYLE):
        yield Figure(figsize=(width, height), layout="constrained")


def _svg(figure: Figure) -> str:
    """The figure as an <svg> element for an HTML page."""
    with matplotlib.rc_context(STYLE):
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata=NO_METADATA)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg)
    prefix = f"c{next(_charts)}-"
    svg = re.sub(r'(\bid="|url\(#|href="#)', lambda m: m.group(1) + prefix, svg)
    return svg.replace("<svg", '<svg role="img"', 1)


def _scaled_sizes(values: list[float | None]) -> tuple[list[float], str]:
    top = max((v for v in values if v is not None), default=0)
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if top >= s), ("bytes", 1))
    return [(v or 0) / scale for v in values], unit


def size_chart(points: list[Point]) -> str:
    sizes, unit = _scaled_sizes([p.size_bytes for p in points])
    with _figure() as figure:
        axes = figure.add_subplot()
        colours = [GREY] + [BLUE] * (len(points) - 2) + [GREEN]
        bars = axes.bar([p.label for p in points], sizes, color=colours[:len(points)])
        axes.bar_label(bars, labels=[f"{s:.3g}" for s in sizes], fontsize=8)
        axes.set_ylabel(f"file size ({unit})")
        axes.set_title("Size: the original, after each measured step, delivered")
        axes.tick_params(axis="x", labelrotation=20)
        return _svg(figure)


def _ms(latency: dict[str, Any], name: str, default: float) -> float:
    value = latency.get(name)
    return float(value) if isinstance(value, (int, float)) else default


def latency_chart(points: list[Point]) -> str:
    """p50 bars; whiskers from the fastest run to p95 (the spread over the repeated runs)."""
    p50 = [_ms(p.latency, "p50", 0.0) for p in points]
    low = [max(0.0, m - _ms(p.latency, "min", m)) for m, p in zip(p50, points)]
    high = [max(0.0, _ms(p.latency, "p95", m) - m) for m, p in zip(p50, points)]
    with _figure() as figure:
        axes = figure.add_subplot()
        colours = [GREY] + [BLUE] * (len(points) - 2) + [GREEN]
        bars = axes.bar([p.label for p in points], p50, yerr=[low, high], capsize=4, color=colours[:len(points)],
                        error_kw={"ecolor": "#333333", "elinewidth": 1})
        axes.bar_label(bars, labels=[f"{v:.3g}" for v in p50], fontsize=8, padding=2, label_type="center")
        axes.set_ylabel("latency per batch (ms)")
        axes.set_title("Latency: p50 (bars), fastest run to p95 (whiskers)")
        axes.tick_params(axis="x", labelrotation=20)
        return _svg(figure)


def fidelity_chart(points: list[Point]) -> str:
    """Output cosine to the original (and accuracy, when labelled eval data gave one) at each point."""
    labels = [p.label for p in points]
    with _figure() as figure:
        axes = figure.add_subplot()
        cosines = [(i, p.fidelity) for i, p in enumerate(points) if p.fidelity is not None]
        if cosines:
            axes.plot([i for i, _ in cosines], [c for _, c in cosines], marker="o", color=BLUE,
                      label="output cosine to the original (mean)")
        accuracies = [(i, p.accuracy) for i, p in enumerate(points) if p.accuracy is not None]
        if accuracies:
            axes.plot([i for i, _ in accuracies], [a for _, a in accuracies], marker="s", color=ORANGE,
                      label="accuracy")
        axes.set_xticks(range(len(labels)), labels, rotation=20)
        axes.set_ylabel("higher is better")
        axes.set_title("Fidelity: the original, after each measured step, delivered")
        axes.grid(axis="y", alpha=0.3)
        if cosines or accuracies:
            axes.legend(loc="lower left", fontsize=8)
        return _svg(figure)


def trials_chart(tuning: dict[str, Any], axis: str, tolerance: float | None) -> str:
    """Every finished trial by `axis` (size_bytes or latency_ms) against its metric: within the tolerance or not,
    the Pareto front (on the objective's axis), the tolerance and the baseline lines, and the chosen trial."""
    trials = tuning.get("trials") or []
    done = [(i, t) for i, t in enumerate(trials) if t.get("error") is None and t.get("metric") is not None]
    xs = [t[axis] for _, t in done]
    if axis == "size_bytes":
        xs, unit = _scaled_sizes(xs)
        xlabel = f"file size ({unit})"
    else:
        xlabel = "latency p50 (ms)"
    position = {i: (x, t["metric"]) for (i, t), x in zip(done, xs)}
    metric = str(tuning.get("metric") or "metric")
    with _figure(6.4, 3.6) as figure:
        axes = figure.add_subplot()
        for within, colour, label in ((True, GREEN, "within the tolerance"), (False, RED, "outside it")):
            chosen = [position[i] for i, t in done if bool(t.get("meets_tolerance")) == within]
            if chosen:
                axes.scatter([x for x, _ in chosen], [y for _, y in chosen], color=colour, label=label, zorder=3)
        for i, (x, y) in position.items():
            axes.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        objective_axis = {"size": "size_bytes", "latency": "latency_ms"}.get(str(tuning.get("objective")))
        front = [position[i] for i in tuning.get("pareto_front") or [] if i in position]
        if axis == objective_axis and front:
            front.sort()
            axes.plot([x for x, _ in front], [y for _, y in front], color=BLUE, linestyle="--", linewidth=1,
                      label="Pareto front", zorder=2)
        if tolerance is not None:
            axes.axhline(tolerance, color=ORANGE, linewidth=1, label=f"tolerance ({metric})")
        base = tuning.get("baseline_metric")
        if isinstance(base, (int, float)):
            axes.axhline(base, color=GREY, linewidth=1, linestyle=":", label="original model")
        best = tuning.get("best")
        if best in position:
            axes.scatter(*position[best], marker="*", s=220, facecolors="none", edgecolors="black", zorder=4,
                         label=f"chosen (trial {best})")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else ""))
        axes.set_title(f"Tuning trials: {xlabel.split(' (')[0]} against {metric}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
        return _svg(figure)
