"""Runs a job: load the model, measure the baseline, apply a recipe (or tune one), measure the result.

The model travels through the steps in torch form (pruning, training, pytorch-target quantization) for .pt2
and Hugging Face uploads, and in ONNX form once an ONNX Runtime quantizer ran or when the upload was ONNX.
Baseline, every step and the result are measured by the same code, on the same inputs, with the target
runtime. Every delivered file is loaded back and run before the job succeeds.
"""

import copy
import gzip
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from app.core.config import Settings
from app.core.errors import ErrorCode
from app.core.recipe import (
    AnalyzeStep,
    DatasetRefs,
    DistillStep,
    ExportStep,
    FinetuneStep,
    PruneStep,
    QuantizeStep,
    Recipe,
    Target,
    TuneSpec,
    check_recipe_for_model,
    check_recipe_for_target,
)
from worker.compression import prune, quantize, structured, train
from worker.compression.modules import (
    DynamicInt8Linear,
    WeightOnlyLinear,
    count_weights,
)
from worker.errors import JobFailure
from worker.evaluation import analysis, measure
from worker.evaluation import data as job_data
from worker.formats import load
from worker.formats.export import example_args, to_onnx, to_pt2
from worker.formats.loaded import LoadedModel
from worker.formats.onnx_format import count_params
from worker.pipeline import tuning

SPARSE_ENCODING_BELOW = 0.9  # nonzero fraction under which a model file is delivered gzip-compressed
EXTENSIONS = {"onnxruntime": "onnx", "pytorch": "pt2"}
MODIFYING = (QuantizeStep, PruneStep, DistillStep, FinetuneStep)


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


@dataclass
class Applied:
    """A recipe's outcome: the final file in the target format, its figures and outputs, per-step records."""

    path: Path
    figures: dict[str, Any]
    outputs: list
    steps: list[dict[str, Any]]
    state: WorkingModel
    exports: list[ExportStep]
    analysis: dict[str, Any] | None = None


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def hf_model_of(module: torch.nn.Module | None):
    """The transformers model inside a Hugging Face adapter module, if it is one."""
    inner = getattr(module, "model", None)
    return inner if inner is not None and hasattr(inner, "save_pretrained") else None


class Pipeline:
    def __init__(self, recipe: Recipe | None, target: Target, model_path: Path, model_format: str,
                 dataset_files: dict[str, tuple[Path, str]], workdir: Path, settings: Settings, ctx,
                 *, tune: TuneSpec | None = None, student_files: dict[str, tuple[Path, str]] | None = None,
                 deadline: float | None = None):
        self.recipe, self.target, self.tune_spec, self.settings, self.ctx = recipe, target, tune, settings, ctx
        self.model_path, self.model_format = model_path, model_format
        self.dataset_files, self.workdir = dataset_files, workdir
        self.student_files = student_files or {}
        self.deadline = deadline
        self.device, self.runtime = target.device, target.runtime

    # --- files and measurement -----------------------------------------------------------------------------

    def _file(self, state: WorkingModel, path_stem: Path) -> Path:
        """Write the model in the target runtime's format."""
        path = path_stem.with_name(f"{path_stem.name}.{EXTENSIONS[self.runtime]}")
        if self.runtime == "onnxruntime":
            if state.module is None:
                shutil.copyfile(state.onnx_path, path)
                return path
            return to_onnx(state.module, self.loaded.inputs, self.example, path)
        if state.module is None:
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "target.runtime 'pytorch' needs a PyTorch model (.pt2 or "
                                                       "Hugging Face); this model is only available as ONNX")
        return to_pt2(state.module, self.loaded.inputs, self.example, path)

    def _evaluate(self, path: Path, state: WorkingModel) -> tuple[dict[str, Any], list]:
        self.ctx.check()
        latency, outputs = measure.measure_file(path, self.runtime, self.device, self.settings.eval_threads,
                                                self.data.eval_batches, self.settings.latency_warmup,
                                                self.settings.latency_runs, self.ctx.check)
        params, nonzero = state.weights()
        figures = {"size_bytes": path.stat().st_size, "params": params, "nonzero_params": nonzero,
                   "latency_ms": latency, "accuracy": job_data.accuracy(outputs, self.data.eval_labels)}
        return figures, outputs

    def _onnx_form(self, state: WorkingModel, path: Path) -> Path:
        if state.module is None:
            return state.onnx_path
        return to_onnx(state.module, self.loaded.inputs, self.example, path)

    # --- steps ---------------------------------------------------------------------------------------------

    def _quantize(self, state: WorkingModel, step: QuantizeStep, workdir: Path, index: int) -> dict:
        if self.runtime == "onnxruntime":
            source = self._onnx_form(state, workdir / f"step{index}-input.onnx")
            output = workdir / f"step{index}-quantize.onnx"
            details = quantize.quantize_onnx(source, output, step, self.data.calibration)
            state.module, state.onnx_path = None, output
            return details
        state.module, details = quantize.quantize_module(state.module, step)
        return details

    def _prune(self, state: WorkingModel, step: PruneStep, workdir: Path, index: int) -> dict:
        if state.module is None:
            output = workdir / f"step{index}-prune.onnx"
            details = prune.prune_onnx(state.onnx_path, output, step)
            state.onnx_path = output
            details["per_layer"] = prune.onnx_layer_sparsity(output)
            return details
        if step.method == "structured":
            if hf_model_of(state.module) is not None:
                details = structured.prune_transformer_ffn(hf_model_of(state.module), step)
            elif isinstance(state.module, torch.fx.GraphModule):
                details = structured.prune_graph_channels(state.module, step)
            else:
                raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, "structured pruning is not supported for this model")
            state.masks = {}  # shapes changed: earlier masks no longer apply
        else:
            calibration = None
            if self.data.calibration:
                calibration = [example_args(self.loaded.inputs, b, self.device) for b in self.data.calibration]
            masks, details = prune.prune_unstructured(state.module, step, calibration, self.ctx.check)
            state.masks.update(masks)
        details["per_layer"] = prune.layer_sparsity(state.module)
        return details

    def _training_inputs(self, step) -> dict[str, Any]:
        """Keyword arguments shared by distill and finetune: device, fixed batch size, progress, limits."""
        if self.data.train is None:
            raise JobFailure(ErrorCode.INVALID_RECIPE, f"{step.op} needs a train dataset")
        size, static = job_data.batch_size(self.loaded.inputs)

        def on_epoch(epoch: int, record: dict) -> None:
            loss = record.get("train_loss")
            self.ctx.progress(self._fraction, step.op, f"{step.op} epoch {epoch}/{step.epochs}: train loss "
                                                       f"{loss:.4f}" + (f", val loss {record['val_loss']:.4f}"
                                                                        if record.get("val_loss") is not None else ""))

        options = {"device": self.device, "static_batch": size if static else None, "on_epoch": on_epoch,
                   "check": self.ctx.check, "deadline": self.deadline}
        return options

    def _finetune(self, state: WorkingModel, step: FinetuneStep, recipe: Recipe, index: int) -> dict:
        if state.module is None:
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "finetune needs the model in PyTorch form")
        bits = None
        if step.quantization_aware:
            following = next((s for s in recipe.steps[index + 1:] if isinstance(s, QuantizeStep)), None)
            bits = 4 if following is not None and following.dtype == "int4" else 8
        config = train.TrainConfig(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size, fake_quant_bits=bits)
        result = train.finetune(state.module, self.data.train, self.data.val, config, masks=state.masks or None,
                                **self._training_inputs(step))
        return {"epochs": result.history, "best_epoch": result.best_epoch, "stopped": result.stopped,
                "masks_kept": len(state.masks), "quantization_aware_bits": bits}

    def _distill(self, state: WorkingModel, step: DistillStep) -> dict:
        if state.module is None:
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "distill needs the teacher in PyTorch form")
        teacher = state.module
        if step.student.shrink is not None:
            hf = None
            if hf_model_of(teacher) is not None:
                hf = copy.copy(self.loaded.hf)
                hf.model, hf.module = hf_model_of(teacher), teacher
            student, details = train.shrink_student(teacher, step.student.shrink.depth, step.student.shrink.width,
                                                    hf=hf)
        else:
            path, fmt = self.student_files[step.student.model_id]
            other = load(path, fmt, self.workdir / f"student-{step.student.model_id}")
            if [(i["name"], i["dtype"]) for i in other.inputs] != [(i["name"], i["dtype"]) for i in self.loaded.inputs]:
                raise JobFailure(ErrorCode.INVALID_RECIPE, "student.model_id: the student's inputs "
                                                   f"{[i['name'] for i in other.inputs]} differ from the teacher's "
                                                   f"{[i['name'] for i in self.loaded.inputs]}")
            student, details = other.module, {"student": step.student.model_id}
        if self.device == "cuda":
            student.to("cuda")
        config = train.TrainConfig(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size,
                                   temperature=step.temperature, alpha=step.alpha, hidden_weight=step.hidden_weight)
        result = train.distill(teacher, student, self.data.train, self.data.val, config, **self._training_inputs(step))
        state.module, state.masks = student, {}
        teacher_params, student_params = count_weights(teacher)[0], count_weights(student)[0]
        return {**details, "teacher_params": teacher_params, "student_params": student_params,
                "epochs": result.history, "best_epoch": result.best_epoch, "stopped": result.stopped}

    def _analyze(self, state: WorkingModel, step: AnalyzeStep) -> dict:
        batches = self.data.eval_batches[:4]
        if state.module is not None:
            return analysis.analyze_module(state.module, [example_args(self.loaded.inputs, b, self.device)
                                                          for b in batches], self.ctx.check, bins=step.bins)
        return analysis.analyze_onnx(state.onnx_path, batches, self.ctx.check, bins=step.bins)

    def _apply(self, recipe: Recipe, state: WorkingModel, workdir: Path, measure_steps: bool) -> Applied:
        """Run the steps in order; with `measure_steps`, measure the model after every step that changes it."""
        steps: list[dict[str, Any]] = []
        exports: list[ExportStep] = []
        last_file: tuple[Path, dict, list] | None = None
        report_analysis = None
        for index, step in enumerate(recipe.steps):
            self._fraction = 0.3 + 0.5 * index / len(recipe.steps)
            self.ctx.progress(self._fraction, step.op, f"step {index + 1}/{len(recipe.steps)}: {step.op}")
            started = time.perf_counter()
            if isinstance(step, QuantizeStep):
                details = self._quantize(state, step, workdir, index)
            elif isinstance(step, PruneStep):
                details = self._prune(state, step, workdir, index)
            elif isinstance(step, FinetuneStep):
                details = self._finetune(state, step, recipe, index)
            elif isinstance(step, DistillStep):
                details = self._distill(state, step)
            elif isinstance(step, AnalyzeStep):
                details = report_analysis = self._analyze(state, step)
            else:
                exports.append(step)
                details = {"formats": step.formats}
            record: dict[str, Any] = {"op": step.op, "seconds": round(time.perf_counter() - started, 3)}
            if isinstance(step, MODIFYING):
                last_file = None
                if measure_steps:
                    path = self._file(state, workdir / f"after-step{index}")
                    figures, outputs = self._evaluate(path, state)
                    record.update(figures, fidelity=measure.fidelity(self.reference, outputs))
                    last_file = (path, figures, outputs)
                else:
                    record["params"], record["nonzero_params"] = state.weights()
            record["details"] = details
            steps.append(record)
            self.ctx.check()
        if last_file is None:
            path = self._file(state, workdir / "compressed")
            figures, outputs = self._evaluate(path, state)
            last_file = (path, figures, outputs)
        return Applied(*last_file, steps=steps, state=state, exports=exports, analysis=report_analysis)

    # --- exports -------------------------------------------------------------------------------------------

    def _exports(self, state: WorkingModel, steps: list[ExportStep], workdir: Path) -> list[Output]:
        outputs = []
        for fmt in dict.fromkeys(f for step in steps for f in step.formats):
            self.ctx.check()
            if fmt == EXTENSIONS[self.runtime]:
                continue  # the main deliverable already is in this format
            if fmt == "onnx":
                path = self._onnx_form(state, workdir / "export.onnx")
                measure.measure_file(path, "onnxruntime", self.device, 1, self.data.eval_batches[:1], 0, 1,
                                     self.ctx.check)
                outputs.append(Output("model", "onnx", path, "compressed.onnx"))
            elif state.module is None:
                raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, f"export format {fmt!r} needs the model in PyTorch "
                                                           "form; after an ONNX Runtime step only 'onnx' is possible")
            elif fmt == "pt2":
                path = to_pt2(state.module, self.loaded.inputs, self.example, workdir / "export.pt2")
                measure.measure_file(path, "pytorch", self.device, 1, self.data.eval_batches[:1], 0, 1, self.ctx.check)
                outputs.append(Output("model", "pt2", path, "compressed.pt2"))
            elif fmt == "safetensors":
                outputs.append(Output("model", "safetensors", self._safetensors(state.module, workdir),
                                      "compressed.safetensors"))
            elif fmt == "hf":
                outputs.append(Output("model", "hf", self._hf(state, workdir), "compressed-hf.zip"))
        return outputs

    def _safetensors(self, module: torch.nn.Module, workdir: Path) -> Path:
        from safetensors.torch import load_file, save_file

        path = workdir / "export.safetensors"
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
        save_file(tensors, str(path))
        loaded = load_file(str(path))
        if set(loaded) != set(tensors) or any(not torch.equal(loaded[k], tensors[k]) for k in tensors):
            raise JobFailure(ErrorCode.EXPORT_FAILED, "the safetensors export did not load back identically")
        return path

    def _hf(self, state: WorkingModel, workdir: Path) -> Path:
        inner = hf_model_of(state.module)
        if self.loaded.hf is None or inner is None:
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "export format 'hf' needs a Hugging Face model upload, "
                                                       "unquantized (pruned, distilled or fine-tuned is fine)")
        if any(isinstance(m, (WeightOnlyLinear, DynamicInt8Linear)) for m in state.module.modules()):
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "export format 'hf' is not available for quantized layers")
        from worker.formats import hf

        path = hf.save_hf(self.loaded.hf, inner, workdir / "export-hf")
        hf.verify_hf_zip(path, workdir / "verify-hf")
        return path

    # --- tuning --------------------------------------------------------------------------------------------

    def _tune(self, spec: TuneSpec, baseline: dict[str, Any], baseline_fidelity: float) -> tuple[Applied, dict]:
        user = ([self.recipe] if self.recipe else []) + list(spec.search or [])
        layer_names = [n for n, m in (self.loaded.module.named_modules() if self.loaded.module is not None else [])
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        generated = tuning.candidate_recipes([r.model_dump(mode="json") for r in user] or None,
                                             has_calibration=self.data.calibration is not None,
                                             model_kind="onnx" if self.model_format == "onnx" else "torch",
                                             layer_names=layer_names)
        datasets = DatasetRefs(**{role: "given" for role in self.dataset_files})
        candidates = []
        for recipe in generated:
            try:
                parsed = Recipe.model_validate(recipe)
                check_recipe_for_target(parsed, self.target, datasets)
                check_recipe_for_model(parsed, self.target, self.model_format)
                candidates.append(recipe)
            except ValueError:
                continue  # a generated candidate this model or target cannot take
        if spec.metric == "accuracy":
            if baseline["accuracy"] is None:
                raise JobFailure(ErrorCode.INVALID_DATASET, "tune.metric 'accuracy' needs an eval dataset with labels")
            baseline_metric = baseline["accuracy"]
        else:
            baseline_metric = baseline_fidelity
        applied: dict[int, Applied] = {}

        def run_trial(recipe: dict) -> tuple[int, float, float]:
            index = len(applied)
            trial_dir = self.workdir / f"trial{index}"
            trial_dir.mkdir()
            state = WorkingModel(module=copy.deepcopy(self.loaded.module), onnx_path=self.loaded.onnx_path)
            self.ctx.progress(0.3, "tune", f"trial {index + 1}: {[s['op'] for s in recipe['steps']]}")
            result = self._apply(Recipe.model_validate(recipe), state, trial_dir, measure_steps=False)
            applied[index] = result
            fidelity = measure.fidelity(self.reference, result.outputs)
            result.figures["fidelity"] = fidelity
            metric = result.figures["accuracy"] if spec.metric == "accuracy" else fidelity["cosine_mean"]
            return result.figures["size_bytes"], result.figures["latency_ms"]["p50"], metric

        outcome = tuning.tune(candidates, run_trial, baseline_metric=baseline_metric, max_loss=spec.max_loss,
                              objective=spec.objective, max_trials=spec.max_trials, time_budget_s=spec.time_budget_s,
                              check=self.ctx.check)
        if outcome["best"] is None:
            raise JobFailure(ErrorCode.TUNING_FAILED, outcome["message"])
        for index, result in applied.items():
            if index != outcome["best"]:
                shutil.rmtree(self.workdir / f"trial{index}", ignore_errors=True)
        best = applied[outcome["best"]]
        best.figures.pop("fidelity", None)
        return best, outcome

    # --- the run -------------------------------------------------------------------------------------------

    def run(self) -> PipelineResult:
        ctx = self.ctx
        self._fraction = 0.0
        ctx.progress(0.05, "load", f"loading the {self.model_format} model")
        self.loaded: LoadedModel = load(self.model_path, self.model_format, self.workdir)
        if self.loaded.module is not None and self.device == "cuda":
            self.loaded.module.to("cuda")
        self.data = job_data.prepare(self.loaded, self.dataset_files)
        self.example = example_args(self.loaded.inputs, self.data.eval_batches[0], self.device)
        ctx.progress(0.1, "measure", "running the original model")
        self.reference = [self.loaded.reference(batch, self.device) for batch in self.data.eval_batches]

        ctx.progress(0.15, "measure", "measuring the baseline")
        base_state = WorkingModel(module=self.loaded.module, onnx_path=self.loaded.onnx_path)
        baseline_path = self._file(base_state, self.workdir / "baseline")
        baseline, baseline_outputs = self._evaluate(baseline_path, base_state)
        baseline_fidelity = measure.fidelity(self.reference, baseline_outputs)

        tuning_report = None
        if self.tune_spec is not None:
            applied, tuning_report = self._tune(self.tune_spec, baseline, baseline_fidelity["cosine_mean"])
        else:
            applied = self._apply(self.recipe, base_state, self.workdir, measure_steps=True)

        ctx.progress(0.9, "package", "packaging the compressed model")
        compressed = dict(applied.figures)
        delivered, encoding = self._encode(applied.path, compressed)
        compressed.update(encoding)
        main = Output("model", EXTENSIONS[self.runtime], delivered,
                      f"compressed.{EXTENSIONS[self.runtime]}" + (".gz" if delivered != applied.path else ""))
        extra = self._exports(applied.state, applied.exports, applied.path.parent)
        metrics = {
            "baseline": baseline,
            "compressed": compressed,
            "compression_ratio": _ratio(baseline["size_bytes"], compressed["size_bytes"]),
            "speedup": _ratio(baseline["latency_ms"]["p50"], compressed["latency_ms"]["p50"]),
            "fidelity": measure.fidelity(self.reference, applied.outputs),
            "steps": applied.steps,
            "source": {"format": self.model_format, "size_bytes": self.model_path.stat().st_size,
                       "baseline_is": f"the uploaded model as {EXTENSIONS[self.runtime]} for {self.runtime}",
                       "baseline_fidelity_to_original": baseline_fidelity},
            "evaluation": self.data.description,
            "environment": {"device": self.device, "threads": self.settings.eval_threads, "runtime": self.runtime,
                            "onnxruntime": ort.__version__, "torch": torch.__version__,
                            "python": platform.python_version(), "machine": platform.machine()},
        }
        if applied.analysis is not None:
            metrics["analysis"] = applied.analysis
        if tuning_report is not None:
            metrics["tuning"] = tuning_report
            metrics["recipe"] = tuning_report["trials"][tuning_report["best"]]["recipe"]
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
                raise JobFailure(ErrorCode.EXPORT_FAILED, "the compressed encoding did not round-trip")
        return packed, {"encoding": "gzip", "size_bytes": packed.stat().st_size,
                        "uncompressed_size_bytes": path.stat().st_size}
