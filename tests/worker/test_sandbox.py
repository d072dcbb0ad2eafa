"""The sandbox that parses and runs uploaded files: what a child can see and reach, and that whatever it does
(crash, hang, exhaust memory, load native code, lie) ends in an outcome with a code, and the next child runs.

The probes below run inside real sandboxed children (forked from the real fork server)."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.errors import ErrorCode
from worker import sandbox
from worker.errors import JobCancelled, JobFailure
from worker.sandbox_child import Request

ISOLATED = os.geteuid() == 0  # namespaces need root (or CAP_SYS_ADMIN); without them only the limits hold
GIB = 1024**3


def probe(request: Request, ctx) -> dict:
    """Runs in the child: reports what it can see and reach."""
    def connects(address) -> bool:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(address)
            return True
        except OSError:
            return False

    status = Path("/proc/self/status").read_text()
    capabilities = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    home = request.settings.resolved_home()
    return {"environ": dict(os.environ), "pid": os.getpid(),
            "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "tcp_postgres": connects(("127.0.0.1", 5432)), "tcp_redis": connects(("127.0.0.1", 6379)),
            "unix_postgres": connects("/var/run/postgresql/.s.PGSQL.5432"),
            "home": sorted(os.listdir(home)), "api_key": (home / "api_key").exists(),
            "workdir": sorted(os.listdir(request.workdir)), "capabilities": capabilities,
            "settings_database_url": request.settings.database_url}


def writes_temporary_files(request: Request, ctx) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile() as scratch:
        scratch.write(bytes(8 * 1024 * 1024))
        return {"folder": str(Path(scratch.name).parent)}


def waits_for_cancel(request: Request, ctx) -> dict:
    while True:
        ctx.check()
        time.sleep(0.05)


def lies(request: Request, ctx) -> dict:
    from worker.sandbox_child import send

    send(ctx.conn, {"type": "failure", "code": "no_such_code", "message": "x" * 10_000})
    return {}


def loads_library(request: Request, ctx) -> dict:
    import ctypes

    ctypes.CDLL(str(request.workdir / "planted.so"))
    return {"loaded": True}


def make_request(tmp_path: Path, target: str, settings: Settings | None = None, memory: int = 4 * GIB) -> Request:
    home = tmp_path / "home"
    workdir = home / "work" / f"job-{len(list(tmp_path.glob('home/work/*')))}"
    workdir.mkdir(parents=True)
    (home / "api_key").write_text("mp_secret\n")
    (workdir / "input.onnx").write_bytes(b"model")
    settings = settings or Settings(home=home)
    return Request(target=f"{__name__}:{target}", workdir=workdir, settings=sandbox.child_settings(settings),
                   memory_bytes=memory, cpu_seconds=60)


def run(request: Request, **options) -> sandbox.Outcome:
    return sandbox.run(request, wall_seconds=options.pop("wall_seconds", 60), **options)


def test_scrubbed_environment_keeps_nothing_that_names_a_service() -> None:
    environ = {"PATH": "/bin", "LANG": "C.UTF-8", "MODELPRESS_DATABASE_URL": "postgresql://u:p@db/x",
               "MODELPRESS_BROKER_URL": "redis://r", "MODELPRESS_STORAGE_URL": "s3://b", "AWS_SECRET_ACCESS_KEY": "k",
               "AWS_ACCESS_KEY_ID": "i", "PGPASSWORD": "p", "DATABASE_URL": "x", "MODELPRESS_METRICS_TOKEN": "t",
               "HOME": "/root", "SOME_API_KEY": "k", "OMP_NUM_THREADS": "2"}
    kept = sandbox.scrubbed_environment(environ)
    assert set(kept) == {"PATH", "LANG", "OMP_NUM_THREADS", *sandbox.CHILD_ENVIRONMENT}


def test_a_child_sees_no_secret_and_reaches_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MODELPRESS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/secret")
    request = make_request(tmp_path, "probe", Settings(home=tmp_path / "home",
                                                       database_url="postgresql://postgres@127.0.0.1/secret"))
    outcome = run(request)
    assert outcome.code is None, outcome.message
    seen = outcome.value
    secret = re.compile(r"MODELPRESS|AWS|^PG|SECRET|TOKEN|PASSWORD|KEY|URL|DSN", re.IGNORECASE)
    assert [name for name in seen["environ"] if secret.search(name)] == []
    assert seen["settings_database_url"] is None
    assert seen["workdir"] == ["input.onnx"]
    if not ISOLATED:
        pytest.skip("not root: no namespaces, so network, processes and files are not isolated here")
    assert not seen["tcp_postgres"] and not seen["tcp_redis"] and not seen["unix_postgres"]
    assert seen["pid"] == 1 and seen["processes"] == [1]
    assert seen["home"] == ["work"] and not seen["api_key"]  # the data folder is covered; only scratch is back
    assert int(seen["capabilities"], 16) == 0


@pytest.mark.parametrize("fault, code", [("segfault", ErrorCode.CRASHED), ("exit", ErrorCode.CRASHED),
                                         ("raise", ErrorCode.INTERNAL_ERROR), ("allocate", ErrorCode.RESOURCE_LIMIT)])
def test_a_failing_child_ends_with_a_code_and_the_next_one_runs(tmp_path: Path, fault: str, code: ErrorCode) -> None:
    settings = Settings(home=tmp_path / "home", fault_injection=f"child:{fault}")
    started = time.monotonic()
    outcome = run(make_request(tmp_path, "probe", settings, memory=GIB))
    assert outcome.code == code, outcome
    assert outcome.value is None and outcome.message
    assert "/worker/" not in outcome.message  # never a path of this machine
    assert time.monotonic() - started < 30
    assert run(make_request(tmp_path, "probe")).code is None


def test_a_hanging_child_is_stopped_at_its_time_limit(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", fault_injection="child:hang")
    started = time.monotonic()
    outcome = run(make_request(tmp_path, "probe", settings), wall_seconds=3)
    assert outcome.code == ErrorCode.TIMEOUT and "time limit of 3s" in outcome.message
    assert time.monotonic() - started < 15
    assert run(make_request(tmp_path, "probe")).code is None


def test_a_child_that_loads_a_crashing_native_library(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the library")
    request = make_request(tmp_path, "loads_library")
    source = tmp_path / "planted.c"
    source.write_text("#include <stdlib.h>\n__attribute__((constructor)) static void planted(void) { abort(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(request.workdir / "planted.so"), str(source)], check=True)
    outcome = run(request)
    assert outcome.code == ErrorCode.CRASHED and "crashed (SIG" in outcome.message  # abort() in a namespace's init
    assert run(make_request(tmp_path, "probe")).code is None


def test_a_cancel_is_relayed_to_the_child(tmp_path: Path) -> None:
    asked = time.monotonic() + 1

    def check() -> None:
        if time.monotonic() > asked:
            raise JobCancelled("job")

    outcome = run(make_request(tmp_path, "waits_for_cancel"), check=check)
    assert outcome.code == ErrorCode.CANCELLED


def test_what_a_child_says_is_bounded(tmp_path: Path) -> None:
    outcome = run(make_request(tmp_path, "lies"))
    assert outcome.code == ErrorCode.INTERNAL_ERROR and len(outcome.message) <= 2000


def test_only_regular_files_inside_the_scratch_folder_are_read_back(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "model.onnx").write_bytes(b"m")
    (workdir / "link").symlink_to("/etc/passwd")
    (workdir / "sub").symlink_to("/etc")
    assert sandbox.safe_output(workdir, "model.onnx") == (workdir / "model.onnx").resolve()
    for bad in ["link", "sub/passwd", "../work/../../etc/passwd", "/etc/passwd", "", None, 3, "missing"]:
        with pytest.raises(JobFailure):
            sandbox.safe_output(workdir, bad)


def test_messages_never_show_server_paths(tmp_path: Path) -> None:
    workdir = tmp_path / "home" / "work" / "job-1"
    message = f"cannot open {workdir}/input.pt2: no; see {tmp_path / 'home'}/modelpress.db"
    scrubbed = sandbox.scrub_paths(message, workdir, tmp_path / "home")
    assert str(tmp_path) not in scrubbed and "input.pt2" in scrubbed and "modelpress.db" in scrubbed
    assert json.dumps(scrubbed)


def test_temporary_files_go_to_the_scratch_folder(tmp_path: Path) -> None:
    """Libraries write temporary files (ONNX Runtime's quantizer does): they land in the job's scratch folder,
    not in the covered /tmp, whatever the fork server had cached."""
    request = make_request(tmp_path, "writes_temporary_files")
    outcome = run(request)
    assert outcome.code is None, outcome.message
    assert outcome.value["folder"] == str(request.workdir)
