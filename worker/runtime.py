"""Running models: ONNX Runtime sessions and torch modules on a device. One place decides providers, devices
and threads, for loading, measuring and evaluating alike."""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from app.core.errors import ErrorCode
from worker.errors import JobFailure


def providers_for(device: str) -> list[str]:
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise JobFailure(ErrorCode.CUDA_UNAVAILABLE, "the job targets cuda but this worker's ONNX Runtime has no "
                                                         "CUDA execution provider (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: Path, device: str, threads: int = 1, optimize: bool = True) -> ort.InferenceSession:
    """`optimize=False` only opens the graph: no constant folding, so a tiny file cannot make the session
    materialise a huge constant just to be described."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=providers_for(device))


def run_onnx(session: ort.InferenceSession, feeds: list[np.ndarray]) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, dict(zip(names, feeds, strict=True)))
    return [np.asarray(o, dtype=np.float32) for o in outputs]


def intermediate_values(source: Path, tensors: list[str],
                        batches: list[list[np.ndarray]]) -> Iterator[tuple[list[np.ndarray], dict[str, np.ndarray]]]:
    """(feeds, {tensor: value}) per batch: the model run with the named inner tensors as extra outputs, which
    is how calibration passes see a layer's inputs."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    outputs = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = source.with_suffix(".probe.onnx")
    onnx.save(model, str(probe))
    try:
        session = ort_session(probe, "cpu")
        names = [o.name for o in session.get_outputs()]
        for feeds in batches:
            yield feeds, dict(zip(names, run_onnx(session, feeds)))
    finally:
        probe.unlink(missing_ok=True)


def run_module(module: torch.nn.Module, feeds: list[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*[torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in feeds])
    flat = result if isinstance(result, (list, tuple)) else [result]
    return [t.detach().float().cpu().numpy() for t in flat if isinstance(t, torch.Tensor)]


def open_runner(path: Path, runtime: str, device: str, threads: int) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A function feeds -> outputs for a model file, loaded the way a user of that runtime would load it."""
    if runtime == "onnxruntime":
        session = ort_session(path, device, threads)
        return lambda feeds: run_onnx(session, feeds)
    torch.set_num_threads(threads)
    module = torch.export.load(str(path)).module().to(device)
    return lambda feeds: run_module(module, feeds, device)
