"""Loading uploaded models safely and describing them: one loader per format, each returning a LoadedModel
(worker.formats.loaded)."""

from pathlib import Path
from typing import Any

from app.core.errors import ErrorCode
from worker.errors import JobFailure
from worker.formats import onnx_format, pt2, suggestions
from worker.formats.loaded import LoadedModel

SUPPORTED = "pt2, onnx, hf"


def load(path: Path, fmt: str, workdir: Path, max_unpacked_bytes: int | None = None) -> LoadedModel:
    """`max_unpacked_bytes` caps what a Hugging Face archive may extract to."""
    if fmt == "pt2":
        return pt2.load(path)
    if fmt == "onnx":
        return onnx_format.load(path)
    if fmt == "hf":
        from worker.formats import hf  # transformers is slow to import: only for Hugging Face models

        model = hf.load_hf(path, workdir, max_unpacked_bytes)
        return LoadedModel(format="hf", inputs=model.inputs, outputs=model.outputs, module=model.module,
                           info=hf.describe(model), hf=model)
    raise JobFailure(ErrorCode.UNSUPPORTED_FORMAT, f"format {fmt!r} is not supported; supported: {SUPPORTED}")


def inspect(path: Path, fmt: str, workdir: Path, max_unpacked_bytes: int | None = None) -> dict[str, Any]:
    """What the model page shows: params, inputs, outputs, architecture, and proposed input specs (with what
    could not be told). Raises JobFailure if invalid."""
    if fmt == "hf":
        from worker.formats import hf

        info = hf.inspect_hf(path, workdir, max_unpacked_bytes)
    else:
        info = dict(load(path, fmt, workdir, max_unpacked_bytes).info)
    info["suggested_input_specs"], info["input_spec_notes"] = suggestions.suggest(info["inputs"],
                                                                                  info.get("dim_ranges"))
    return info
