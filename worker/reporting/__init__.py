"""The documents a finished job delivers beside its JSON report (which worker.staging writes): a model card
(markdown, Hugging Face style) and an HTML report with charts. Both are made in the sandbox from the job's metrics
alone; the tenant's model name and recipe strings are hostile input, escaped by each document for its format."""

from pathlib import Path
from typing import Any

from worker.pipeline.files import Output
from worker.reporting.card import model_card
from worker.reporting.page import html_report
from worker.reporting.summary import Subject

CARD_NAME, PAGE_NAME = "model-card.md", "report.html"


def write_documents(metrics: dict[str, Any], subject: Subject, folder: Path) -> list[Output]:
    """The card and the HTML report as files in `folder`, ready to be delivered."""
    folder.mkdir(parents=True, exist_ok=True)
    card, page = folder / CARD_NAME, folder / PAGE_NAME
    card.write_text(model_card(metrics, subject), encoding="utf-8")
    page.write_text(html_report(metrics, subject), encoding="utf-8")
    return [Output("card", "md", card, CARD_NAME), Output("report", "html", page, PAGE_NAME)]
