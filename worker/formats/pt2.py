"""torch.export archives (.pt2). Every pickled member is vetted before torch opens the file, because
torch.export.load falls back to unsafe unpickling when a safe load fails."""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.modelfiles import UnsupportedModelFile, vet_pt2
from worker.errors import JobFailure


def load_program(path: Path) -> torch.export.ExportedProgram:
    try:
        vet_pt2(path)
    except UnsupportedModelFile as exc:
        raise JobFailure(exc.code, exc.message) from None
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise JobFailure("invalid_model", f"torch.export.load failed: {exc.__class__.__name__}: "
                                          f"{str(exc)[:300]}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_inputs(program: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    """User inputs from the graph's placeholders; symbolic (dynamic) dims are reported by name."""
    user_inputs = set(program.graph_signature.user_inputs)
    described = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                raise JobFailure("unsupported_model", f"input {node.name!r} is not a tensor; only tensor inputs "
                                                      "are supported")
            shape = [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in value.shape]
            described.append({"name": node.name, "shape": shape, "dtype": _dtype_name(value.dtype)})
    return described


def describe_outputs(program: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = output_node.args[0] if isinstance(output_node.args[0], (list, tuple)) else [output_node.args[0]]
    described = []
    for index, node in enumerate(values):
        value = getattr(node, "meta", {}).get("val")
        if isinstance(value, torch.Tensor):
            shape = [int(d) if str(d).isdigit() else str(d) for d in value.shape]
            described.append({"name": f"output_{index}", "shape": shape, "dtype": _dtype_name(value.dtype)})
    return described


def inspect(path: Path) -> dict[str, Any]:
    program = load_program(path)
    state = program.state_dict
    params = sum(t.numel() for name, t in state.items() if name in program.graph_signature.parameters)
    buffers = sum(t.numel() for name, t in state.items() if name not in program.graph_signature.parameters)
    nonzero = sum(int(torch.count_nonzero(t)) for t in state.values())
    ops: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            ops[name] = ops.get(name, 0) + 1
    return {"params": params, "buffers": buffers, "nonzero_params": nonzero, "inputs": describe_inputs(program),
            "outputs": describe_outputs(program), "architecture": {"kind": "torch.export", "ops": ops}}


def _to_torch(array: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def load_source(path: Path, workdir: Path, device: str):
    from worker.evaluation.inputs import generate_feeds
    from worker.formats import SourceModel

    program = load_program(path)
    inputs = describe_inputs(program)
    module = program.module()
    if device == "cuda":
        module = module.to("cuda")
    example = tuple(_to_torch(a, "cpu") for a in generate_feeds(inputs, batches=1, seed=1)[0])
    onnx_path = workdir / "baseline.onnx"
    try:
        torch.onnx.export(program, args=example, f=str(onnx_path), dynamo=True, external_data=False,
                          verbose=False)
    except Exception as exc:
        raise JobFailure("export_failed", f"could not export the model to ONNX: {exc.__class__.__name__}: "
                                          f"{str(exc)[:300]}") from None

    def reference(feeds: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            result = module(*[_to_torch(a, device) for a in feeds])
        flat = result if isinstance(result, (list, tuple)) else [result]
        return [t.detach().float().cpu().numpy() for t in flat if isinstance(t, torch.Tensor)]

    return SourceModel(format="pt2", onnx_path=onnx_path, inputs=inputs, outputs=describe_outputs(program),
                       reference=reference)
