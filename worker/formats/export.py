"""Export a torch module (positional tensor inputs -> tensor or tuple of tensors) to ONNX or .pt2.

Symbolic input dims (named strings in the input description) become dynamic dims of the export, so a model
uploaded with a dynamic batch or sequence keeps it.
"""

import inspect
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.errors import ErrorCode
from worker.errors import JobFailure


def example_args(inputs: list[dict[str, Any]], feeds: list[np.ndarray], device: str = "cpu") -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in feeds)


def dynamic_shapes(inputs: list[dict[str, Any]], module: torch.nn.Module) -> tuple | None:
    """torch.export dynamic-shape spec: one Dim per distinct symbol name, shared where names repeat.

    The spec mirrors the forward signature: a `forward(*tensors)` takes one tuple for all of its inputs.
    """
    dims: dict[str, Any] = {}
    spec = []
    for item in inputs:
        axes = {}
        for axis, dim in enumerate(item["shape"]):
            if isinstance(dim, str):
                name = re.sub(r"\W", "_", dim) or f"dim{axis}"
                if name[0].isdigit():
                    name = f"d_{name}"
                axes[axis] = dims.setdefault(name, torch.export.Dim.AUTO)
        spec.append(axes or None)
    if not dims:
        return None
    parameters = list(inspect.signature(module.forward).parameters.values())
    if len(parameters) == 1 and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (tuple(spec),)
    return tuple(spec)


def export_program(module: torch.nn.Module, inputs: list[dict[str, Any]], args: tuple) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes(inputs, module), strict=False)
    except Exception as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED,
                         f"torch.export failed: {exc.__class__.__name__}: {str(exc)[:300]}") from None


def to_pt2(module: torch.nn.Module, inputs: list[dict[str, Any]], args: tuple, path: Path) -> Path:
    torch.export.save(export_program(module, inputs, args), str(path))
    return path


def to_onnx(module: torch.nn.Module, inputs: list[dict[str, Any]], args: tuple, path: Path) -> Path:
    program = export_program(module, inputs, args)
    try:
        torch.onnx.export(program, args=args, f=str(path), dynamo=True, external_data=False, verbose=False,
                          input_names=[i["name"] for i in inputs])
    except Exception as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED, f"could not export the model to ONNX: {exc.__class__.__name__}: "
                                                  f"{str(exc)[:300]}") from None
    return path
