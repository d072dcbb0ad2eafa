"""Where a job's numbers come from, in its report: the exact inputs (sha256 of the files the sandbox read), the
recipe as it ran (presets and defaults resolved), the seeds, the software, the machine and how steady its timings
were. Enough for someone else to re-run the job and to judge whether their numbers should match."""

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from app.core import input_specs
from app.core.recipe import Recipe
from worker.compression.train import TrainConfig
from worker.evaluation import data as job_data
from worker.pipeline.files import sha256_of
from worker.pipeline.job_run import JobRun
from worker.pipeline.steps.distill import HOLDOUT_SEED
from worker.reporting.summary import LATENCY_SPREAD


def _file(path: Path, fmt: str) -> dict[str, Any]:
    return {"format": fmt, "size_bytes": path.stat().st_size, "sha256": sha256_of(path)}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {"modelpress": _version("modelpress"), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "onnx": _version("onnx"), "transformers": _version("transformers"), "numpy": np.__version__,
            "python": platform.python_version()}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's marketing name (x86 `model name`, some ARM kernels' `Hardware` or `Model`), else what the
    platform module knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware(device: str) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable, "machine": platform.machine(),
            "os": platform.system(), "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def spread(latency: dict[str, Any]) -> dict[str, Any]:
    return {name: latency.get(name) for name in LATENCY_SPREAD}


def resolved_recipe(recipe: dict | Recipe | None) -> dict | None:
    """Every field of every step, defaults included: what ran, not only what was asked."""
    if recipe is None:
        return None
    parsed = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
    return parsed.model_dump(mode="json")


def collect(run: JobRun, baseline: dict[str, Any], compressed: dict[str, Any], recipe: dict | Recipe | None
            ) -> dict[str, Any]:
    """The provenance of a finished run: `recipe` is the one that made the delivered model (a tuned job's best
    trial's)."""
    staged, settings = run.staged, run.settings
    generated = run.data.description.get("inputs") == "generated"
    return {
        "inputs": {"model": {"id": staged.model_id, **_file(staged.model_path, staged.model_format)},
                   "datasets": {role: _file(*file) for role, file in sorted(staged.dataset_files.items())},
                   "students": {ident: _file(*file) for ident, file in sorted(staged.student_files.items())}},
        "recipe": resolved_recipe(recipe),
        "tune": staged.tune.model_dump(mode="json") if staged.tune is not None else None,
        "target": staged.target.model_dump(mode="json"),
        "input_specs": input_specs.to_json(staged.input_specs),
        "seeds": {"generated_inputs": job_data.GENERATED_SEED if generated else None,
                  "training": TrainConfig().seed, "held_out_split": HOLDOUT_SEED},
        "versions": versions(),
        "hardware": hardware(run.device),
        "threads": {"measurement": settings.eval_threads, "torch": torch.get_num_threads()},
        "latency": {"warmup_runs": settings.latency_warmup, "runs": settings.latency_runs, "unit": "ms",
                    "baseline": spread(baseline["latency_ms"]), "compressed": spread(compressed["latency_ms"])},
    }
