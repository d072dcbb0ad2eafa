"""What every format loader returns: the model's inputs and outputs, and either a torch module or an ONNX file."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.runtime import ort_session, run_module, run_onnx


@dataclass
class LoadedModel:
    """A torch module (positional tensor inputs in `inputs` order -> tuple of tensors; .pt2 and Hugging Face
    models) or an ONNX file (ONNX uploads). `reference(feeds)` gives the original model's own outputs, the
    yardstick for fidelity."""

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
        session = self.extras.get("session") or ort_session(self.onnx_path, device)
        self.extras["session"] = session
        return run_onnx(session, feeds)


def hf_model_of(module: torch.nn.Module | None):
    """The transformers model inside a Hugging Face adapter module, if it is one."""
    inner = getattr(module, "model", None)
    return inner if inner is not None and hasattr(inner, "save_pretrained") else None
