"""The sandboxed side of a job or an inspection: the only code that parses, loads or runs uploaded files.

It runs in a child forked from a fork server that imported torch, ONNX Runtime and the pipeline once
(worker.sandbox starts it with an environment that holds no secrets; this module stays light, because the
worker process imports it too). Before touching any input the child caps its own resources
(data segment, CPU time, no core dumps) and, where the OS allows it (root, or CAP_SYS_ADMIN), enters new
network, PID and mount namespaces: no network at all, nothing it starts outlives it, the service's data folder
and socket folders covered by empty mounts, its own /proc; then it drops every capability. Then it
runs one request and reports back over a pipe in JSON, never pickle: the parent must not unpickle what a
compromised child writes.
"""

import ctypes
import importlib
import json
import os
import resource
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from app.core.config import Settings
from app.core.errors import ErrorCode
from app.core.vetting.hf import UNPACK_FACTOR
from worker.errors import OUT_OF_MEMORY, JobCancelled, JobFailure, without_server_paths
from worker.pipeline.files import StagedJob

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Where a test may make the child fail on purpose (MODELPRESS_FAULT_INJECTION="<stage>:<fault>").
FAULTS = ("raise", "segfault", "hang", "exit", "allocate")

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Request:
    """What the parent asks of a child: `target` ("module:function") is called with the request and the child's
    context and returns a JSON-able dict (inspect and run_job below; tests probe the sandbox with their own)."""

    target: str
    workdir: Path
    settings: Settings
    memory_bytes: int
    cpu_seconds: int
    staged: StagedJob | None = None
    model: tuple[Path, str] | None = None  # inspection: (local file, format)
    deadline: float | None = None
    isolation: dict[str, Any] = field(default_factory=dict)


class ChildContext:
    """The job context the pipeline sees in the sandbox: progress, finished tuning trials and the best one so far go
    to the parent, a cancel comes from it."""

    def __init__(self, conn: Connection, workdir: Path):
        self.conn, self.workdir = conn, workdir
        self.cancel_requested = False

    def trial(self, index: int, path: Path, figures: dict[str, Any]) -> None:
        """A tuning trial finished: its model file (in the scratch folder) and figures, so the parent can
        deliver the best one so far if the job is stopped before tuning ends."""
        send(self.conn, {"type": "trial", "index": index, "path": _relative(path, self.workdir), **figures})

    def best(self, index: int, path: Path) -> None:
        """Trial `index`'s file is the best so far: the parent publishes it as the job's provisional artifact."""
        send(self.conn, {"type": "best", "index": index, "path": _relative(path, self.workdir)})

    def check(self) -> None:
        while self.conn.poll():
            message = json.loads(self.conn.recv_bytes())
            if message.get("type") == "cancel":
                self.cancel_requested = True
        if self.cancel_requested:
            raise JobCancelled("cancelled")

    def progress(self, fraction: float, step: str | None, message: str | None, *, step_index: int | None = None,
                 epoch: int | None = None, trial: int | None = None) -> None:
        self.check()
        send(self.conn, {"type": "progress", "fraction": fraction, "step": step, "message": message,
                         "step_index": step_index, "epoch": epoch, "trial": trial})


def send(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message, allow_nan=False, default=str).encode())


def inject_fault(settings: Settings, stage: str) -> None:
    """Fail at `stage` as MODELPRESS_FAULT_INJECTION asks (tests of the sandbox and of every stage's cleanup)."""
    wanted = settings.fault_injection or ""
    if ":" not in wanted or wanted.split(":", 1)[0] != stage:
        return
    fault = wanted.split(":", 1)[1]
    if fault == "raise":
        raise RuntimeError(f"fault injected at {stage} in {Path(__file__)}")  # a path, as runtimes' messages have
    if fault == "segfault":
        ctypes.string_at(0)
    if fault == "hang":
        while True:
            signal.pause()
    if fault == "exit":
        os._exit(3)
    if fault == "allocate":
        hoard = []
        while True:
            hoard.append(bytearray(64 * 1024 * 1024))


def _limit(settings_memory: int, cpu_seconds: int) -> dict[str, Any]:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    # RLIMIT_DATA counts private writable memory (heap, anonymous mmap), not the address space torch and CUDA
    # reserve; the parent also watches the resident size.
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = settings_memory if hard == resource.RLIM_INFINITY else min(settings_memory, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return {"memory_bytes": cap, "cpu_seconds": cpu_seconds, "core_dumps": False}


def _namespaces() -> bool:
    """New network, PID and mount namespaces, if this process may create them (root, or CAP_SYS_ADMIN)."""
    return _libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS) == 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    if _libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def _hide(workdir: Path, settings: Settings) -> list[str]:
    """In the new mount namespace: cover the service's data folder and the usual socket folders (a database's
    unix socket needs no network) with empty tmpfs mounts, put the scratch folder back where it was, and mount
    a /proc that shows only this namespace's processes. Folders that hold Python itself stay."""
    code = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, *sys.path) if p]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    scratch = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    hidden = []
    for folder in (settings.resolved_home(), Path("/tmp"), Path("/run"), Path("/var/run"), Path("/dev/shm")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        folder = folder.resolve()
        if any(folder == p or folder in p.parents for p in code) or str(folder) in hidden:
            continue
        _mount("tmpfs", str(folder), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        hidden.append(str(folder))
    named = ["MODELPRESS_HOME" if path == str(settings.resolved_home()) else path for path in hidden]
    workdir.mkdir(parents=True, exist_ok=True)
    _mount(f"/proc/self/fd/{scratch}", str(workdir), None, MS_BIND | MS_REC)
    os.close(scratch)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return named


def _drop_capabilities() -> None:
    """No capability left (the mounts cannot be undone), and no way to gain one back."""
    for capability in range(64):
        _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if _libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(conn: Connection, request: Request) -> None:
    """Entry point in the forked child: isolate, then run the request in the namespaces' first process."""
    os.setsid()
    _die_with_parent()
    isolation = _limit(request.memory_bytes, request.cpu_seconds)
    isolated = _namespaces()
    if isolated:
        # The next process is the new PID namespace's init: when it exits, everything it started is killed too.
        pid = os.fork()
        if pid:
            send(conn, {"type": "started", "pid": pid})
            _mirror_exit(pid)
        _die_with_parent()
        isolation.update(network=False, pid_namespace=True, hidden=_hide(request.workdir, request.settings))
        _drop_capabilities()
        isolation["capabilities"] = []
    else:
        send(conn, {"type": "started", "pid": os.getpid()})
        isolation.update(network=True, pid_namespace=False, hidden=[])
    os.chdir(request.workdir)
    os.environ.update(HOME=str(request.workdir), TMPDIR=str(request.workdir))
    tempfile.tempdir = str(request.workdir)  # the fork server may have cached /tmp, which is now a tiny tmpfs
    request.isolation = isolation
    _run(conn, request)
    os._exit(0)


def _mirror_exit(pid: int) -> None:
    """Exit as the namespace's init did, so the parent sees its signal or code."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _relative(path: Path, workdir: Path) -> str:
    return str(Path(path).resolve().relative_to(workdir.resolve()))


def inspect(request: Request, ctx: ChildContext) -> dict[str, Any]:
    from worker import formats

    path, fmt = request.model
    limit = UNPACK_FACTOR * request.settings.max_upload_bytes
    return {"info": formats.inspect(path, fmt, request.workdir, limit)}


def run_job(request: Request, ctx: ChildContext) -> dict[str, Any]:
    from worker.pipeline.runner import run_pipeline

    result = run_pipeline(request.staged, request.workdir, request.settings, ctx, request.deadline)
    return {"metrics": {**result.metrics, "sandbox": request.isolation},
            "outputs": [{"kind": o.kind, "format": o.format, "path": _relative(o.path, request.workdir),
                         "filename": o.filename} for o in result.outputs]}


def _run(conn: Connection, request: Request) -> None:
    ctx = ChildContext(conn, request.workdir)
    try:
        inject_fault(request.settings, "child")
        module, name = request.target.split(":")
        value = getattr(importlib.import_module(module), name)(request, ctx)
        send(conn, {"type": "result", "value": value})
    except JobCancelled:
        send(conn, {"type": "cancelled"})
    except JobFailure as exc:
        send(conn, {"type": "failure", "code": exc.code, "message": exc.message})
    except MemoryError:
        send(conn, {"type": "failure", "code": ErrorCode.RESOURCE_LIMIT,
                    "message": f"the job ran out of its memory limit of {request.memory_bytes} bytes"})
    except Exception as exc:  # a bug, or a library failing on a hostile input: reported, never a path
        traceback.print_exc(file=sys.stderr)
        text = str(exc)
        if any(sign in text.lower() for sign in OUT_OF_MEMORY):
            send(conn, {"type": "failure", "code": ErrorCode.RESOURCE_LIMIT,
                        "message": f"the job ran out of its memory limit of {request.memory_bytes} bytes"})
        else:
            send(conn, {"type": "failure", "code": ErrorCode.INTERNAL_ERROR,
                        "message": f"{exc.__class__.__name__}: {without_server_paths(text)[:500]}"})
