"""torch.export archives (.pt2). Every pickled member is vetted before torch opens the file, because
torch.export.load falls back to unsafe unpickling when a safe load fails."""

from pathlib import Path
from typing import Any

import torch

from app.core.errors import ErrorCode
from app.core.vetting.pt2 import vet_pt2
from app.core.vetting.refusals import UnsupportedModelFile
from worker.compression.modules import count_weights, lift_layers
from worker.errors import JobFailure
from worker.formats.loaded import LoadedModel


def load_program(path: Path) -> torch.export.ExportedProgram:
    try:
        vet_pt2(path)
    except UnsupportedModelFile as exc:
        raise JobFailure(exc.code, exc.message) from None
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise JobFailure(ErrorCode.INVALID_MODEL, f"torch.export.load failed: {exc.__class__.__name__}: "
                                                  f"{str(exc)[:300]}") from None


def _dims(shape) -> list[int | str]:
    return [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in shape]


def describe_inputs(program: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    """User inputs from the graph's placeholders; symbolic (dynamic) dims are reported by name."""
    user_inputs = set(program.graph_signature.user_inputs)
    described = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                raise JobFailure(ErrorCode.UNSUPPORTED_MODEL,
                                 f"input {node.name!r} is not a tensor; only tensor inputs "
                                 "are supported")
            described.append({"name": node.name, "shape": _dims(value.shape),
                              "dtype": str(value.dtype).removeprefix("torch.")})
    return described


def dim_ranges(program: torch.export.ExportedProgram) -> dict[str, list[int | None]]:
    """The export's range of each symbolic dim, by the name the input descriptions use: [min, max or None]."""
    def bound(value) -> int | None:
        return int(value) if value.is_integer and abs(value) < 2 ** 62 else None

    return {str(symbol): [bound(limits.lower), bound(limits.upper)]
            for symbol, limits in program.range_constraints.items()}


def describe_outputs(program: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = output_node.args[0] if isinstance(output_node.args[0], (list, tuple)) else [output_node.args[0]]
    described = []
    for index, node in enumerate(values):
        value = getattr(node, "meta", {}).get("val")
        if isinstance(value, torch.Tensor):
            described.append({"name": f"output_{index}", "shape": _dims(value.shape),
                              "dtype": str(value.dtype).removeprefix("torch.")})
    return described


def load(path: Path) -> LoadedModel:
    program = load_program(path)
    inputs, outputs = describe_inputs(program), describe_outputs(program)
    module = lift_layers(program.module())
    params, nonzero = count_weights(module)
    ops: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            ops[str(node.target)] = ops.get(str(node.target), 0) + 1
    layers = [name for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    info = {"params": params, "nonzero_params": nonzero, "inputs": inputs, "outputs": outputs,
            "architecture": {"kind": "torch.export", "ops": ops, "layers": layers},
            "dim_ranges": dim_ranges(program)}
    return LoadedModel(format="pt2", inputs=inputs, outputs=outputs, module=module, info=info)
