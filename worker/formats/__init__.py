"""Loading uploaded models safely and describing them.

Every format gives the pipeline a `LoadedModel`: the input/output description and either a torch module
(positional tensor inputs in `inputs` order -> tuple of tensors; .pt2 and Hugging Face models) or an ONNX
file (ONNX uploads). `reference(feeds)` gives the original model's own outputs, the yardstick for fidelity.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.errors import JobFailure

SUPPORTED = "pt2, onnx, hf"


@dataclass
class LoadedModel:
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    info: dict[str, Any]
    module: torch.nn.Module | None = None
    onnx_path: Path | None = None
    hf: Any = None  # worker.formats.hf.HFModel for Hugging Face uploads
    extras: dict[str, Any] = field(default_factory=dict)

    def reference(self, feeds: list[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
        if self.module is not None:
            return run_module(self.module, feeds, device)
        from worker.evaluation.runtime import ort_session, run_onnx

        session = self.extras.get("session") or ort_session(self.onnx_path, device)
        self.extras["session"] = session
        return run_onnx(session, feeds)


def run_module(module: torch.nn.Module, feeds: list[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*[torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in feeds])
    flat = result if isinstance(result, (list, tuple)) else [result]
    return [t.detach().float().cpu().numpy() for t in flat if isinstance(t, torch.Tensor)]


def load(path: Path, fmt: str, workdir: Path) -> LoadedModel:
    if fmt == "pt2":
        from worker.formats import pt2
        return pt2.load(path)
    if fmt == "onnx":
        from worker.formats import onnx_format
        return onnx_format.load(path)
    if fmt == "hf":
        from worker.formats import hf
        model = hf.load_hf(path, workdir)
        return LoadedModel(format="hf", inputs=model.inputs, outputs=model.outputs, module=model.module,
                           info=hf.describe(model), hf=model)
    raise JobFailure("unsupported_format", f"format {fmt!r} is not supported; supported: {SUPPORTED}")


def inspect(path: Path, fmt: str, workdir: Path) -> dict[str, Any]:
    """What the model page shows: params, inputs, outputs, architecture. Raises JobFailure if invalid."""
    if fmt == "hf":
        from worker.formats import hf
        return hf.inspect_hf(path, workdir)
    return load(path, fmt, workdir).info
