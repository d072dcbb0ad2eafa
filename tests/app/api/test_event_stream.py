"""The stream machinery: which event ids are settled (holes wait, then count as rolled back), the process's feed
over a real database, the Last-Event-ID header, and the wire format of one event."""

import asyncio
import json

import pytest
from sqlalchemy import select

from app.api.event_stream import MAX_LAST_EVENT_ID, EventFeed, SettledIds, parse_last_event_id, sse
from app.core import jobs
from app.core.auth import create_api_key
from app.core.db import session_scope
from app.core.errors import ServiceError
from app.core.ids import new_id
from app.core.job_events import progress_report
from app.core.tables import JobEvent


def test_settled_ids_move_over_committed_ids():
    ids = SettledIds(start=10, gap_wait=2.0)
    assert ids.advance([11, 12, 13], now=0.0) == 13
    assert ids.advance([], now=1.0) == 13


def test_a_hole_holds_the_mark_until_it_fills():
    ids = SettledIds(start=10, gap_wait=2.0)
    assert ids.advance([11, 13, 14], now=0.0) == 11  # 12 is still being written
    assert ids.advance([13, 14], now=1.0) == 11
    assert ids.advance([12, 13, 14], now=1.5) == 14  # it committed: nothing was skipped
    assert ids.holes == {}


def test_a_hole_older_than_the_wait_is_taken_for_a_rolled_back_write():
    ids = SettledIds(start=10, gap_wait=2.0)
    assert ids.advance([11, 13, 16], now=0.0) == 11
    assert ids.advance([13, 16], now=1.9) == 11
    assert ids.advance([13, 16], now=2.0) == 16  # 12, 14 and 15 each waited since first seen
    assert ids.holes == {}


def test_holes_seen_later_wait_their_own_time():
    ids = SettledIds(start=0, gap_wait=2.0)
    assert ids.advance([1, 3], now=0.0) == 1
    assert ids.advance([3, 5], now=1.0) == 1
    assert ids.advance([3, 5], now=2.0) == 3  # 2 waited long enough, 4 was first seen at 1.0
    assert ids.advance([5], now=3.0) == 5


def test_last_event_id_header():
    assert parse_last_event_id(None) is None and parse_last_event_id("  ") is None
    assert parse_last_event_id("0") == 0 and parse_last_event_id(" 42 ") == 42
    assert parse_last_event_id(str(MAX_LAST_EVENT_ID)) == MAX_LAST_EVENT_ID
    for bad in ("-1", "1.5", "abc", "1e3", "٣", str(MAX_LAST_EVENT_ID + 1), "9" * 100):
        with pytest.raises(ServiceError) as caught:
            parse_last_event_id(bad)
        assert caught.value.status_code == 400 and "Last-Event-ID" in caught.value.message


def test_an_event_is_an_id_a_kind_and_one_line_of_compact_json():
    wire = sse(7, "progress", {"message": "line one\nline two", "fraction": 0.5})
    assert wire == b'id: 7\nevent: progress\ndata: {"message":"line one\\nline two","fraction":0.5}\n\n'
    assert json.loads(wire.decode().split("data: ", 1)[1])["message"] == "line one\nline two"


def _running_job(factory) -> str:
    with session_scope(factory) as session:
        tenant, _ = create_api_key(session, new_id("tenant"))
        job_id = jobs.create_job(session, tenant_id=tenant.id, model_id="mdl_x", recipe={"steps": []}, datasets={},
                                 target={}, queue="cpu").id
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    return job_id


def _progress(session, job_id: str, number: int) -> None:
    report = progress_report(number / 10, "quantize", f"report {number}")
    jobs.set_progress(session, job_id, "w1", report["fraction"], "quantize", report["message"], report)


def test_the_feed_reads_new_events_once_for_every_stream(factory):
    job_id = _running_job(factory)

    async def scenario():
        feed = EventFeed(factory, poll_interval=0.05, gap_wait=2.0)
        async with feed.subscription():
            before = feed.settled
            with session_scope(factory) as session:
                _progress(session, job_id, 1)
                _progress(session, job_id, 2)
            await feed.wait_beyond(before, timeout=30)
            window = feed.window_after(before)
            return before, feed.settled, window

    before, settled, window = asyncio.run(scenario())
    assert settled > before and window is not None and (window.after, window.upto) == (before, settled)
    mine = [(event.data["message"], job.id) for event, job in window.rows if event.job_id == job_id]
    assert mine == [("report 1", job_id), ("report 2", job_id)]
    assert window.memo("key", lambda: 1) == 1 and window.memo("key", lambda: 2) == 1


def test_the_feed_waits_for_an_event_committed_after_a_later_one(settings, factory):
    """PostgreSQL: one writer takes id N and has not committed when another commits N + 1. The settled id stops
    below N until N commits, so no stream reads past it and misses it."""
    if settings.database_url is None:
        pytest.skip("SQLite has one writer at a time: ids commit in order")
    first_job, second_job = _running_job(factory), _running_job(factory)

    async def scenario():
        feed = EventFeed(factory, poll_interval=0.05, gap_wait=30.0)
        async with feed.subscription():
            slow = factory()
            _progress(slow, first_job, 1)
            slow.flush()  # id N taken, not committed
            slow_id = max(slow.scalars(select(JobEvent.id).where(JobEvent.job_id == first_job)))
            with session_scope(factory) as session:
                _progress(session, second_job, 2)  # N + 1, committed
            await asyncio.sleep(0.5)  # ten polls
            held = feed.settled
            slow.commit()
            slow.close()
            await feed.wait_beyond(slow_id, timeout=30)
            return slow_id, held, feed.settled

    slow_id, held, settled = asyncio.run(scenario())
    assert held < slow_id < settled
