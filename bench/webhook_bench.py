"""Webhook delivery: how long after a job finishes its event arrives, and what a trickling endpoint costs others.

Runs in-process against a temporary SQLite database (or --database-url postgresql://...) and a local HTTP server on
127.0.0.1 (MODELPRESS_WEBHOOK_ALLOW_PRIVATE on), with the real Housekeeper and sender:
  1. latency: the Housekeeper's loop at the default interval (MODELPRESS_DISPATCH_INTERVAL, 5 s); jobs are finished
     through app.core.jobs at staggered moments; prints job finish -> receipt (min / median / p90 / max).
  2. trickle: one round with good endpoints plus endpoints that trickle a header line every 4 s, at the default
     10 s deadline: when each good event arrives (from the round's start) with 0, 1, and enough trickling events to
     fill every sending thread (other tenants' tricklers, 2 per tenant).

    .venv/bin/python bench/webhook_bench.py [--jobs 12] [--database-url postgresql://...]
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import update  # noqa: E402

from app.api.housekeeping import Housekeeper  # noqa: E402
from app.core import jobs, webhooks  # noqa: E402
from app.core.auth import create_api_key  # noqa: E402
from app.core.config import Settings  # noqa: E402
from app.core.db import make_engine, make_session_factory, session_scope  # noqa: E402
from app.core.ids import new_id  # noqa: E402
from app.core.migrate import upgrade  # noqa: E402
from app.core.queue import make_celery  # noqa: E402
from app.core.statuses import JobStatus  # noqa: E402
from app.core.tables import WebhookEvent  # noqa: E402
from tests.webhook_receiver import Receiver  # noqa: E402


def tenant(factory) -> str:
    with session_scope(factory) as session:
        return create_api_key(session, new_id("tenant"))[0].id


def finish_job(factory, tenant_id: str, url: str) -> float:
    """A job with this webhook_url, claimed and finished; returns when the finish was committed."""
    with session_scope(factory) as session:
        job_id = jobs.create_job(session, tenant_id=tenant_id, model_id="mdl_x", recipe={"steps": []}, datasets={},
                                 target={}, queue="cpu", webhook_url=url).id
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "bench", jobs.stale_cutoff(60))
    with session_scope(factory) as session:
        jobs.finish(session, job_id, "bench", JobStatus.SUCCEEDED, metrics={})
    return time.monotonic()


def latency(factory, settings, receiver, count: int) -> list[float]:
    keeper = Housekeeper(factory, make_celery(settings), settings)
    keeper.start()
    tenant_id = tenant(factory)
    delays = []
    try:
        for index in range(count):
            path = f"/ok-latency-{index}"
            finished = finish_job(factory, tenant_id, receiver.url(path))
            [request] = receiver.wait_for(path, timeout=30)
            delays.append(request.at - finished)
            time.sleep(random.uniform(0, settings.dispatch_interval))  # finish at any phase of the round
    finally:
        keeper.stop()
    return delays


def trickle_round(factory, settings, receiver, tricklers: int, good: int, label: str) -> None:
    with session_scope(factory) as session:  # start from an empty outbox
        session.execute(update(WebhookEvent).where(WebhookEvent.status == "pending").values(status="failed"))
    tenants = [tenant(factory) for _ in range(max(1, (tricklers + 1) // 2))]
    for index in range(tricklers):
        finish_job(factory, tenants[index // 2], receiver.url(f"/trickle-{label}-{index}"))
    good_tenant = tenant(factory)
    for index in range(good):
        finish_job(factory, good_tenant, receiver.url(f"/ok-{label}-{index}"))
    sender = webhooks.WebhookSender(factory, settings)
    start = time.monotonic()
    futures = sender.send_round()
    handed = time.monotonic() - start
    arrivals = [r.at - start for r in receiver.wait_for(f"/ok-{label}-", count=good, timeout=60)]
    wait(futures, timeout=120)
    total = time.monotonic() - start
    sender.close()
    print(f"  {tricklers:2d} trickling + {good} good: round handed rows to the pool in {handed * 1000:.0f} ms; "
          f"good events arrived after {min(arrivals):.2f} .. {max(arrivals):.2f} s; every attempt done after "
          f"{total:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="modelpress-webhook-bench-"))
    settings = Settings(home=home, database_url=args.database_url, webhook_allow_private=True)
    upgrade(settings.resolved_database_url())
    factory = make_session_factory(make_engine(settings.resolved_database_url()))
    with Receiver(trickle_interval=4.0) as receiver:
        print(f"1. job finish -> receipt, housekeeping every {settings.dispatch_interval:g} s "
              f"({settings.resolved_database_url().split(':')[0]}, {args.jobs} jobs):")
        delays = sorted(latency(factory, settings, receiver, args.jobs))
        print(f"  min {delays[0]:.2f} s, median {statistics.median(delays):.2f} s, "
              f"p90 {delays[int(0.9 * (len(delays) - 1))]:.2f} s, max {delays[-1]:.2f} s")
        print(f"2. one round, deadline {webhooks.DEADLINE_S:g} s, {webhooks.WORKERS} threads, "
              f"{webhooks.TENANT_IN_FLIGHT} in flight per tenant, endpoints trickling a line every 4 s:")
        for tricklers in (0, 1, webhooks.WORKERS):
            trickle_round(factory, settings, receiver, tricklers, 4, f"t{tricklers}")


if __name__ == "__main__":
    main()
