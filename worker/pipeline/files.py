"""What a pipeline run reads and writes: the job's inputs as local files, and the files it delivers."""

from dataclasses import dataclass, field
from pathlib import Path

from app.core.input_specs import InputSpec
from app.core.recipe import Recipe, Target, TuneSpec

Files = dict[str, tuple[Path, str]]  # role or student model id -> (local path, format)


@dataclass
class StagedJob:
    """A job's inputs, local: the model file, its datasets and uploaded students, and what to do with them."""

    recipe: Recipe | None
    tune: TuneSpec | None
    target: Target
    model_path: Path
    model_format: str
    model_name: str
    dataset_files: Files = field(default_factory=dict)
    student_files: Files = field(default_factory=dict)
    min_fidelity: float | None = None  # the job's fidelity floor (worker.pipeline.floor); None: the default
    accept_degraded: bool = False
    input_specs: dict[str, InputSpec] = field(default_factory=dict)  # how to make or read each input


@dataclass
class Output:
    """A file the job delivers: `kind` model or report, in `format`, downloaded as `filename`."""

    kind: str
    format: str
    path: Path
    filename: str
