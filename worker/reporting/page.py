"""The HTML report: one self-contained page (inline CSS and SVG charts; no script, no external URL of any kind, and
a Content-Security-Policy that would block one) showing what the job gained and lost, step by step, the tuning
trials of a tuned job, and the provenance. Every string that reaches the page is escaped."""

import html
import json
from typing import Any

from worker.reporting import charts
from worker.reporting.summary import (
    LATENCY_SPREAD,
    Subject,
    chosen_recipe,
    cosine_name,
    number,
    plain,
    points,
    recipe_line,
    result_rows,
    size_text,
    step_line,
    times,
    tolerance_line,
)

POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; overflow-wrap: anywhere; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
svg { max-width: 100%; height: auto; display: block; margin: 1em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
.chosen { background: #eef7ee; }
"""


def e(value: Any) -> str:
    """Escaped for HTML text and attribute values alike."""
    return html.escape(plain(value), quote=True)


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1, chosen: int | None = None) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="n">{e(c)}</td>' if i >= numeric_from else f"<td>{e(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f'<tr class="chosen">{cells}</tr>' if index == chosen else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _tuning(tuning: dict[str, Any]) -> list[str]:
    trials = tuning.get("trials") or []
    tolerance = tolerance_line(tuning)
    rows = [[i, recipe_line(t.get("recipe")), size_text(t.get("size_bytes")) if t.get("error") is None else "-",
             number(t.get("latency_ms")) if t.get("error") is None else "-", number(t.get("metric")),
             "yes" if t.get("meets_tolerance") else "no" if t.get("error") is None else f"failed: {t['error']}"]
            for i, t in enumerate(trials)]
    parts = ["<h2>Tuning</h2>",
             f"<p>{e(tuning.get('message', ''))}.</p>",
             f"<p>Metric {e(tuning.get('metric', '?'))} (original model: {e(number(tuning.get('baseline_metric')))}), "
             f"objective {e(tuning.get('objective', '?'))}, max loss {e(number(tuning.get('max_loss')))}: a trial "
             f"meets the tolerance at {e(number(tolerance))} or "
             f"{'lower' if tuning.get('metric') == 'perplexity' else 'higher'}.</p>",
             _table(["trial", "recipe", "size", "latency p50 (ms)", "metric", "within the tolerance"], rows,
                    numeric_from=2, chosen=tuning.get("best"))]
    if any(t.get("error") is None and t.get("metric") is not None for t in trials):
        parts += [charts.trials_chart(tuning, "size_bytes", tolerance),
                  charts.trials_chart(tuning, "latency_ms", tolerance)]
    return parts


def _pairs(values: dict[str, Any] | None) -> str:
    return ", ".join(f"{name} {value}" for name, value in (values or {}).items() if value is not None)


def _file_row(label: str, item: dict[str, Any]) -> list[Any]:
    return [label, item.get("format"), size_text(item.get("size_bytes")), item.get("sha256")]


def _provenance(provenance: dict[str, Any]) -> list[str]:
    inputs = provenance.get("inputs") or {}
    files = [_file_row("original model", inputs.get("model") or {}),
             *(_file_row(f"{role} dataset", item) for role, item in (inputs.get("datasets") or {}).items()),
             *(_file_row(f"student {ident}", item) for ident, item in (inputs.get("students") or {}).items())]
    latency = provenance.get("latency") or {}
    spread = [[which, *(number((latency.get(which) or {}).get(name)) for name in LATENCY_SPREAD)]
              for which in ("baseline", "compressed")]
    environment = [["versions", _pairs(provenance.get("versions"))], ["hardware", _pairs(provenance.get("hardware"))],
                   ["threads", _pairs(provenance.get("threads"))], ["seeds", _pairs(provenance.get("seeds"))]]
    everything = json.dumps(provenance, indent=2, ensure_ascii=False, default=str)
    return ["<h2>Provenance</h2>", "<h3>Inputs</h3>", _table(["file", "format", "size", "sha256"], files, 9),
            "<h3>Software and machine</h3>", _table(["", ""], environment, 9),
            f"<h3>Latency over {e(latency.get('runs'))} runs after {e(latency.get('warmup_runs'))} warm-up runs "
            "(ms)</h3>", _table(["model", *LATENCY_SPREAD], spread),
            "<details><summary>Everything recorded (JSON)</summary>", f"<pre>{html.escape(everything)}</pre>",
            "</details>"]


def html_report(metrics: dict[str, Any], subject: Subject) -> str:
    recipe = chosen_recipe(metrics)
    provenance = metrics.get("provenance") or {}
    target = provenance.get("target") or {}
    seen = points(metrics)
    title = f"{plain(subject.model_name)}: compression report"
    summary = (f"{times(metrics.get('compression_ratio'), 'smaller', 'larger')}, "
               f"{times(metrics.get('speedup'), 'faster', 'slower')} at p50, {cosine_name(metrics.get('fidelity'))} "
               f"{number((metrics.get('fidelity') or {}).get('cosine_mean'))} to the original")
    body = [f"<h1>{e(subject.model_name)}</h1>",
            f'<p class="sub">job {e(subject.job_id or "-")} &middot; model {e(subject.model_id or "-")} &middot; '
            f"{e(target.get('runtime', '?'))} on {e(target.get('device', '?'))} &middot; delivered as "
            f"{e(subject.model_file)}</p>",
            f"<p><strong>{e(summary)}</strong>.</p>",
            "<h2>Recipe</h2>", "<ol>", *(f"<li>{e(step_line(s))}</li>" for s in (recipe or {}).get("steps") or []
                                         if isinstance(s, dict)), "</ol>",
            "<h2>Results</h2>", _table(["measure", "original", "compressed", "change"],
                                       [list(row) for row in result_rows(metrics)]),
            f"<p>Inputs: {e((metrics.get('evaluation') or {}).get('inputs', 'not recorded'))}; both models measured "
            "by the same code, in the same process.</p>",
            "<h2>Step by step</h2>", charts.size_chart(seen), charts.latency_chart(seen), charts.fidelity_chart(seen)]
    if isinstance(metrics.get("tuning"), dict):
        body += _tuning(metrics["tuning"])
    notes = metrics.get("notes") or []
    if notes:
        body += ["<h2>Notes</h2>", "<ul>", *(f"<li>{e(n)}</li>" for n in notes), "</ul>"]
    body += _provenance(provenance)
    modelpress = (provenance.get("versions") or {}).get("modelpress")
    body.append(f"<footer><p class=\"sub\">Made by modelpress {e(modelpress or '')}; recipe: "
                f"{e(recipe_line(recipe))}.</p></footer>")
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", *body,
                      "</body>", "</html>", ""])
