"""The files a job delivers besides its main model: the formats its `export` steps ask for, and the encoding of
the main file. Every file is loaded back (and, for models, run) before the job succeeds."""

import gzip
import shutil
from pathlib import Path
from typing import Any

import torch

from app.core.errors import ErrorCode
from app.core.recipe import ExportStep
from worker.compression.modules import DynamicInt8Linear, WeightOnlyLinear
from worker.errors import JobFailure
from worker.formats.loaded import hf_model_of
from worker.pipeline.files import Output
from worker.pipeline.job_run import JobRun, WorkingModel

SPARSE_ENCODING_BELOW = 0.9  # nonzero fraction under which a model file is delivered gzip-compressed


def export_formats(run: JobRun, state: WorkingModel, steps: list[ExportStep], workdir: Path) -> list[Output]:
    outputs = []
    for fmt in dict.fromkeys(f for step in steps for f in step.formats):
        run.ctx.check()
        if fmt == run.extension or (fmt == "onnx" and run.seq2seq):
            continue  # the main deliverable already is in this format (an encoder-decoder's: both graphs)
        if fmt == "onnx":
            path = run.onnx_form(state, workdir / "export.onnx")
            run.check_runs(path, "onnxruntime")
            outputs.append(Output("model", "onnx", path, "compressed.onnx"))
        elif state.module is None:
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, f"export format {fmt!r} needs the model in PyTorch "
                                                               "form; after an ONNX Runtime step only 'onnx' is "
                                                               "possible")
        elif fmt == "pt2":
            path = run.pt2_form(state, workdir / "export.pt2")
            run.check_runs(path, "pytorch")
            outputs.append(Output("model", "pt2", path, "compressed.pt2"))
        elif fmt == "safetensors":
            outputs.append(Output("model", "safetensors", _safetensors(state.module, workdir),
                                  "compressed.safetensors"))
        elif fmt == "hf":
            outputs.append(Output("model", "hf", _hf(run, state, workdir), "compressed-hf.zip"))
    return outputs


def _safetensors(module: torch.nn.Module, workdir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = workdir / "export.safetensors"
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(tensors, str(path))
    loaded = load_file(str(path))
    if set(loaded) != set(tensors) or any(not torch.equal(loaded[k], tensors[k]) for k in tensors):
        raise JobFailure(ErrorCode.EXPORT_FAILED, "the safetensors export did not load back identically")
    return path


def _hf(run: JobRun, state: WorkingModel, workdir: Path) -> Path:
    inner = hf_model_of(state.module)
    if run.loaded.hf is None or inner is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "export format 'hf' needs a Hugging Face model upload, "
                                                           "unquantized (pruned, distilled or fine-tuned is fine)")
    if any(isinstance(m, (WeightOnlyLinear, DynamicInt8Linear)) for m in state.module.modules()):
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "export format 'hf' is not available for quantized layers")
    from worker.formats import hf

    path = hf.save_hf(run.loaded.hf, inner, workdir / "export-hf")
    hf.verify_hf_zip(path, workdir / "verify-hf")
    return path


def encode(path: Path, figures: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Sparse weights only shrink a file once compressed: deliver it gzip-encoded then (it gunzips to the exact
    file measured here)."""
    if figures["params"] == 0 or figures["nonzero_params"] / figures["params"] >= SPARSE_ENCODING_BELOW:
        return path, {"encoding": None}
    packed = path.with_name(path.name + ".gz")
    with open(path, "rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
        shutil.copyfileobj(source, target)
    with gzip.open(packed, "rb") as check:
        if check.read() != path.read_bytes():
            raise JobFailure(ErrorCode.EXPORT_FAILED, "the compressed encoding did not round-trip")
    return packed, {"encoding": "gzip", "size_bytes": packed.stat().st_size,
                    "uncompressed_size_bytes": path.stat().st_size}
