"""What a person sees: transfer and job progress, and the report as a table.

On a terminal: rich progress bars. Anywhere else (CI logs, pipes): plain lines, one per event worth a line, and
no bars, colours or cursor movement, so a log reads top to bottom."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from modelpress.resources import FINISHED
from modelpress.resources import Progress as JobProgress


def error_console() -> Console:
    """Progress and status go to stderr, so stdout holds only results (tables, ids, JSON) for pipes."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


def human_size(size: int | float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return str(size)


@contextmanager
def transfer(description: str, total: int | None, console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """Yields `done(bytes_so_far)`. A bar on a terminal; else a line when the transfer starts and one when it ends."""
    console = console or error_console()
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done: bar.update(task, completed=done)
        return
    console.print(f"{description} ({human_size(total)})", markup=False)
    started = time.monotonic()
    yield lambda done: None
    console.print(f"{description}: done in {time.monotonic() - started:.1f} s", markup=False)


def _describe(update: JobProgress) -> str:
    return ": ".join(part for part in (update.stage, update.message) if part) or "waiting"


class JobFollower:
    """The `on_progress` of `Client.wait` for the command line: a bar and one line per finished stage on a
    terminal; a line per new stage or message elsewhere."""

    def __init__(self, job_id: str, console: Console | None = None):
        self.job_id = job_id
        self.console = console or error_console()
        self._bar: Progress | None = None
        self._task = None
        self._current: JobProgress | None = None
        self._stage_started = time.monotonic()
        self._status: str | None = None

    def __enter__(self) -> "JobFollower":
        if self.console.is_terminal:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(f"job {self.job_id}", total=1.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            if exc[0] is None:
                self._finish_stage()
            self._bar.stop()

    def _finish_stage(self) -> None:
        if self._current is not None and self._current.stage and self._bar is not None:
            seconds = time.monotonic() - self._stage_started
            self._bar.console.print(f"[green]✓[/] {self._current.stage:<10} {self._current.message or ''} "
                                    f"[dim]({seconds:.1f} s)[/]")
        self._current = None

    def __call__(self, update: JobProgress) -> None:
        status = update.status if update.status != self._status else None
        self._status = update.status or self._status
        if status and status not in FINISHED:
            self._print(f"job {self.job_id}: {status}")
        if update.stage or update.message:
            if self._bar is not None:
                if self._current is None or update.stage != self._current.stage:
                    self._finish_stage()
                    self._stage_started = time.monotonic()
                self._bar.update(self._task, completed=update.fraction or 0.0, description=_describe(update))
            elif self._current is None or _describe(update) != _describe(self._current):
                self._print(f"[{(update.fraction or 0) * 100:3.0f}%] {_describe(update)}")
            self._current = update
        if status in FINISHED:
            self._finish_stage()
            self._print(f"job {self.job_id}: {status}")

    def _print(self, text: str) -> None:
        (self._bar.console if self._bar is not None else self.console).print(text, markup=False)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, int | float) or not isinstance(after, int | float) or not before:
        return ""
    return f"x{after / before:.3g}"


def print_table(console: Console, headers: tuple[str, ...], rows: list[tuple[str, ...]],
                right: tuple[int, ...] = ()) -> None:
    """A table on a terminal; aligned plain columns elsewhere (never cut or wrapped, so ids survive a log)."""
    if console.is_terminal:
        table = Table(box=box.SIMPLE_HEAD)
        for index, header in enumerate(headers):
            table.add_column(header, justify="right" if index in right else "left",
                             overflow="fold", no_wrap=index == 0)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in (headers, *rows):
        cells = [str(cell).rjust(width) if index in right else str(cell).ljust(width)
                 for index, (cell, width) in enumerate(zip(row, widths, strict=True))]
        console.print("  ".join(cells).rstrip(), markup=False)


def report_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Before and after, measured alike: size, parameters, latency, accuracy (rows only where measured)."""
    baseline, compressed = metrics.get("baseline") or {}, metrics.get("compressed") or {}
    rows = []

    def row(label: str, before: Any, after: Any, shown: Callable[[Any], str] = _number) -> None:
        if before is not None or after is not None:
            rows.append((label, shown(before), shown(after), _change(before, after)))

    row("size", baseline.get("size_bytes"), compressed.get("size_bytes"), human_size)
    row("params", baseline.get("params"), compressed.get("params"))
    row("non-zero params", baseline.get("nonzero_params"), compressed.get("nonzero_params"))
    for quantile in ("p50", "p95"):
        row(f"latency {quantile} (ms)", (baseline.get("latency_ms") or {}).get(quantile),
            (compressed.get("latency_ms") or {}).get(quantile))
    row("accuracy", baseline.get("accuracy"), compressed.get("accuracy"))
    row("perplexity", baseline.get("perplexity"), compressed.get("perplexity"))
    return rows


def report_summary(metrics: dict[str, Any]) -> list[str]:
    """The lines under the table: ratio, speed-up, fidelity and the floor it was judged against, notes."""
    lines = []
    if metrics.get("compression_ratio") is not None:
        lines.append(f"compression ratio {_number(metrics['compression_ratio'])}, "
                     f"speedup {_number(metrics.get('speedup'))}")
    fidelity = metrics.get("fidelity") or {}
    if fidelity:
        parts = [f"{name} {_number(fidelity.get(name), 5)}" for name in
                 ("cosine_mean", "cosine_min", "rel_l2", "top1_agreement") if fidelity.get(name) is not None]
        lines.append("fidelity: " + ", ".join(parts))
    floor = metrics.get("fidelity_floor") or {}
    if floor:
        lines.append(f"fidelity floor {_number(floor.get('min_fidelity'))}: "
                     + ("held" if floor.get("passed") else f"NOT held ({floor.get('message', '')})"))
    lines += [f"note: {note}" for note in metrics.get("notes") or []]
    return lines
