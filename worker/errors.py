"""How a job ends other than by succeeding: a failure the user reads (a code from the catalogue in
app.core.errors), a cancel, or the loss of the job to another worker."""

import re
from pathlib import Path

from app.core.errors import ServiceError

# How torch and ONNX Runtime say that an allocation failed (the data-segment cap, or the machine).
OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "failed to allocate", "bad allocation", "bad_alloc")


# An absolute path in a runtime's message (ONNX Runtime names the file it loaded).
_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/]+/)+[^\s'\":,]*")


def without_server_paths(text: str) -> str:
    """`text` with the paths of this machine's files replaced: those whose top folder exists here (a node named
    "/layer/Conv" is kept: there is no /layer)."""
    return _PATH.sub(lambda m: "<path>" if Path(m.group()).parents[-2].exists() else m.group(), text)


class JobFailure(ServiceError):
    """A reason the job cannot succeed that the user should read (bad model, unsupported op, no GPU...)."""


class JobCancelled(Exception):
    """The user asked to cancel; raised at the next check."""


class JobLost(Exception):
    """Another worker took the job over (our heartbeat went stale): stop without writing anything."""
