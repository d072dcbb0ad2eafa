"""Server-Sent Events over real HTTP: two `modelpress api` replicas and a `modelpress worker` on PostgreSQL and
Redis, a real job, and clients reading the streams as a dashboard would (httpx-sse, and raw lines for comments)."""

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import create_pg_database, drop_pg_database, free_port
from tests.e2e.conftest import MODELPRESS, Processes, http_ok, wait_until
from tests.helpers import save_onnx

pytestmark = pytest.mark.e2e
STREAM_LIMIT = 3
PROGRESS_FIELDS = {"stage", "step_index", "fraction", "epoch", "trial", "message"}


@dataclass
class Service:
    replicas: list[str]  # base URLs of the two API processes
    keys: dict[str, str]  # tenant -> API key
    processes: Processes

    def client(self, tenant: str, replica: int = 0) -> httpx.Client:
        return httpx.Client(base_url=self.replicas[replica], headers={"Authorization": f"Bearer {self.keys[tenant]}"},
                            timeout=httpx.Timeout(30, read=60))


@dataclass
class Event:
    id: int
    event: str
    data: dict


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("events")
    database_url = create_pg_database()
    env = {"MODELPRESS_HOME": str(folder / "home"), "MODELPRESS_DATABASE_URL": database_url,
           "MODELPRESS_BROKER_URL": redis_url, "MODELPRESS_LATENCY_RUNS": "20",
           "MODELPRESS_EVENT_HEARTBEAT_INTERVAL": "0.5", "MODELPRESS_EVENT_POLL_INTERVAL": "0.2",
           "MODELPRESS_TENANT_MAX_EVENT_STREAMS": str(STREAM_LIMIT)}

    def run(*args: str) -> str:
        done = subprocess.run([*MODELPRESS, *args], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    processes = Processes(folder)
    try:
        run("migrate")
        keys = {tenant: run("keys", "create", "--tenant", tenant) for tenant in ("acme", "globex", "initech")}
        replicas = []
        for name in ("api-1", "api-2"):
            port = free_port()
            processes.start(name, [*MODELPRESS, "api", "--port", str(port)], env)
            replicas.append(f"http://127.0.0.1:{port}")
        processes.start("worker", [*MODELPRESS, "worker", "--queues", "cpu"], env)
        for base in replicas:
            wait_until(lambda: http_ok(f"{base}/readyz"), 60, "the API to become ready", processes)
        yield Service(replicas, keys, processes)
    finally:
        processes.stop_all()
        drop_pg_database(database_url)


def read_events(response_source, limit: int | None = None) -> list[Event]:
    """The events of a stream until it closes (or `limit` events), heartbeats left out."""
    events = []
    for sse in response_source.iter_sse():
        if sse.event == "message" and not sse.data:
            continue  # httpx-sse reports a `: ping` comment after an id as an empty message
        events.append(Event(int(sse.id), sse.event, json.loads(sse.data)))
        if limit is not None and len(events) == limit:
            break
    return events


def stream(client: httpx.Client, path: str, last_event_id: int | None = None, limit: int | None = None) -> list[Event]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    with connect_sse(client, "GET", path, headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return read_events(source, limit)


@pytest.fixture(scope="module")
def watched_job(service, tmp_path_factory) -> tuple[str, list[Event]]:
    """A job submitted and watched from its start on replica 1 until its stream ended."""
    client = service.client("acme")
    with open(save_onnx(tmp_path_factory.mktemp("model") / "m.onnx", 16, 64, 4), "rb") as fh:
        model = client.post("/v1/models", files={"file": ("m.onnx", fh)}).json()
    wait_until(lambda: client.get(f"/v1/models/{model['id']}").json()["status"] == "ready", 120, "inspection",
               service.processes)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [
        {"op": "quantize", "method": "dynamic", "dtype": "int8"}]}}).json()
    return job["id"], stream(client, f"/v1/jobs/{job['id']}/events")


def test_a_job_streams_its_statuses_and_progress_in_order_then_ends(service, watched_job):
    job_id, events = watched_job
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)), ids
    order = [e.data["status"] if e.event == "status" else e.event for e in events]
    assert order[:2] == ["queued", "running"] and order[-2:] == ["succeeded", "end"], order
    assert set(order[2:-2]) == {"progress"}, order
    progress = [e.data for e in events if e.event == "progress"]
    assert all(set(p) == PROGRESS_FIELDS for p in progress), progress
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] <= 1, fractions
    assert all(isinstance(p["stage"], str) and isinstance(p["message"], str) for p in progress)
    # A status event and the end carry the job as GET /v1/jobs/{id} shows it (as it was then, for earlier ones).
    now = service.client("acme").get(f"/v1/jobs/{job_id}").json()
    assert events[-1].data == now and events[-2].data == now
    queued = events[0].data
    assert queued["id"] == job_id and queued["attempts"] == 0 and queued["started_at"] is None
    assert queued["metrics"] is None and queued["artifacts"] == [] and queued.keys() == now.keys()
    running = next(e.data for e in events if e.event == "status" and e.data["status"] == "running")
    assert running["attempts"] == 1 and running["started_at"] == now["started_at"] and running["finished_at"] is None


def test_resuming_with_last_event_id_gives_exactly_the_events_after_it_on_another_replica(service, watched_job):
    job_id, events = watched_job
    other_replica = service.client("acme", replica=1)
    for position in (0, len(events) // 2, len(events) - 2):
        resumed = stream(other_replica, f"/v1/jobs/{job_id}/events", last_event_id=events[position].id)
        assert resumed == events[position + 1:], position


def test_a_finished_job_replays_its_whole_history_then_ends(service, watched_job):
    """The live stream was mostly built from the API process's shared windows, the replay is read from the
    database by the stream itself: both must say the same."""
    job_id, events = watched_job
    assert stream(service.client("acme", replica=1), f"/v1/jobs/{job_id}/events") == events


def test_the_tenant_stream_carries_each_job_event_with_its_job_id(service, watched_job):
    job_id, events = watched_job
    without_end = events[:-1]
    replayed = stream(service.client("acme"), "/v1/events", last_event_id=0, limit=len(without_end))
    assert replayed == [Event(e.id, e.event, {**e.data, "job_id": job_id}) for e in without_end]
    after = stream(service.client("acme", replica=1), "/v1/events", last_event_id=without_end[1].id, limit=1)
    assert after == [replayed[2]]


def raw_lines(client: httpx.Client, path: str, pings: int, **headers: str) -> list[str]:
    """A stream's lines up to its `pings`-th heartbeat."""
    lines = []
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if lines.count(": ping") == pings:
                return lines
    raise AssertionError(f"the stream closed: {lines}")


def test_heartbeats_keep_an_idle_stream_alive(service):
    lines = raw_lines(service.client("globex"), "/v1/events", pings=3)
    assert [line for line in lines if line] == [": ping"] * 3


def test_another_tenants_job_and_events_stay_hidden(service, watched_job):
    job_id, _ = watched_job
    intruder = service.client("globex")
    response = intruder.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    # Its own stream, replayed from the start, holds nothing (the replay comes before the first heartbeat).
    assert [line for line in raw_lines(intruder, "/v1/events", pings=1, **{"Last-Event-ID": "0"}) if line] == [
        ": ping"]


def test_a_bad_last_event_id_is_refused(service, watched_job):
    job_id, _ = watched_job
    response = service.client("acme").get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "soon"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor" and "Last-Event-ID" in response.json()["error"][
        "message"]


def open_stream(client: httpx.Client) -> httpx.Response:
    return client.send(client.build_request("GET", "/v1/events"), stream=True)


def test_open_streams_are_limited_per_tenant_over_all_replicas_and_freed_on_disconnect(service):
    clients = [service.client("initech", replica=n % 2) for n in range(STREAM_LIMIT + 1)]
    opened = []
    try:
        for client in clients[:STREAM_LIMIT]:
            opened.append(open_stream(client))
            assert opened[-1].status_code == 200
        refused = open_stream(clients[-1])
        refused.read()
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_streams" and int(refused.headers["retry-after"]) >= 1
        other_tenant = open_stream(service.client("acme"))
        other_tenant.close()
        assert other_tenant.status_code == 200  # another tenant's streams are its own

        opened.pop(0).close()  # the client goes away: its slot is freed

        def reopens() -> bool:
            response = open_stream(clients[-1])
            response.close()
            return response.status_code == 200

        wait_until(reopens, 30, "a slot freed by a closed stream", service.processes)
    finally:
        for response in opened:
            response.close()
