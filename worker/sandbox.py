"""Runs the untrusted part of a job or an inspection in a child process that holds no secrets.

Each worker process starts one fork server (multiprocessing's "forkserver", with torch, ONNX Runtime and the
pipeline imported once) from an environment scrubbed of database, broker and storage settings and every
credential; each request then gets a fresh child forked from it (worker.sandbox_child isolates it further:
resource limits and, where it may, no network, its own PID and mount namespaces, no capabilities). The
parent - this module, in the Celery worker - relays progress and cancels, watches the child's resident memory
and wall time, and turns whatever the child does (a result, a failure, a crash, a kill) into an outcome with a
code. It never unpickles what the child sends, and reads back only regular files inside the child's scratch
folder.
"""

import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.config import Settings
from app.core.errors import ErrorCode
from worker.errors import JobCancelled, JobFailure
from worker.sandbox_child import MAX_MESSAGE_BYTES, Request, main

log = logging.getLogger(__name__)

# The only environment the fork server (and so every child) gets: enough to run Python, torch and CUDA.
KEPT_ENVIRONMENT = re.compile(r"PATH|LANG|LANGUAGE|LC_[A-Z]+|TZ|PYTHONHASHSEED|VIRTUAL_ENV|LD_LIBRARY_PATH"
                              r"|CUDA_VISIBLE_DEVICES|NVIDIA_[A-Z_]+|OMP_NUM_THREADS|MKL_NUM_THREADS"
                              r"|OPENBLAS_NUM_THREADS")
CHILD_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
POLL_SECONDS = 0.1
CANCEL_GRACE_SECONDS = 30.0  # a cancelled child that does not stop by itself is killed after this
# Imported once by the fork server, so a child starts in milliseconds rather than seconds.
# (matplotlib too: a child's HOME is its scratch folder, where matplotlib would build its font cache every job)
PRELOAD = ["torch", "onnxruntime", "worker.sandbox_child", "worker.pipeline.runner", "worker.formats",
           "worker.formats.hf", "worker.reporting.charts"]
MEMORY_SHARE = 0.75  # of the machine's memory, divided among the worker's job slots
_start_lock = threading.Lock()


def scrubbed_environment(environ: dict[str, str]) -> dict[str, str]:
    """What the sandbox may see of the worker's environment: nothing that names a service or a secret."""
    kept = {name: value for name, value in environ.items() if KEPT_ENVIRONMENT.fullmatch(name)}
    return {**kept, **CHILD_ENVIRONMENT}


def default_memory_bytes(settings: Settings) -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * MEMORY_SHARE / max(1, settings.worker_concurrency))


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _context() -> multiprocessing.context.ForkServerContext:
    """The fork server of this process, started (once) without secrets in its environment."""
    context = multiprocessing.get_context("forkserver")
    # Celery's pool processes (billiard) are daemonic, and multiprocessing refuses children to those (lest they
    # be orphaned): the sandbox's children die with their parent anyway (PDEATHSIG) and are always reaped here.
    # Their authentication key is billiard's, which the standard library cannot pass on: give it its own.
    current = multiprocessing.current_process()
    current._config.pop("daemon", None)
    if type(current._config.get("authkey")) is not multiprocessing.process.AuthenticationString:
        current._config["authkey"] = multiprocessing.process.AuthenticationString(os.urandom(32))
    with _start_lock:
        server = multiprocessing.forkserver._forkserver
        if server._forkserver_pid is None or not _alive(server._forkserver_pid):
            context.set_forkserver_preload(PRELOAD)
            with _environment(scrubbed_environment(dict(os.environ))):
                server.ensure_running()
    return context


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Outcome:
    """What a child ended with: a result value, or a failure code and message (cancelled is a failure too)."""

    value: dict[str, Any] | None = None
    code: ErrorCode | None = None
    message: str = ""


def scrub_paths(text: str, *folders: Path) -> str:
    """Messages never show where the server keeps things: paths under these folders become their file names."""
    for folder in folders:
        for form in {str(folder), str(folder.resolve())}:
            text = re.sub(re.escape(form) + r"/?([^\s'\"]*)", lambda m: Path(m.group(1)).name or "<scratch>", text)
    return text


def run(request: Request, *, progress: Callable[..., None] | None = None,
        check: Callable[[], None] | None = None, on_trial: Callable[[dict[str, Any]], None] | None = None,
        on_best: Callable[[dict[str, Any]], None] | None = None, wall_seconds: float) -> Outcome:
    """Run `request` in a fresh sandboxed child and wait for it.

    `progress` receives the child's progress reports as (fraction, step, message, step_index=, epoch=, trial=),
    the counters as the child sent them (app.core.job_events checks them); a JobCancelled it raises is relayed
    to the child as a cancel, a JobLost kills the child and propagates; `check` is called every poll for the
    same purpose; `on_trial` receives each finished tuning trial as the child reported it, and `on_best` each
    "this trial's file is the best so far" (both to be checked by the caller).
    The child is killed past `wall_seconds`, past its memory cap, or when anything here raises (the
    worker's own time limit included), so no child outlives the call.
    """
    context = _context()
    parent_conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(target=main, args=(child_conn, request), name="modelpress-sandbox")
    process.start()
    child_conn.close()
    watched = process.pid
    started = time.monotonic()
    cancel_sent_at: float | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    try:
        while outcome is None:
            if cancel_sent_at is None:
                try:
                    if check is not None:
                        check()
                except JobCancelled:
                    cancel_sent_at = _send_cancel(parent_conn)
            if parent_conn.poll(POLL_SECONDS):
                try:
                    message = json.loads(parent_conn.recv_bytes(MAX_MESSAGE_BYTES))
                except (EOFError, OSError, ValueError):
                    break  # the child is gone, or wrote something that is not a message: judged by its exit below
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "started":
                    watched = int(message["pid"])
                elif kind in ("progress", "trial", "best"):
                    try:
                        if kind == "progress" and progress is not None:
                            progress(float(message["fraction"]), _text(message.get("step"), 100),
                                     _text(message.get("message"), 1000), step_index=message.get("step_index"),
                                     epoch=message.get("epoch"), trial=message.get("trial"))
                        elif kind == "trial" and on_trial is not None:
                            on_trial(message)
                        elif kind == "best" and on_best is not None:
                            on_best(message)
                    except JobCancelled:
                        if cancel_sent_at is None:
                            cancel_sent_at = _send_cancel(parent_conn)
                elif kind == "result":
                    outcome = Outcome(value=message["value"] if isinstance(message.get("value"), dict) else {})
                elif kind == "failure":
                    outcome = Outcome(code=_code(message.get("code")), message=_text(message.get("message"), 2000))
                elif kind == "cancelled":
                    outcome = Outcome(code=ErrorCode.CANCELLED, message="cancelled by the user")
            elif not process.is_alive():
                break
            if _resident_bytes(watched) > request.memory_bytes:
                reason = "memory"
                break
            if time.monotonic() - started > wall_seconds:
                reason = "time"
                break
            if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > CANCEL_GRACE_SECONDS:
                outcome = Outcome(code=ErrorCode.CANCELLED, message="cancelled by the user")
    finally:
        _stop(process)
        parent_conn.close()
    if outcome is not None:
        return outcome
    return _judge_exit(process.exitcode, reason, request, wall_seconds)


def _send_cancel(conn) -> float:
    try:
        conn.send_bytes(json.dumps({"type": "cancel"}).encode())
    except OSError:
        pass
    return time.monotonic()


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    """Kill the child (its namespace goes with it) unless it has exited, and reap it."""
    process.join(timeout=2)
    if process.is_alive():
        process.kill()
        process.join(timeout=10)


def _code(value: Any) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR


def _text(value: Any, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


def _judge_exit(exitcode: int | None, reason: str | None, request: Request, wall_seconds: float) -> Outcome:
    if reason == "memory":
        return Outcome(code=ErrorCode.RESOURCE_LIMIT,
                       message=f"the job used more than its memory limit of {request.memory_bytes} bytes and was "
                               "stopped (MODELPRESS_WORKER_MEMORY_BYTES)")
    if reason == "time":
        return Outcome(code=ErrorCode.TIMEOUT, message=f"the job ran past its time limit of {wall_seconds:.0f}s")
    if exitcode == -signal.SIGXCPU:
        return Outcome(code=ErrorCode.RESOURCE_LIMIT,
                       message=f"the job used more than its CPU time limit of {request.cpu_seconds}s")
    if exitcode == -signal.SIGKILL:
        return Outcome(code=ErrorCode.RESOURCE_LIMIT,
                       message="the process running the job was killed (out of memory, most likely)")
    if exitcode is not None and exitcode < 0:
        return Outcome(code=ErrorCode.CRASHED,
                       message=f"the process running the job crashed ({signal.Signals(-exitcode).name}); the "
                               "model or its data may be malformed")
    return Outcome(code=ErrorCode.CRASHED, message=f"the process running the job stopped without a result "
                                                   f"(exit code {exitcode})")


def request(settings: Settings, target: str, workdir: Path, **fields: Any) -> Request:
    """A request for `worker.sandbox_child:<target>` with this worker's caps: memory (MODELPRESS_WORKER_MEMORY_BYTES,
    or a share of the machine per job slot) and CPU time (the job's time limit on every core)."""
    return Request(target=f"worker.sandbox_child:{target}", workdir=workdir, settings=child_settings(settings),
                   memory_bytes=settings.worker_memory_bytes or default_memory_bytes(settings),
                   cpu_seconds=settings.job_soft_time_limit * (os.cpu_count() or 1), **fields)


def child_settings(settings: Settings) -> Settings:
    """The settings a child gets: none of the service's addresses or credentials."""
    return settings.model_copy(update={"database_url": None, "broker_url": None, "storage_url": None,
                                       "metrics_token": None})


def safe_output(workdir: Path, relative: Any) -> Path:
    """A file the child says it wrote: only a regular file inside its scratch folder is ever read back."""
    if not isinstance(relative, str) or not relative or relative.startswith("/"):
        raise JobFailure(ErrorCode.INTERNAL_ERROR, "the job reported an output outside its folder")
    root = workdir.resolve()
    path = (root / relative).resolve()
    if root not in path.parents or not path.is_file() or Path(root / relative).is_symlink():
        raise JobFailure(ErrorCode.INTERNAL_ERROR, "the job reported an output that is not a file of its own")
    return path
