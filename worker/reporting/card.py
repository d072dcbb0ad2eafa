"""The model card: Hugging Face model-card markdown (YAML front matter, then prose and tables) describing the
compressed model, what was done to it, what was measured, how to load it and where every number came from.

Markdown renderers pass HTML through, so everything that comes from the tenant is escaped: in the front matter as
JSON strings (valid YAML), in text with markdown's backslashes and HTML entities, in code blocks as string
literals without backticks (a fence cannot be closed from inside) or markup characters.
"""

import html
import json
import re
from typing import Any

from worker.reporting.summary import (
    Subject,
    chosen_recipe,
    cosine_name,
    number,
    plain,
    recipe_line,
    result_rows,
    step_line,
    times,
)

MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")
TAG = re.compile(r"[^a-z0-9._-]")
LIBRARIES = {"onnx": "onnx", "onnx-seq2seq": "onnx", "pt2": "pytorch"}
STEP_TAGS = {"quantize": "quantized", "prune": "pruned", "distill": "distilled", "finetune": "fine-tuned"}


def md(text: Any) -> str:
    """Text that markdown shows as it is: its punctuation escaped, and <, > and & as entities."""
    return html.escape(MARKDOWN_SPECIAL.sub(r"\\\1", plain(text)), quote=False)


LITERAL_ESCAPES = {"`": "\\u0060", "<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}


def _cell(text: Any) -> str:
    """A table cell of the service's own words and numbers: markup characters and the column bar escaped."""
    return html.escape(plain(text), quote=False).replace("|", "\\|")


def _literal(value: Any, indent: int | None = None) -> str:
    """JSON for YAML values and code blocks (a JSON string is a Python string literal too): ASCII only, with no
    backtick (a fence cannot close) and no markup character, each written as its \\u escape."""
    text = json.dumps(value, indent=indent, ensure_ascii=True, default=str)
    return re.sub("[`<>&]", lambda m: LITERAL_ESCAPES[m.group()], text)


def _tags(metrics: dict[str, Any], subject: Subject, recipe: dict[str, Any] | None) -> list[str]:
    tags = ["modelpress", "compressed", LIBRARIES.get(subject.model_format, subject.model_format)]
    for step in (recipe or {}).get("steps") or []:
        if isinstance(step, dict):
            tags.append(STEP_TAGS.get(step.get("op"), ""))
            if step.get("op") == "quantize":
                tags.append(str(step.get("dtype") or ""))
    if "tuning" in metrics:
        tags.append("accuracy-aware-tuning")
    return list(dict.fromkeys(t for t in (TAG.sub("-", tag.lower()) for tag in tags) if t))


def _front_matter(metrics: dict[str, Any], subject: Subject, recipe: dict[str, Any] | None) -> str:
    provenance = metrics.get("provenance") or {}
    model = (provenance.get("inputs") or {}).get("model") or {}
    fields = {"library_name": LIBRARIES.get(subject.model_format, "onnx"), "tags": _tags(metrics, subject, recipe),
              "model_name": plain(subject.model_name), "base_model_sha256": model.get("sha256"),
              "compression_method": recipe_line(recipe), "modelpress_job": subject.job_id,
              "compression_ratio": metrics.get("compression_ratio"), "speedup": metrics.get("speedup")}
    lines = ["---"]
    for name, value in fields.items():
        if isinstance(value, list):
            lines += [f"{name}:"] + [f"- {_literal(item)}" for item in value]
        else:
            lines.append(f"{name}: {_literal(value)}")
    return "\n".join(lines + ["---"])


def _how_to_load(subject: Subject) -> list[str]:
    packed = subject.encoding == "gzip"
    name = _literal(subject.model_file.removesuffix(".gz") if packed else subject.model_file)
    if subject.model_format == "pt2":
        code = ["import torch", "", f"program = torch.export.load({name})", "model = program.module()"]
    elif subject.model_format == "onnx-seq2seq":
        code = ["import zipfile", "", "import onnxruntime as ort", "", f"with zipfile.ZipFile({name}) as pair:",
                '    encoder = ort.InferenceSession(pair.read("encoder.onnx"))',
                '    decoder = ort.InferenceSession(pair.read("decoder.onnx"))']
    else:
        code = ["import onnxruntime as ort", "",
                f'session = ort.InferenceSession({name}, providers=["CPUExecutionProvider"])',
                "outputs = session.run(None, {session.get_inputs()[0].name: batch})"]
    if packed:
        code = ["import gzip", "import shutil", "",
                f'with gzip.open({_literal(subject.model_file)}, "rb") as packed, open({name}, "wb") as out:',
                "    shutil.copyfileobj(packed, out)", "", *code]
    intro = (f"The model artifact is {md(subject.model_file)} ({md(subject.model_format)}"
             + (", gzip-compressed: its sparse weights pack well" if packed else "") + "):")
    lines = [intro, "", "```python", *code, "```"]
    if subject.other_files:
        lines += ["", f"Also delivered: {', '.join(md(name) for name in subject.other_files)}."]
    return lines


def model_card(metrics: dict[str, Any], subject: Subject) -> str:
    recipe = chosen_recipe(metrics)
    provenance = metrics.get("provenance") or {}
    name = md(subject.model_name)
    lines = [_front_matter(metrics, subject, recipe), "", f"# {name}, compressed", "",
             f"{name} compressed by modelpress" + (f" (job {md(subject.job_id)})" if subject.job_id else "") + ": "
             f"{times(metrics.get('compression_ratio'), 'smaller', 'larger')}, "
             f"{times(metrics.get('speedup'), 'faster', 'slower')} at p50, {cosine_name(metrics.get('fidelity'))} "
             f"{number((metrics.get('fidelity') or {}).get('cosine_mean'))} to the original.", "",
             "## Method", ""]
    for index, step in enumerate((recipe or {}).get("steps") or [], 1):
        if isinstance(step, dict):
            lines.append(f"{index}. {md(step_line(step))}")
    tuning = metrics.get("tuning")
    if isinstance(tuning, dict):
        lines += ["", f"Chosen by accuracy-aware tuning over {len(tuning.get('trials') or [])} trials "
                      f"(metric {md(tuning.get('metric', '?'))}, objective {md(tuning.get('objective', '?'))}, "
                      f"max loss {number(tuning.get('max_loss'))}): {md(tuning.get('message', ''))}."]
    target = provenance.get("target") or {}
    lines += ["", f"Target: {md(target.get('runtime', '?'))} on {md(target.get('device', '?'))}.", "",
              "## Results", "",
              "Measured by modelpress in one process, with the same code and on the same inputs for both models "
              f"({md((metrics.get('evaluation') or {}).get('inputs', 'inputs not recorded'))}).", "",
              "| measure | original | compressed | change |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(_cell(cell) for cell in row)} |" for row in result_rows(metrics)]
    notes = metrics.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {md(note)}" for note in notes]
    lines += ["", "## How to load", "", *_how_to_load(subject)]
    lines += ["", "## Provenance", "", *_provenance_table(provenance), "", "Everything recorded:", "", "```json",
              _literal(provenance, indent=2), "```", ""]
    return "\n".join(lines)


def _provenance_table(provenance: dict[str, Any]) -> list[str]:
    inputs = provenance.get("inputs") or {}
    versions = provenance.get("versions") or {}
    hardware = provenance.get("hardware") or {}
    latency = provenance.get("latency") or {}
    rows = [("original model sha256", (inputs.get("model") or {}).get("sha256")),
            *((f"{role} dataset sha256", item.get("sha256")) for role, item in (inputs.get("datasets") or {}).items()),
            ("seeds", ", ".join(f"{k} {v}" for k, v in (provenance.get("seeds") or {}).items() if v is not None)),
            ("software", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
            ("machine", f"{hardware.get('cpu')}" + (f", GPU {hardware['gpu']}" if hardware.get("gpu") else "")),
            ("threads", ", ".join(f"{k} {v}" for k, v in (provenance.get("threads") or {}).items())),
            ("latency runs", f"{latency.get('runs')} after {latency.get('warmup_runs')} warm-up runs")]
    return ["| | |", "| --- | --- |", *(f"| {_cell(k)} | {_cell(v if v is not None else '-')} |" for k, v in rows)]
