"""Runs a recipe: load the model, measure the baseline, apply the steps in order, measure the result.

The model travels through the steps in torch form (pruning, pytorch-target quantization) for .pt2 and
Hugging Face uploads, and in ONNX form once an ONNX Runtime quantizer ran or when the upload was ONNX.
Baseline and compressed are measured by the same code, on the same inputs, with the target runtime.
Every delivered file is loaded back and run before the job succeeds.
"""

import gzip
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from app.config import Settings
from app.schemas.recipe import ExportStep, PruneStep, QuantizeStep, Recipe, Target
from worker.compression import prune, quantize, structured
from worker.compression.modules import DynamicInt8Linear, WeightOnlyLinear, count_weights
from worker.context import JobContext
from worker.errors import JobFailure
from worker.evaluation import data as job_data
from worker.evaluation import measure
from worker.formats import LoadedModel, load
from worker.formats.export import example_args, to_onnx, to_pt2
from worker.formats.onnx_format import count_params

SPARSE_ENCODING_BELOW = 0.9  # nonzero fraction under which a model file is delivered gzip-compressed
EXTENSIONS = {"onnxruntime": "onnx", "pytorch": "pt2"}


@dataclass
class Output:
    kind: str
    format: str
    path: Path
    filename: str


@dataclass
class PipelineResult:
    metrics: dict[str, Any]
    outputs: list[Output] = field(default_factory=list)


@dataclass
class WorkingModel:
    """The model between steps: a torch module until an ONNX-only step ran, then an ONNX file."""

    module: torch.nn.Module | None
    onnx_path: Path | None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self) -> tuple[int, int]:
        if self.module is not None:
            return count_weights(self.module)
        return count_params(onnx.load(str(self.onnx_path), load_external_data=False))


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


class Pipeline:
    def __init__(self, recipe: Recipe, target: Target, model_path: Path, model_format: str,
                 dataset_files: dict[str, tuple[Path, str]], workdir: Path, settings: Settings, ctx: JobContext):
        self.recipe, self.target, self.settings, self.ctx = recipe, target, settings, ctx
        self.model_path, self.model_format = model_path, model_format
        self.dataset_files, self.workdir = dataset_files, workdir
        self.device = target.device
        self.runtime = target.runtime

    # --- helpers -------------------------------------------------------------------------------------------

    def _file(self, state: WorkingModel, name: str) -> Path:
        """Write the model in the target runtime's format."""
        path = self.workdir / f"{name}.{EXTENSIONS[self.runtime]}"
        if self.runtime == "onnxruntime":
            if state.module is None:
                shutil.copyfile(state.onnx_path, path)
                return path
            return to_onnx(state.module, self.loaded.inputs, self.example, path)
        if state.module is None:
            raise JobFailure("unsupported_for_format", "target.runtime 'pytorch' needs a PyTorch model (.pt2 or "
                                                       "Hugging Face); this model is only available as ONNX")
        return to_pt2(state.module, self.loaded.inputs, self.example, path)

    def _evaluate(self, path: Path, state: WorkingModel, label: str) -> tuple[dict[str, Any], list]:
        self.ctx.check()
        latency, outputs = measure.measure_file(path, self.runtime, self.device, self.settings.eval_threads,
                                                self.data.eval_batches, self.settings.latency_warmup,
                                                self.settings.latency_runs, self.ctx.check)
        params, nonzero = state.weights()
        figures = {"size_bytes": path.stat().st_size, "params": params, "nonzero_params": nonzero,
                   "latency_ms": latency, "accuracy": job_data.accuracy(outputs, self.data.eval_labels)}
        return figures, outputs

    # --- steps ---------------------------------------------------------------------------------------------

    def _onnx_form(self, state: WorkingModel, index: int) -> Path:
        if state.module is None:
            return state.onnx_path
        return to_onnx(state.module, self.loaded.inputs, self.example, self.workdir / f"step{index}-input.onnx")

    def _quantize(self, state: WorkingModel, step: QuantizeStep, index: int) -> dict:
        if self.runtime == "onnxruntime":
            source = self._onnx_form(state, index)
            output = self.workdir / f"step{index}-quantize.onnx"
            details = quantize.quantize_onnx(source, output, step, self.data.calibration)
            state.module, state.onnx_path = None, output
            return details
        state.module, details = quantize.quantize_module(state.module, step)
        return details

    def _prune(self, state: WorkingModel, step: PruneStep, index: int) -> dict:
        if state.module is None:
            output = self.workdir / f"step{index}-prune.onnx"
            details = prune.prune_onnx(state.onnx_path, output, step)
            state.onnx_path = output
            details["per_layer"] = prune.onnx_layer_sparsity(output)
            return details
        if step.method == "structured":
            if self.loaded.hf is not None:
                details = structured.prune_transformer_ffn(self.loaded.hf.model, step)
            elif isinstance(state.module, torch.fx.GraphModule):
                details = structured.prune_graph_channels(state.module, step)
            else:
                raise JobFailure("unsupported_model", "structured pruning is not supported for this model")
        else:
            calibration = None
            if self.data.calibration:
                calibration = [example_args(self.loaded.inputs, b, self.device) for b in self.data.calibration]
            masks, details = prune.prune_unstructured(state.module, step, calibration, self.ctx.check)
            state.masks.update(masks)
        details["per_layer"] = prune.layer_sparsity(state.module)
        return details

    # --- exports -------------------------------------------------------------------------------------------

    def _exports(self, state: WorkingModel, step: ExportStep, stem: str) -> list[Output]:
        outputs = []
        for fmt in step.formats:
            self.ctx.check()
            if fmt == EXTENSIONS[self.runtime]:
                continue  # the main deliverable already is in this format
            if fmt == "onnx":
                path = self._onnx_form(state, 99)
                measure.measure_file(path, "onnxruntime", self.device, 1, self.data.eval_batches[:1], 0, 1,
                                     self.ctx.check)
                outputs.append(Output("model", "onnx", path, f"{stem}.onnx"))
            elif state.module is None:
                raise JobFailure("unsupported_for_format", f"export format {fmt!r} needs the model in PyTorch "
                                                           "form; after an ONNX Runtime step only 'onnx' is possible")
            elif fmt == "pt2":
                path = to_pt2(state.module, self.loaded.inputs, self.example, self.workdir / "export.pt2")
                measure.measure_file(path, "pytorch", self.device, 1, self.data.eval_batches[:1], 0, 1, self.ctx.check)
                outputs.append(Output("model", "pt2", path, f"{stem}.pt2"))
            elif fmt == "safetensors":
                outputs.append(Output("model", "safetensors", self._safetensors(state.module), f"{stem}.safetensors"))
            elif fmt == "hf":
                outputs.append(Output("model", "hf", self._hf(state), f"{stem}-hf.zip"))
        return outputs

    def _safetensors(self, module: torch.nn.Module) -> Path:
        from safetensors.torch import load_file, save_file

        path = self.workdir / "export.safetensors"
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
        save_file(tensors, str(path))
        loaded = load_file(str(path))
        if set(loaded) != set(tensors) or any(not torch.equal(loaded[k], tensors[k]) for k in tensors):
            raise JobFailure("export_failed", "the safetensors export did not load back identically")
        return path

    def _hf(self, state: WorkingModel) -> Path:
        if self.loaded.hf is None:
            raise JobFailure("unsupported_for_format", "export format 'hf' needs a Hugging Face model upload")
        quantized = (WeightOnlyLinear, DynamicInt8Linear, quantize.CastIO)
        if any(isinstance(m, quantized) for m in state.module.modules()):
            raise JobFailure("unsupported_for_format", "export format 'hf' is available for pruned or unchanged "
                                                       "Hugging Face models, not for quantized layers")
        from worker.formats import hf

        path = hf.save_hf(self.loaded.hf, self.loaded.hf.model, self.workdir / "export-hf")
        hf.verify_hf_zip(path, self.workdir / "verify-hf")
        return path

    # --- the run -------------------------------------------------------------------------------------------

    def run(self) -> PipelineResult:
        ctx = self.ctx
        ctx.progress(0.05, "load", f"loading the {self.model_format} model")
        self.loaded: LoadedModel = load(self.model_path, self.model_format, self.workdir)
        if self.loaded.module is not None and self.device == "cuda":
            self.loaded.module.to("cuda")
        self.data = job_data.prepare(self.loaded, self.dataset_files)
        self.example = example_args(self.loaded.inputs, self.data.eval_batches[0], self.device)
        ctx.progress(0.1, "measure", "running the original model")
        reference = [self.loaded.reference(batch, self.device) for batch in self.data.eval_batches]

        state = WorkingModel(module=self.loaded.module, onnx_path=self.loaded.onnx_path)
        ctx.progress(0.15, "measure", "measuring the baseline")
        baseline_path = self._file(state, "baseline")
        baseline, baseline_outputs = self._evaluate(baseline_path, state, "baseline")

        steps: list[dict[str, Any]] = []
        exports: list[ExportStep] = []
        for index, step in enumerate(self.recipe.steps):
            ctx.progress(0.3 + 0.5 * index / len(self.recipe.steps), step.op,
                         f"step {index + 1}/{len(self.recipe.steps)}: {step.op}")
            started = time.perf_counter()
            if isinstance(step, QuantizeStep):
                details = self._quantize(state, step, index)
            elif isinstance(step, PruneStep):
                details = self._prune(state, step, index)
            else:
                exports.append(step)
                details = {"formats": step.formats}
            params, nonzero = state.weights()
            steps.append({"op": step.op, "seconds": round(time.perf_counter() - started, 3), "params": params,
                          "nonzero_params": nonzero, "details": details})
            ctx.check()

        ctx.progress(0.85, "measure", "measuring the compressed model")
        final_path = self._file(state, "compressed")
        compressed, outputs = self._evaluate(final_path, state, "compressed")
        stem = Path(self.model_path.name).stem
        delivered, encoding = self._encode(final_path, compressed)
        compressed.update(encoding)
        main = Output("model", EXTENSIONS[self.runtime], delivered,
                      f"compressed.{EXTENSIONS[self.runtime]}" + (".gz" if delivered != final_path else ""))
        extra = [o for step in exports for o in self._exports(state, step, "compressed")]
        metrics = {
            "baseline": baseline,
            "compressed": compressed,
            "compression_ratio": _ratio(baseline["size_bytes"], compressed["size_bytes"]),
            "speedup": _ratio(baseline["latency_ms"]["p50"], compressed["latency_ms"]["p50"]),
            "fidelity": measure.fidelity(reference, outputs),
            "steps": steps,
            "source": {"format": self.model_format, "size_bytes": self.model_path.stat().st_size,
                       "baseline_is": f"the uploaded model as {EXTENSIONS[self.runtime]} for {self.runtime}",
                       "baseline_fidelity_to_original": measure.fidelity(reference, baseline_outputs)},
            "evaluation": self.data.description,
            "environment": {"device": self.device, "threads": self.settings.eval_threads, "runtime": self.runtime,
                            "onnxruntime": ort.__version__, "torch": torch.__version__,
                            "python": platform.python_version(), "machine": platform.machine()},
        }
        if metrics["speedup"] < 1:
            metrics["notes"] = [f"the compressed model is slower than the baseline on this device "
                                f"({self.device}, {self.runtime}): it is smaller, not faster"]
        return PipelineResult(metrics=metrics, outputs=[main, *extra])

    def _encode(self, path: Path, figures: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """Sparse weights only shrink a file once compressed: deliver it gzip-encoded then (it gunzips to the
        exact file measured here)."""
        if figures["params"] == 0 or figures["nonzero_params"] / figures["params"] >= SPARSE_ENCODING_BELOW:
            return path, {"encoding": None}
        packed = path.with_name(path.name + ".gz")
        with open(path, "rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
            shutil.copyfileobj(source, target)
        with gzip.open(packed, "rb") as check:
            if check.read() != path.read_bytes():
                raise JobFailure("export_failed", "the compressed encoding did not round-trip")
        return packed, {"encoding": "gzip", "size_bytes": packed.stat().st_size,
                        "uncompressed_size_bytes": path.stat().st_size}
