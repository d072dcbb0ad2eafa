"""The files a job delivers besides its main model: the formats its `export` steps ask for, and the encoding of
the main file. Every file is loaded back (and, for models, run) before the job succeeds.

The weights of a sparse model's `safetensors` export are written in compressed-tensors' sparse-bitmask layout
(worker.formats.sparse_safetensors), so the file itself is smaller; `safetensors-dense` is the plain layout. The `hf`
directory keeps plain weights: transformers 5 needs compressed-tensors >= 0.15, which no longer reads that layout,
and `from_pretrained` would then leave the sparse weights newly initialised with only a warning."""

import gzip
import shutil
from pathlib import Path
from typing import Any

from app.core.errors import ErrorCode
from app.core.recipe import ExportStep
from worker.compression.modules import DynamicInt8Linear, WeightOnlyLinear
from worker.errors import JobFailure
from worker.formats import sparse_safetensors
from worker.formats.loaded import hf_model_of
from worker.pipeline.files import Output
from worker.pipeline.job_run import JobRun, WorkingModel

SPARSE_ENCODING_BELOW = 0.9  # nonzero fraction under which a model file is delivered gzip-compressed
SPARSE_LOADING = ("compressed-tensors' sparse-bitmask layout (config in the safetensors metadata key "
                  "'quantization_config'): each sparse '<module>.weight' is stored as "
                  "<module>.shape, .compressed (nonzero values), .bitmask (numpy.packbits, bitorder little) and "
                  ".row_offsets. Load with compressed-tensors 0.12: BitmaskCompressor(BitmaskConfig(**config"
                  "['sparsity_config'])).decompress(path) yields the dense tensors. Ask for 'safetensors-dense' "
                  "for the plain layout.")


def export_formats(run: JobRun, state: WorkingModel, steps: list[ExportStep],
                   workdir: Path) -> tuple[list[Output], dict[str, Any]]:
    """The exported files, and for the report what layout each weights file has and how to load it."""
    outputs, layouts = [], {}
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
        elif fmt in ("safetensors", "safetensors-dense"):
            dense = fmt == "safetensors-dense"
            path = workdir / f"export{'-dense' if dense else ''}.safetensors"
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.module.state_dict().items()}
            config = sparse_safetensors.save(tensors, path, sparse=not dense)
            outputs.append(Output("model", fmt, path, f"compressed{'-dense' if dense else ''}.safetensors"))
            layouts[fmt] = _layout(config, path)
        elif fmt == "hf":
            path, config = _hf(run, state, workdir)
            outputs.append(Output("model", "hf", path, "compressed-hf.zip"))
            layouts[fmt] = _layout(config, path)
    return outputs, layouts


def _layout(config: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    if config is None:
        return {"layout": "dense", "size_bytes": path.stat().st_size}
    sparsity = config["sparsity_config"]
    return {"layout": sparse_safetensors.FORMAT, "sparsity_structure": sparsity["sparsity_structure"],
            "global_sparsity": sparsity["global_sparsity"], "sparse_weights": len(sparsity["targets"]),
            "size_bytes": path.stat().st_size, "how_to_load": SPARSE_LOADING}


def _hf(run: JobRun, state: WorkingModel, workdir: Path) -> tuple[Path, dict[str, Any] | None]:
    inner = hf_model_of(state.module)
    if run.loaded.hf is None or inner is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "export format 'hf' needs a Hugging Face model upload, "
                                                           "unquantized (pruned, distilled or fine-tuned is fine)")
    if any(isinstance(m, (WeightOnlyLinear, DynamicInt8Linear)) for m in state.module.modules()):
        raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "export format 'hf' is not available for quantized layers")
    from worker.formats import hf

    path, config = hf.save_hf(run.loaded.hf, inner, workdir / "export-hf")
    hf.verify_hf_zip(path, workdir / "verify-hf")
    return path, config


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
