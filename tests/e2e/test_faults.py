"""Faults, with real processes: a job that keeps killing its worker, broker and database restarts, a frozen
worker, an API killed mid-upload, and a worker asked to stop mid-job.

Each test runs `modelpress api` (its housekeeper re-sends, reaps and sweeps) and `modelpress worker` processes
against real PostgreSQL and a redis-server of its own, with heartbeat and housekeeping intervals of a second
or less so that every recovery happens within seconds.
"""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.api.housekeeping import sweep_orphans
from app.core.auth import create_api_key
from app.core.config import Settings
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.ids import new_id
from app.core.migrate import upgrade
from app.core.storage import open_storage
from app.core.tables import Job, JobEvent, Model
from tests.conftest import _unavailable, create_pg_database, drop_pg_database, free_port
from tests.e2e.conftest import MODELPRESS, Processes, http_ok, wait_until
from tests.helpers import save_onnx

pytestmark = pytest.mark.e2e

RECIPE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}
HEARTBEAT_TIMEOUT = 3.0
FAST = {"MODELPRESS_HEARTBEAT_INTERVAL": "0.5", "MODELPRESS_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
        "MODELPRESS_DISPATCH_INTERVAL": "0.5", "MODELPRESS_DISPATCH_RETRY_AFTER": "0",
        "MODELPRESS_REDISPATCH_AFTER": "3", "MODELPRESS_JOB_MAX_ATTEMPTS": "3", "MODELPRESS_LATENCY_WARMUP": "1"}
# Latency runs per measurement set how long a job takes: the tiny model runs in tens of microseconds.
FOREVER = "100000000"
SPAN = "150000"  # a few seconds: long enough for a fault to land while the job runs
QUICK = "20"
TERMINAL = ("succeeded", "failed", "cancelled")


# --- private servers -------------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server without persistence on its own port: killing it loses every message it held."""

    def __init__(self, processes: Processes):
        if shutil.which("redis-server") is None:
            _unavailable("redis-server", "not on PATH")
        self.processes, self.port = processes, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = self.processes.start("redis", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                                   "--save", "", "--appendonly", "no"], {})
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(lambda: _ping(client), 15, "redis-server to start", self.processes)

    def kill(self) -> None:
        self.processes.kill(self.proc)


def _ping(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


class PrivateCluster:
    """A PostgreSQL cluster of its own that a test may stop and start. PostgreSQL refuses to run as root, so
    as root its commands run as the `postgres` user, in a directory that user owns."""

    def __init__(self):
        found = shutil.which("pg_ctl") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))), None)
        if found is None:
            _unavailable("PostgreSQL server binaries (pg_ctl, initdb)", "not found")
        self.bin = Path(found).parent
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dir = Path(tempfile.mkdtemp(prefix="mp-faults-pg-"))
        if os.geteuid() == 0:
            try:
                os.chown(self.dir, pwd.getpwnam("postgres").pw_uid, -1)
            except KeyError:
                _unavailable("a `postgres` user to run a private PostgreSQL as", "no such user")
        self.port = free_port()
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-N")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/modelpress"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "30", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE modelpress")

    def remove(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                        "stop"], check=False, capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis(processes) -> PrivateRedis:
    server = PrivateRedis(processes)
    server.start()
    return server


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    cluster.start()
    cluster.create_database()
    yield cluster
    cluster.remove()


@pytest.fixture
def pg_database() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_onnx(tmp_path_factory.mktemp("faults") / "m.onnx", 16, 64, 4)


# --- the service under test ----------------------------------------------------------------------------------


@dataclass
class Service:
    """One deployment: the environment its processes share, the running API, a client with a key, the database."""

    processes: Processes
    env: dict[str, str]
    port: int
    client: httpx.Client
    factory: sessionmaker[Session]
    tenant_id: str
    api: subprocess.Popen | None = None

    def start_api(self) -> None:
        self.api = self.processes.start("api", [*MODELPRESS, "api", "--port", str(self.port)], self.env)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.port}/healthz"), 60, "the API to start", self.processes)

    def start_worker(self, name: str, latency_runs: str, **env: str) -> subprocess.Popen:
        return self.processes.start(name, [*MODELPRESS, "worker"],
                                    {**self.env, "MODELPRESS_LATENCY_RUNS": latency_runs, **env})

    def upload(self, path: Path) -> str:
        with open(path, "rb") as fh:
            response = self.client.post("/v1/models", files={"file": (path.name, fh)})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def submit(self, model_id: str) -> dict:
        response = self.client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait_job(self, job_id: str, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
        def matching() -> dict | None:
            job = self.job(job_id)
            return job if predicate(job) else None

        return wait_until(matching, timeout, what, self.processes)

    def wait_finished(self, job_id: str, timeout: float = 90) -> dict:
        return self.wait_job(job_id, lambda j: j["status"] in TERMINAL, timeout, f"job {job_id} to finish")

    def wait_measuring(self, job_id: str, attempt: int = 1) -> dict:
        """Running its `attempt`-th time and busy measuring latency, the longest part of a job."""
        return self.wait_job(job_id, lambda j: j["status"] == "running" and j["attempts"] == attempt
                             and j["progress"]["step"] == "measure", 90, f"job {job_id} to run (attempt {attempt})")

    def worker_pid(self, job_id: str, worker: subprocess.Popen) -> int:
        """The pool process running the job, checked to be a child of `worker` before anyone signals it."""
        with self.factory() as session:
            pid = int(session.scalar(select(Job.worker_id).where(Job.id == job_id)).rsplit(":", 1)[1])
        assert os.getpgid(pid) == worker.pid
        return pid

    def inspect_attempts(self, model_id: str) -> int:
        with self.factory() as session:
            return session.scalar(select(Model.inspect_attempts).where(Model.id == model_id))

    def wait_inspecting(self, model_id: str, attempt: int) -> None:
        """The `attempt`-th inspection has started (it loads the model next)."""
        wait_until(lambda: self.inspect_attempts(model_id) == attempt, 60, f"inspection {attempt} of {model_id}",
                   self.processes, interval=0.05)

    def events(self, job_id: str) -> list[str]:
        with self.factory() as session:
            return list(session.scalars(select(JobEvent.to_status).where(JobEvent.job_id == job_id,
                                                                         JobEvent.kind == "status")
                                        .order_by(JobEvent.id)))


def deploy(processes: Processes, home: Path, database_url: str, broker_url: str, **env: str) -> Service:
    """Migrate, create a key, start `modelpress api` with the fast timings plus `env`."""
    upgrade(Settings(database_url=database_url).resolved_database_url())
    factory = make_session_factory(make_engine(Settings(database_url=database_url).resolved_database_url()))
    with session_scope(factory) as session:
        tenant, key = create_api_key(session, "faults")
        tenant_id = tenant.id
    port = free_port()
    service = Service(processes, {**FAST, "MODELPRESS_HOME": str(home), "MODELPRESS_DATABASE_URL": database_url,
                                  "MODELPRESS_BROKER_URL": broker_url, **env}, port,
                      httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                                   timeout=30), factory, tenant_id)
    service.start_api()
    return service


def _at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


# --- the faults ----------------------------------------------------------------------------------------------


def test_job_that_keeps_killing_its_worker_fails_after_max_attempts(tmp_path, processes, pg_database,
                                                                    private_redis, model_file):
    """Each attempt's pool process gets SIGKILL, as the kernel's OOM killer does to a job that outgrows memory;
    the reaper in the API re-queues it until `job_max_attempts` runs were lost, then fails it `worker_lost`."""
    service = deploy(processes, tmp_path / "home", pg_database, private_redis.url)
    worker = service.start_worker("worker", FOREVER)
    job_id = service.submit(service.upload(model_file))["id"]
    started = time.monotonic()
    for attempt in (1, 2, 3):
        service.wait_measuring(job_id, attempt)
        os.kill(service.worker_pid(job_id, worker), signal.SIGKILL)
    job = service.wait_finished(job_id, 30)
    elapsed = time.monotonic() - started
    assert job["status"] == "failed", job
    assert job["attempts"] == 3
    assert job["error"]["code"] == "worker_lost"
    assert "stopped responding 3 times" in job["error"]["message"]
    # Each lost run is taken up again either by the reaper (running -> queued -> running) or, when the broker
    # re-delivers first, by a worker claiming the stale job directly (running -> running): both are recorded.
    events = service.events(job_id)
    assert events[:2] == ["queued", "running"] and events[-1] == "failed", events
    assert events.count("running") == 3 and set(events[2:-1]) <= {"queued", "running"}, events
    time.sleep(HEARTBEAT_TIMEOUT + 1)  # a reaper round and a re-delivery later, it is still done with
    assert service.job(job_id) == job
    assert worker.poll() is None  # only its pool processes died; Celery replaced them
    print(f"\nworker_lost after {job['attempts']} attempts, {elapsed:.1f}s from the first run")


def test_inspection_that_keeps_killing_its_worker_marks_the_model_invalid(tmp_path, processes, pg_database,
                                                                         private_redis, model_file):
    """The same for the inspection of an upload (where a model too large for memory is first loaded): Celery
    hands the message of a killed task straight back (`task_reject_on_worker_lost`), so without a bound of its
    own the inspection would run again as fast as it dies."""
    service = deploy(processes, tmp_path / "home", pg_database, private_redis.url, MODELPRESS_JOB_MAX_ATTEMPTS="2")
    # The inspection hangs in its sandbox until the test kills the worker's pool process (a model that loads slowly).
    worker = service.start_worker("worker", QUICK, MODELPRESS_FAULT_INJECTION="child:hang")
    model_id = service.upload(model_file)
    started = time.monotonic()
    for attempt in (1, 2):
        service.wait_inspecting(model_id, attempt)
        for pid in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)  # the pool processes of our own worker
    model = wait_until(lambda: (m := service.client.get(f"/v1/models/{model_id}").json())["status"] != "uploaded"
                       and m, 30, "the model to be given up on", processes)
    elapsed = time.monotonic() - started
    assert model["status"] == "invalid", model
    assert "died 2 times" in model["error"]
    assert service.inspect_attempts(model_id) == 2
    assert worker.poll() is None
    print(f"\nmodel invalid after {service.inspect_attempts(model_id)} inspections, {elapsed:.1f}s after upload")


def test_broker_restart_loses_no_job(tmp_path, processes, pg_database, private_redis, model_file):
    """Redis is killed (no persistence: every queued message is gone) while one job runs and one waits, and a
    third job is submitted while it is down. All three run exactly once; the worker reconnects by itself."""
    service = deploy(processes, tmp_path / "home", pg_database, private_redis.url)
    worker = service.start_worker("worker", SPAN)
    model_id = service.upload(model_file)
    running = service.submit(model_id)["id"]
    service.wait_measuring(running)
    waiting = service.submit(model_id)["id"]  # its message waits on the broker behind the running job
    assert service.job(waiting)["status"] == "queued"

    private_redis.kill()
    before = time.monotonic()
    response = service.client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
    submit_s = time.monotonic() - before
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "queued"
    submitted_down = response.json()["id"]
    ready = service.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"] != "ok"
    time.sleep(2)
    private_redis.start()
    back = time.monotonic()

    finished = {job_id: service.wait_finished(job_id, 120) for job_id in (running, waiting, submitted_down)}
    recovered_s = time.monotonic() - back
    for job_id, job in finished.items():
        assert (job["status"], job["attempts"]) == ("succeeded", 1), (job_id, job, processes.output())
    assert worker.poll() is None  # the same worker process, reconnected on its own
    print(f"\nsubmit with the broker down: {submit_s:.2f}s (201, queued); all jobs done {recovered_s:.1f}s "
          f"after the broker came back")


def test_database_restart(tmp_path, processes, private_cluster, private_redis, model_file):
    """PostgreSQL stops for longer than the heartbeat timeout while a job runs: the API answers 503 (never 500)
    and recovers by itself; the worker retries its writes and the job succeeds on its first attempt, because
    the reaper does not count an outage of the database against the workers that could not heartbeat."""
    service = deploy(processes, tmp_path / "home", private_cluster.url, private_redis.url)
    service.start_worker("worker", SPAN)
    model_id = service.upload(model_file)
    job_id = service.submit(model_id)["id"]
    service.wait_measuring(job_id)

    private_cluster.stop()
    down = time.time()
    answers = {
        "get job": service.client.get(f"/v1/jobs/{job_id}"),
        "list jobs": service.client.get("/v1/jobs"),
        "submit": service.client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}),
        "readyz": service.client.get("/readyz"),
    }
    for what, response in answers.items():
        assert response.status_code == 503, (what, response.status_code, response.text)
    assert answers["get job"].json()["error"]["code"] == "database_unavailable"
    assert service.client.get("/healthz").status_code == 200
    time.sleep(max(0.0, down + HEARTBEAT_TIMEOUT + 2 - time.time()))

    private_cluster.start()
    up = time.time()
    wait_until(lambda: service.client.get(f"/v1/jobs/{job_id}").status_code == 200, 30,
               "the API to answer again", processes)
    api_recovered_s = time.time() - up
    job = service.wait_finished(job_id)
    assert (job["status"], job["attempts"]) == ("succeeded", 1), (job, processes.output())
    assert _at(job["started_at"]) < down < up < _at(job["finished_at"])
    print(f"\ndatabase down {up - down:.1f}s; API answered again {api_recovered_s:.2f}s after it was back; "
          f"job succeeded {_at(job['finished_at']) - up:.1f}s after")


def test_frozen_worker_is_replaced_and_cannot_overwrite(tmp_path, processes, pg_database, private_redis,
                                                        model_file):
    """SIGSTOP freezes a worker mid-job: the reaper re-queues the job, another worker completes it; SIGCONT
    wakes the first one, which finds the job taken over and stops without touching the result."""
    service = deploy(processes, tmp_path / "home", pg_database, private_redis.url)
    frozen = service.start_worker("frozen", FOREVER)
    job_id = service.submit(service.upload(model_file))["id"]
    service.wait_measuring(job_id)
    frozen_pid = service.worker_pid(job_id, frozen)
    os.killpg(frozen.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    rescue = service.start_worker("rescue", QUICK)
    job = service.wait_finished(job_id)
    rescued_s = time.monotonic() - stopped
    assert (job["status"], job["attempts"]) == ("succeeded", 2), (job, processes.output())
    assert service.worker_pid(job_id, rescue) != frozen_pid
    artifacts = service.client.get(f"/v1/jobs/{job_id}/artifacts").json()

    os.killpg(frozen.pid, signal.SIGCONT)
    wait_until(lambda: "was taken over by another worker" in frozen.log_path.read_text(errors="replace"), 30,
               "the resumed worker to give the job up", processes)
    assert service.job(job_id) == job
    assert service.client.get(f"/v1/jobs/{job_id}/artifacts").json() == artifacts
    assert frozen.poll() is None
    print(f"\nfrozen worker's job re-run and succeeded {rescued_s:.1f}s after SIGSTOP")


def test_api_killed_mid_upload_leaves_nothing_behind(tmp_path, processes, pg_database, private_redis,
                                                     model_file):
    """kill -9 of the API in the middle of a slow upload: no model row, and after a restart the housekeeper
    removes the partial temp file and storage objects that no row refers to, once older than `orphan_age`."""
    home = tmp_path / "home"
    service = deploy(processes, home, pg_database, private_redis.url, MODELPRESS_ORPHAN_AGE="2")
    kept = service.upload(model_file)
    boundary = "faultsboundary"

    def slow_body() -> Iterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.onnx\"\r\n"
               f"Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(2000):
            yield b"\0" * 65536
            time.sleep(0.01)
        yield f"\r\n--{boundary}--\r\n".encode()

    def upload() -> None:
        try:
            service.client.post("/v1/models", content=slow_body(),
                                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        except httpx.HTTPError:
            pass  # the API died under it

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    partial = wait_until(lambda: [p for p in (home / "tmp").glob("*") if p.stat().st_size > 1 << 20], 30,
                         "the upload to be half-way", processes)
    processes.kill(service.api)
    uploader.join(timeout=30)
    assert partial[0].exists()
    # What a kill between storing an upload and committing its row leaves: objects no row refers to.
    storage = open_storage((home / "artifacts").as_uri())
    orphans = [f"tenants/{service.tenant_id}/models/{new_id('mdl')}/model.onnx",
               f"tenants/{service.tenant_id}/jobs/{new_id('job')}/m-compressed.onnx"]
    for key in orphans:
        storage.put_file(key, model_file)
    young = Settings(home=home, database_url=service.env["MODELPRESS_DATABASE_URL"])
    assert sweep_orphans(service.factory, storage, young) == 0  # the default age keeps what is young

    service.start_api()
    swept = time.monotonic()
    wait_until(lambda: not any((home / "tmp").iterdir()) and not any(storage.exists(k) for k in orphans), 30,
               "the housekeeper to remove the partial file and the orphans", processes)
    swept_s = time.monotonic() - swept
    assert [m["id"] for m in service.client.get("/v1/models").json()["data"]] == [kept]
    assert service.client.get(f"/v1/models/{kept}/download").content == model_file.read_bytes()
    print(f"\npartial upload and orphans removed {swept_s:.1f}s after the API restarted (orphan_age 2s)")


def test_sigterm_mid_job(tmp_path, processes, pg_database, private_redis, model_file):
    """SIGTERM to a worker's main process (docker stop, kubectl delete) is Celery's warm shutdown: the running
    job finishes and succeeds, and the queued one stays on the broker for the next worker. SIGTERM to the whole
    process group (systemd's default KillMode=control-group) kills the pool process mid-job instead: the job is
    re-queued by the reaper and run again, never lost nor left `running`."""
    service = deploy(processes, tmp_path / "home", pg_database, private_redis.url)
    worker = service.start_worker("worker", SPAN)
    model_id = service.upload(model_file)
    running = service.submit(model_id)["id"]
    service.wait_measuring(running)
    waiting = service.submit(model_id)["id"]
    worker.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert worker.wait(timeout=90) == 0
    warm_s = time.monotonic() - signalled
    job = service.job(running)
    assert (job["status"], job["attempts"]) == ("succeeded", 1), (job, processes.output())
    assert service.job(waiting)["status"] == "queued"

    group = service.start_worker("group", SPAN)
    service.wait_measuring(waiting)
    os.killpg(group.pid, signal.SIGTERM)
    signalled = time.monotonic()
    assert group.wait(timeout=90) == 0
    assert service.job(waiting)["status"] in ("running", "queued")  # left for the reaper, not finished
    service.start_worker("next", QUICK)
    job = service.wait_finished(waiting)
    rerun_s = time.monotonic() - signalled
    assert (job["status"], job["attempts"]) == ("succeeded", 2), (job, processes.output())
    print(f"\nwarm shutdown waited {warm_s:.1f}s for the running job to succeed; after a process-group SIGTERM "
          f"the job was re-run and succeeded {rerun_s:.1f}s later")
