"""A job in progress, as its steps see it: the loaded original model, the job's data, the reference outputs and
the target; and the model between steps (WorkingModel), with one way to write and to measure it.

Baseline, every step and the result are measured by the same code (`JobRun.evaluate`), on the same inputs,
with the target runtime.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from app.core.config import Settings
from app.core.errors import ErrorCode
from app.core.input_specs import problems_against_model
from app.core.model_limits import (
    CAUSAL_LM_TASK,
    ONNX_BYTES_PER_PARAM,
    ONNX_MAX_BYTES,
    SEQ2SEQ_TASK,
    check_recipe_for_info,
)
from app.core.recipe import Recipe, Target
from app.core.vetting.hf import UNPACK_FACTOR
from worker.compression.modules import count_weights
from worker.context import JobContext
from worker.errors import OUT_OF_MEMORY, JobFailure
from worker.evaluation import data as job_data
from worker.evaluation import measure
from worker.formats import load, onnx_pair
from worker.formats.export import example_args, to_onnx, to_pt2
from worker.formats.loaded import LoadedModel, hf_model_of
from worker.formats.onnx_format import count_params
from worker.pipeline.files import StagedJob

EXTENSIONS = {"onnxruntime": "onnx", "pytorch": "pt2"}


@dataclass
class WorkingModel:
    """The model between steps: a torch module until an ONNX-only step ran, then an ONNX file."""

    module: torch.nn.Module | None
    onnx_path: Path | None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self) -> tuple[int, int]:
        if self.module is not None:
            return count_weights(self.module)
        if onnx_pair.is_pair(self.onnx_path):
            return onnx_pair.count_pair_params(self.onnx_path)
        return count_params(onnx.load(str(self.onnx_path), load_external_data=False))


@dataclass
class StepPlace:
    """Where a step runs: its recipe and index, the folder for its files, the job's progress fraction, and the
    tuning trial it belongs to (None outside tuning)."""

    recipe: Recipe
    index: int
    workdir: Path
    fraction: float
    trial: int | None = None


class JobRun:
    """Loads the job's model and data once; the steps, the measurements and the exports share them."""

    def __init__(self, staged: StagedJob, workdir: Path, settings: Settings, ctx: JobContext,
                 deadline: float | None = None):
        self.staged, self.workdir, self.settings, self.ctx, self.deadline = staged, workdir, settings, ctx, deadline
        self.target: Target = staged.target
        self.device, self.runtime = staged.target.device, staged.target.runtime
        if self.device == "cuda" and not torch.cuda.is_available():
            raise JobFailure(ErrorCode.CUDA_UNAVAILABLE, "the job targets cuda but this worker has no CUDA device; "
                                                         "it must run on a GPU worker (queue 'gpu')")
        ctx.progress(0.05, "load", f"loading the {staged.model_format} model")
        self.loaded: LoadedModel = load(staged.model_path, staged.model_format, workdir, self.unpack_limit)
        if staged.recipe is not None:
            try:  # what the API checks from the model's info, in case it had none then
                check_recipe_for_info(staged.recipe, self.target, staged.model_format, self.loaded.info)
            except ValueError as exc:
                raise JobFailure(ErrorCode.INVALID_RECIPE, str(exc)) from None
        if self.loaded.module is not None and self.device == "cuda":
            self.loaded.module.to("cuda")
        problems = problems_against_model(staged.input_specs, self.loaded.inputs)
        if problems:
            raise JobFailure(ErrorCode.INVALID_REQUEST, "; ".join(problems[:5]))
        self.data = job_data.prepare(self.loaded, staged.dataset_files, staged.input_specs)
        self.example = example_args(self.loaded.inputs, self.data.eval_batches[0], self.device)
        ctx.progress(0.1, "measure", "running the original model")
        self.reference = self._reference()

    def _reference(self) -> list[list[np.ndarray]]:
        """The original model's outputs on the eval batches; a model that raises on them fails the job naming
        its inputs (worker.evaluation.data.inputs_do_not_run), not with the runtime's message."""
        try:
            return [self.loaded.reference(batch, self.device) for batch in self.data.eval_batches]
        except (JobFailure, MemoryError):
            raise
        except Exception as exc:
            if any(sign in str(exc).lower() for sign in OUT_OF_MEMORY):
                raise
            raise job_data.inputs_do_not_run(self.loaded, self.data, self.staged.input_specs) from None

    @property
    def unpack_limit(self) -> int:
        """What an uploaded Hugging Face archive may extract to: UNPACK_FACTOR x the upload limit."""
        return UNPACK_FACTOR * self.settings.max_upload_bytes

    @property
    def seq2seq(self) -> bool:
        """An encoder-decoder: its ONNX form is a zip of two graphs (worker.formats.onnx_pair)."""
        return self.loaded.hf is not None and self.loaded.hf.task == SEQ2SEQ_TASK

    @property
    def extension(self) -> str:
        return "zip" if self.seq2seq and self.runtime == "onnxruntime" else EXTENSIONS[self.runtime]

    @property
    def artifact_format(self) -> str:
        return "onnx-seq2seq" if self.extension == "zip" else self.extension

    def original(self) -> WorkingModel:
        return WorkingModel(module=self.loaded.module, onnx_path=self.loaded.onnx_path)

    def torch_args(self, feeds: list[np.ndarray]) -> tuple:
        """A batch of the job's data as the model's positional tensor arguments, on the job's device."""
        return example_args(self.loaded.inputs, feeds, self.device)

    def onnx_form(self, state: WorkingModel, path: Path) -> Path:
        """The model as an ONNX file (exported to `path` if it is still a torch module): for Hugging Face models the
        graph ONNX Runtime runs fastest (worker.formats.hf.export_hf_onnx), checked against the module."""
        if state.module is None:
            return state.onnx_path
        params = count_weights(state.module)[0]
        if params * ONNX_BYTES_PER_PARAM > ONNX_MAX_BYTES:
            raise JobFailure(ErrorCode.UNSUPPORTED_MODEL,
                             f"the model has {params:,} parameters: too large for a single ONNX file (protobuf's 2 "
                             "GiB limit); compress it with target.runtime 'pytorch' and no 'onnx' export")
        if self.seq2seq:
            from worker.formats.hf_seq2seq import export_pair

            return export_pair(self.loaded.hf, path.with_suffix(".zip"), module=state.module)
        if self.loaded.hf is not None and hf_model_of(state.module) is not None:
            from worker.formats.hf import export_hf_onnx

            return export_hf_onnx(self.loaded.hf, path, module=state.module)
        return to_onnx(state.module, self.loaded.inputs, self.example, path)

    def pt2_form(self, state: WorkingModel, path: Path) -> Path:
        return to_pt2(state.module, self.loaded.inputs, self.example, path)

    def write(self, state: WorkingModel, stem: Path) -> Path:
        """The model as a file in the target runtime's format, named `stem` + its extension."""
        path = stem.with_name(f"{stem.name}.{self.extension}")
        if self.runtime == "onnxruntime":
            if state.module is None:
                shutil.copyfile(state.onnx_path, path)
                return path
            return self.onnx_form(state, path)
        if state.module is None:
            raise JobFailure(ErrorCode.UNSUPPORTED_FOR_FORMAT, "target.runtime 'pytorch' needs a PyTorch model (.pt2 "
                                                               "or Hugging Face); this model is only available as ONNX")
        return self.pt2_form(state, path)

    def evaluate(self, path: Path, state: WorkingModel) -> tuple[dict[str, Any], list]:
        """Size, weights, latency and accuracy of a model file, and its outputs on the eval batches."""
        self.ctx.check()
        latency, outputs = measure.measure_file(path, self.runtime, self.device, self.settings.eval_threads,
                                                self.data.eval_batches, self.settings.latency_warmup,
                                                self.settings.latency_runs, self.ctx.check)
        params, nonzero = state.weights()
        figures = {"size_bytes": path.stat().st_size, "params": params, "nonzero_params": nonzero,
                   "latency_ms": latency, "accuracy": job_data.accuracy(outputs, self.data.eval_labels)}
        if self.data.eval_texts and self.loaded.hf is not None and self.loaded.hf.task == CAUSAL_LM_TASK:
            figures["perplexity"] = job_data.perplexity(outputs, self.data.eval_batches, self.loaded.hf.input_names)
        return figures, outputs

    @property
    def attention_mask_input(self) -> int | None:
        """Which of a Hugging Face model's inputs marks its real tokens (padding is neither trained nor measured)."""
        names = [spec["name"] for spec in self.loaded.inputs]
        return names.index("attention_mask") if self.loaded.hf is not None and "attention_mask" in names else None

    @property
    def eval_masks(self) -> list[np.ndarray] | None:
        """The attention mask of each eval batch for text models (padded token positions are not judged), else
        None."""
        names = [spec["name"] for spec in self.loaded.inputs]
        if "attention_mask" not in names:
            return None
        position = names.index("attention_mask")
        return [batch[position] for batch in self.data.eval_batches]

    @property
    def eval_pooling(self) -> str | None:
        """A sentence-transformers archive's pooling: its fidelity is judged on the sentence embedding."""
        return self.loaded.hf.pooling if self.loaded.hf is not None else None

    def fidelity(self, outputs: list) -> dict[str, Any]:
        """How closely outputs follow the original model's on the same inputs, padded token positions left out; for
        a sentence encoder, on the sentence embedding its users take (the token states' cosine said beside it)."""
        judged = measure.fidelity(self.reference, outputs, self.eval_masks, self.eval_pooling)
        if self.eval_pooling is not None:
            tokens = measure.fidelity(self.reference, outputs, self.eval_masks)
            judged.update(on=f"sentence embedding ({self.eval_pooling} pooling, from the archive's "
                             "sentence-transformers config)", token_cosine_mean=tokens["cosine_mean"],
                          token_cosine_min=tokens["cosine_min"])
        return judged

    def check_runs(self, path: Path, runtime: str) -> None:
        """Load a delivered file back and run one batch: nothing is delivered that does not run."""
        measure.measure_file(path, runtime, self.device, 1, self.data.eval_batches[:1], 0, 1, self.ctx.check)
