"""Server-Sent Events benchmark: how many open streams one API process holds, and how far events lag the database.

Starts `modelpress api` (one process) on a fresh PostgreSQL database with the Redis broker, opens N streams of
GET /v1/events with one httpx async client, and for each N prints:
  - opening: seconds to get all N answers (200, headers);
  - idle (no events, --seconds long): the API process's resident memory and CPU, and the heartbeats each
    stream received (expected: seconds / heartbeat interval);
  - events (--rate events a second for --seconds, written as the worker writes them: jobs.set_progress with a
    progress report, committed here): delay from the commit to the arrival of the event at the client, p50 / p95 /
    max over every (stream, event), whether every stream got every event, and the API's CPU meanwhile.
The client runs on the same machine: its own CPU is shown, as it competes with the server for the cores.

    .venv/bin/python bench/sse_bench.py [--streams 1,100,500,1000] [--seconds 10] [--heartbeat 2] [--rate 4]

Needs the `test` extra (httpx) and PostgreSQL + Redis on 127.0.0.1 (as the tests).
"""

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core import jobs  # noqa: E402
from app.core.auth import create_api_key  # noqa: E402
from app.core.config import Settings  # noqa: E402
from app.core.db import make_engine, make_session_factory, session_scope  # noqa: E402
from app.core.job_events import progress_report  # noqa: E402
from app.core.migrate import upgrade  # noqa: E402
from tests.conftest import create_pg_database, drop_pg_database, free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Streams:
    """N open GET /v1/events streams: per stream, the heartbeats seen and the arrival time of each event."""

    def __init__(self, base: str, key: str, count: int):
        self.count = count
        self.client = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"},
                                        timeout=httpx.Timeout(30, read=None),
                                        limits=httpx.Limits(max_connections=count + 10))
        self.pings = [0] * count
        self.arrivals: list[dict[int, float]] = [{} for _ in range(count)]
        self.opened = 0
        self.all_open = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def _one(self, index: int) -> None:
        async with self.client.stream("GET", "/v1/events") as response:
            assert response.status_code == 200, await response.aread()
            self.opened += 1
            if self.opened == self.count:
                self.all_open.set()
            async for line in response.aiter_lines():
                if line == ": ping":
                    self.pings[index] += 1
                elif line.startswith("data: "):
                    message = json.loads(line[6:]).get("message") or ""
                    if message.startswith("bench "):
                        self.arrivals[index][int(message.split()[1])] = time.time()

    async def open(self) -> float:
        started = time.perf_counter()
        self.tasks = [asyncio.create_task(self._one(i)) for i in range(self.count)]
        while not self.all_open.is_set():
            failed = [t for t in self.tasks if t.done()]
            if failed:
                failed[0].result()
            await asyncio.sleep(0.05)
        return time.perf_counter() - started

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.aclose()


def write_events(factory, job_id: str, rate: float, seconds: float, commits: dict[int, float]) -> None:
    """Progress events as a worker writes them, `rate` a second; the commit time of each by its number."""
    interval, number, deadline = 1 / rate, 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        report = progress_report(number % 100 / 100, "bench", f"bench {number}")
        with session_scope(factory) as session:
            jobs.set_progress(session, job_id, "bench-worker", report["fraction"], "bench", report["message"],
                              report)
        commits[number] = time.time()
        number += 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def measure(base: str, key: str, pid: int, factory, job_id: str, count: int, args) -> dict:
    streams = Streams(base, key, count)
    try:
        open_seconds = await streams.open()
        await asyncio.sleep(1)  # let the opening settle before measuring idle
        pings_before = list(streams.pings)
        cpu, own, wall = process_cpu_seconds(pid), own_cpu_seconds(), time.perf_counter()
        await asyncio.sleep(args.seconds)
        idle_wall = time.perf_counter() - wall
        idle_cpu = (process_cpu_seconds(pid) - cpu) / idle_wall
        idle_client = (own_cpu_seconds() - own) / idle_wall
        pings = [after - before for after, before in zip(streams.pings, pings_before)]
        rss = resident_mib(pid)

        commits: dict[int, float] = {}
        cpu, own, wall = process_cpu_seconds(pid), own_cpu_seconds(), time.perf_counter()
        writer = threading.Thread(target=write_events, args=(factory, job_id, args.rate, args.seconds, commits))
        writer.start()
        while writer.is_alive():
            await asyncio.sleep(0.1)
        await asyncio.sleep(max(3.0, 2 * args.heartbeat))  # stragglers
        busy_wall = time.perf_counter() - wall
        busy_cpu, busy_client = (process_cpu_seconds(pid) - cpu) / busy_wall, (own_cpu_seconds() - own) / busy_wall
        delays = [arrived[n] - committed for arrived in streams.arrivals for n, committed in commits.items()
                  if n in arrived]
        complete = sum(all(n in arrived for n in commits) for arrived in streams.arrivals)
        return {"streams": count, "open_s": open_seconds, "rss_mib": rss, "idle_cpu": idle_cpu,
                "client_cpu": idle_client, "pings_min": min(pings), "pings_expected": idle_wall / args.heartbeat,
                "events": len(commits), "complete": complete, "busy_cpu": busy_cpu, "busy_client": busy_client,
                "p50_ms": 1000 * percentile(delays, 50), "p95_ms": 1000 * percentile(delays, 95),
                "max_ms": 1000 * max(delays)}
    finally:
        await streams.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,100,500,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=4.0, help="events per second in the events phase")
    parser.add_argument("--poll", type=float, default=0.5, help="MODELPRESS_EVENT_POLL_INTERVAL")
    args = parser.parse_args()

    database_url = create_pg_database()
    work = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    api = None
    try:
        settings = Settings(home=work, database_url=database_url)
        upgrade(settings.resolved_database_url())
        factory = make_session_factory(make_engine(settings.resolved_database_url()))
        with session_scope(factory) as session:
            tenant, key = create_api_key(session, "bench")
            job_id = jobs.create_job(session, tenant_id=tenant.id, model_id="mdl_bench", recipe={"steps": []},
                                     datasets={}, target={}, queue="cpu").id
            jobs.claim(session, job_id, "bench-worker", jobs.stale_cutoff(3600))
        port = free_port()
        env = {**os.environ, "MODELPRESS_HOME": str(work), "MODELPRESS_DATABASE_URL": database_url,
               "MODELPRESS_BROKER_URL": "redis://127.0.0.1:6379/" + os.environ.get("MODELPRESS_TEST_REDIS_DB", "9"),
               "MODELPRESS_TENANT_MAX_EVENT_STREAMS": "0", "MODELPRESS_TENANT_REQUESTS_PER_MINUTE": "0",
               "MODELPRESS_EVENT_HEARTBEAT_INTERVAL": str(args.heartbeat),
               "MODELPRESS_EVENT_POLL_INTERVAL": str(args.poll)}
        log = open(work / "api.log", "wb")
        api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
            time.sleep(0.2)
        print(f"one API process (pid {api.pid}), PostgreSQL + Redis; heartbeat {args.heartbeat} s, poll "
              f"{args.poll} s; idle and events phases {args.seconds} s each, {args.rate} events/s; "
              f"API RSS with no stream: {resident_mib(api.pid):.0f} MiB")
        header = ("| streams | open (s) | API RSS (MiB) | API CPU idle | client CPU idle | pings min/expected | "
                  "all events | API CPU events | client CPU events | delay p50 (ms) | p95 (ms) | max (ms) |")
        print(header)
        print("|" + " --- |" * (header.count("|") - 1))
        for count in [int(n) for n in args.streams.split(",")]:
            row = asyncio.run(measure(base, key, api.pid, factory, job_id, count, args))
            print(f"| {row['streams']} | {row['open_s']:.2f} | {row['rss_mib']:.0f} | {100 * row['idle_cpu']:.0f}% | "
                  f"{100 * row['client_cpu']:.0f}% | {row['pings_min']}/{row['pings_expected']:.0f} | "
                  f"{row['complete']}/{row['streams']} x {row['events']} | {100 * row['busy_cpu']:.0f}% | "
                  f"{100 * row['busy_client']:.0f}% | "
                  f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['max_ms']:.0f} |", flush=True)
    finally:
        if api is not None:
            api.terminate()
            api.wait(timeout=30)
        drop_pg_database(database_url)


if __name__ == "__main__":
    main()
