"""The model card and the HTML report, from small hand-written metrics: what they show, that the HTML page stands
alone (no network reference of any kind), and that hostile names and recipe strings come out as text."""

import ast
import json
import re
from html.parser import HTMLParser

import pytest

from worker.reporting import write_documents
from worker.reporting.card import md, model_card
from worker.reporting.page import html_report
from worker.reporting.summary import Subject, points, recipe_line, tolerance_line

HOSTILE = "<script>alert(1)</script>"
SHA = "ab" * 32


def latency(p50):
    return {"p50": p50, "p95": p50 * 1.2, "min": p50 * 0.9, "max": p50 * 1.5, "mean": p50 * 1.05, "stdev": 0.01,
            "runs": 20, "batch_shape": [[4, 16]]}


def figures(size, p50, cosine, accuracy=None):
    return {"size_bytes": size, "params": 1000, "nonzero_params": 500, "latency_ms": latency(p50),
            "accuracy": accuracy, "fidelity": {"cosine_mean": cosine, "cosine_min": cosine - 0.01}}


RECIPE = {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5, "exclude": ["`]</pre><b>x"]},
                    {"op": "quantize", "method": "dynamic", "dtype": "int8", "granularity": "per_channel"}]}
PROVENANCE = {"inputs": {"model": {"id": "mdl_1", "format": "onnx", "size_bytes": 4000, "sha256": SHA},
                         "datasets": {"eval": {"format": "npz", "size_bytes": 300, "sha256": "cd" * 32}},
                         "students": {}},
              "recipe": RECIPE, "tune": None, "target": {"runtime": "onnxruntime", "device": "cpu"},
              "input_specs": None, "seeds": {"generated_inputs": None, "training": 0, "held_out_split": 0},
              "versions": {"modelpress": "0.1.0", "torch": "2.13.0", "numpy": "2.0"},
              "hardware": {"cpu": "Test CPU <b>", "gpu": None}, "threads": {"measurement": 1, "torch": 2},
              "latency": {"warmup_runs": 2, "runs": 20, "unit": "ms", "baseline": latency(2.0),
                          "compressed": latency(1.0)}}


def metrics(**extra):
    base = {"baseline": figures(4000, 2.0, 1.0, 0.9), "compressed": figures(1000, 1.0, 0.99, 0.89),
            "compression_ratio": 4.0, "speedup": 2.0,
            "fidelity": {"cosine_mean": 0.99, "cosine_min": 0.97, "rel_l2": 0.1, "top1_agreement": 0.95},
            "steps": [{"op": "prune", "seconds": 0.1, **figures(4000, 1.8, 0.995, 0.9), "details": {}},
                      {"op": "quantize", "seconds": 0.2, **figures(1000, 1.0, 0.99, 0.89), "details": {}}],
            "source": {"baseline_fidelity_to_original": {"cosine_mean": 1.0}},
            "evaluation": {"inputs": "eval dataset"}, "notes": [f"a note naming {HOSTILE}"],
            "provenance": PROVENANCE}
    return {**base, **extra}


TUNING = {"trials": [{"recipe": {"steps": [{"op": "quantize", "dtype": "fp16"}]}, "size_bytes": 2000,
                      "latency_ms": 1.5, "metric": 0.999, "meets_tolerance": True, "error": None},
                     {"recipe": {"steps": [{"op": "quantize", "dtype": "int8"}]}, "size_bytes": 1000,
                      "latency_ms": 1.0, "metric": 0.995, "meets_tolerance": True, "error": None},
                     {"recipe": {"steps": [{"op": "prune", "sparsity": 0.9}]}, "size_bytes": 4000,
                      "latency_ms": 2.0, "metric": 0.5, "meets_tolerance": False, "error": None},
                     {"recipe": {"steps": [{"op": "quantize", "dtype": "int4"}]}, "size_bytes": 0,
                      "latency_ms": 0.0, "metric": None, "meets_tolerance": False, "error": "JobFailure: boom"}],
          "best": 1, "met_tolerance": True, "pareto_front": [1, 0], "objective": "size", "metric": "fidelity",
          "max_loss": 0.01, "baseline_metric": 1.0, "message": "trial 1 has the smallest file"}


def subject(name=HOSTILE, **extra):
    return Subject(**{"model_name": name, "job_id": "job_1", "model_id": "mdl_1",
                      "model_file": f"{name}-compressed.onnx", "model_format": "onnx", **extra})


class Page(HTMLParser):
    """Every start tag with its attributes, and the text of <script> elements (there must be none)."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parsed(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


def test_the_html_report_has_svg_charts_and_no_network_reference():
    page = html_report(metrics(tuning=TUNING), subject())
    tags = parsed(page).tags
    assert sum(tag == "svg" for tag, _ in tags) == 5  # size, latency, fidelity, two tuning scatters
    references = [value for _, attrs in tags for name, value in attrs.items()
                  if name in ("src", "href", "xlink:href", "action", "data", "poster") and value]
    assert references and all(value.startswith("#") for value in references)  # only links inside the page
    assert not re.search(r"https?://|//[a-z0-9]", page, re.IGNORECASE)
    assert "url(" not in page.replace("url(#", "")  # clip paths inside the page only
    assert not any(tag in ("script", "link", "iframe", "object", "embed", "img") for tag, _ in tags)
    ids = [attrs["id"] for _, attrs in tags if "id" in attrs]
    assert len(ids) == len(set(ids))  # several charts on one page without clashing ids


def test_the_html_report_escapes_what_the_tenant_wrote():
    page = html_report(metrics(tuning=TUNING), subject())
    assert HOSTILE not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "</pre><b>x" not in page  # a recipe string cannot close the provenance block
    assert "Test CPU &lt;b&gt;" in page
    assert [tag for tag, _ in parsed(page).tags].count("pre") == 1


def test_the_html_report_shows_the_steps_the_spread_and_the_trials():
    page = html_report(metrics(tuning=TUNING), subject("resnet"))
    assert "<h1>resnet</h1>" in page
    assert "4x smaller" in page and "2x faster" in page
    assert "1. prune" in page and "2. quantize" in page and "delivered" in page  # chart labels, drawn as text
    assert "failed: JobFailure: boom" in page and 'class="chosen"' in page
    assert "0.99 or higher" in page  # the tolerance line: 1.0 less 1%
    assert SHA in page and "cdcd" in page and "stdev" in page
    no_tuning = html_report(metrics(), subject("resnet"))
    assert "Tuning" not in no_tuning and no_tuning.count("<svg") == 3


def test_the_model_card_has_front_matter_results_loading_and_provenance():
    card = model_card(metrics(), subject("resnet"))
    front, body = card.split("\n---\n", 1)
    assert front.startswith("---\nlibrary_name: \"onnx\"\ntags:\n- \"modelpress\"")
    assert '- "pruned"' in front and '- "quantized"' in front and '- "int8"' in front
    assert f'base_model_sha256: "{SHA}"' in front
    assert 'compression_method: "prune (magnitude, sparsity 0.5) then quantize (dynamic, int8, per_channel)"' in front
    assert "| size | 4 kB | 1 kB | 4x smaller |" in body
    assert "| accuracy | 0.9 | 0.89 |  |" in body and "| latency min-max (ms) | 1.8-3 | 0.9-1.5 |  |" in body
    assert "InferenceSession(\"resnet-compressed.onnx\"" in body
    assert "## Provenance" in body and SHA in body and '"held_out_split": 0' in body


def test_the_model_card_escapes_what_the_tenant_wrote():
    card = model_card(metrics(), subject())
    assert HOSTILE not in card and "<script" not in card
    assert "# &lt;script&gt;alert\\(1\\)&lt;/script&gt;, compressed" in card
    [name] = re.findall(r"^model_name: (.*)$", card, re.MULTILINE)
    assert json.loads(name) == HOSTILE  # a quoted YAML (and JSON) string, without a markup character
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    [literal] = re.findall(r"InferenceSession\((\"[^\"]*\")", code)
    assert ast.literal_eval(literal) == f"{HOSTILE}-compressed.onnx"  # the name itself, as a Python string
    fences = re.findall(r"^```", card, re.MULTILINE)
    assert len(fences) == 4  # the recipe's backtick cannot open or close a block
    assert "\\u0060]\\u003c/pre\\u003e\\u003cb\\u003ex" in card and "</pre>" not in card


@pytest.mark.parametrize("text, shown", [("a*b_c", "a\\*b\\_c"), ("[x](javascript:y)", "\\[x\\]\\(javascript:y\\)"),
                                         ("<img src=x>", "&lt;img src=x&gt;"), ("line\nbreak", "line break"),
                                         ("it's \"q\" & co", "it's \"q\" &amp; co")])
def test_markdown_text_is_shown_as_written(text, shown):
    assert md(text) == shown


def test_a_gzip_delivered_model_is_unpacked_before_loading():
    card = model_card(metrics(), subject("m", encoding="gzip", model_file="m-compressed.onnx.gz"))
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'gzip.open("m-compressed.onnx.gz", "rb") as packed, open("m-compressed.onnx", "wb")' in code
    assert 'InferenceSession("m-compressed.onnx"' in code


def test_points_and_lines_read_the_metrics():
    seen = points(metrics())
    assert [p.label for p in seen] == ["original", "1. prune", "2. quantize", "delivered"]
    assert [p.size_bytes for p in seen] == [4000, 4000, 1000, 1000] and seen[1].fidelity == 0.995
    assert recipe_line({"steps": [{"op": "distill", "student": {"current": True}, "epochs": 3}]}) == \
        "distill (epochs 3, student: the model as the steps before left it)"
    assert tolerance_line(TUNING) == pytest.approx(0.99)
    assert tolerance_line({**TUNING, "metric": "perplexity", "baseline_metric": 10.0}) == pytest.approx(10.1)


def test_write_documents_gives_the_card_and_the_page(tmp_path):
    card, page = write_documents(metrics(), subject("m"), tmp_path / "documents")
    assert (card.kind, card.format, card.filename) == ("card", "md", "model-card.md")
    assert (page.kind, page.format, page.filename) == ("report", "html", "report.html")
    assert page.path.read_text().startswith("<!DOCTYPE html>") and card.path.read_text().startswith("---\n")


def test_a_sentence_encoder_is_reported_on_its_embedding_with_the_token_states_beside_it():
    judged = {"cosine_mean": 0.93, "cosine_min": 0.6, "rel_l2": 0.3, "top1_agreement": None,
              "on": "sentence embedding (mean pooling, from the archive's sentence-transformers config)",
              "token_cosine_mean": 0.71, "token_cosine_min": 0.2}
    card = model_card(metrics(fidelity=judged), subject("minilm"))
    assert "sentence-embedding cosine 0.93 to the original" in card
    assert "| sentence-embedding cosine to the original (mean) | 1 | 0.93 |  |" in card
    assert "| token-state cosine (mean) | 1 | 0.71 |  |" in card
    page = html_report(metrics(fidelity=judged), subject("minilm"))
    assert "sentence-embedding cosine 0.93 to the original" in page
    assert "output cosine" not in model_card(metrics(fidelity=judged), subject("minilm"))
    assert "output cosine 0.99 to the original" in model_card(metrics(), subject("resnet"))
