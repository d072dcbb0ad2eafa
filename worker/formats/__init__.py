"""Loading uploaded models safely, describing their inputs, and exporting them for measurement.

Every format gives the pipeline a `SourceModel`: an fp32 ONNX file to compress and measure, the input
description, and `reference(feeds)`, the original model's own outputs (the yardstick for fidelity).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import JobFailure


@dataclass
class SourceModel:
    format: str
    onnx_path: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    reference: Callable[[list[np.ndarray]], list[np.ndarray]]


def inspect(path: Path, fmt: str) -> dict[str, Any]:
    """What the model page shows: params, inputs, outputs, architecture. Raises JobFailure if invalid."""
    if fmt == "pt2":
        from worker.formats import pt2
        return pt2.inspect(path)
    if fmt == "onnx":
        from worker.formats import onnx_format
        return onnx_format.inspect(path)
    raise JobFailure("unsupported_format", f"format {fmt!r} is not supported; supported: pt2, onnx")


def load_source(path: Path, fmt: str, workdir: Path, device: str) -> SourceModel:
    if fmt == "pt2":
        from worker.formats import pt2
        return pt2.load_source(path, workdir, device)
    if fmt == "onnx":
        from worker.formats import onnx_format
        return onnx_format.load_source(path, device)
    raise JobFailure("unsupported_format", f"format {fmt!r} is not supported; supported: pt2, onnx")
