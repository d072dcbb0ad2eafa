"""What a pipeline run reads and writes: the job's inputs as local files, and the files it delivers (and the names
they are downloaded under, which the worker gives them and the model card quotes)."""

import hashlib
import re
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
    job_id: str | None = None  # named in the model card and the HTML report
    model_id: str | None = None


@dataclass
class Output:
    """A file the job delivers: `kind` model, card or report, in `format`, stored as `filename` (downloaded with
    the model's name before it: `download_stem`)."""

    kind: str
    format: str
    path: Path
    filename: str


MAX_STEM_CHARS = 60


def download_stem(model_name: str) -> str:
    """The model's name as the start of its artifacts' download names: the last path part of what the tenant
    named it (any OS's separators), without control characters, bounded; `model` if nothing is left."""
    last = re.split(r"[/\\]", model_name)[-1]
    stem = "".join(ch for ch in Path(last).stem if ch.isprintable()).strip(" .")
    return stem[:MAX_STEM_CHARS] or "model"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
