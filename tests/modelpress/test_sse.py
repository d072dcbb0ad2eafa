"""Following a job: the event-stream parser, the live stream over real HTTP (a drop resumed with Last-Event-ID),
and the fall back to ETag polling where there is no stream."""

import json

import pytest

from modelpress import ApiError, Client, Progress
from modelpress.sse import ServerEvent, parse_events
from tests.modelpress.conftest import send_json

JOB = "job_1"
EVENTS = f"/v1/jobs/{JOB}/events"


def job_summary(status: str, fraction: float = 0.0, step: str | None = None) -> dict:
    return {"id": JOB, "model_id": "mdl_1", "status": status, "recipe": None, "datasets": {}, "target": {},
            "progress": {"fraction": fraction, "step": step, "message": None}, "error": None, "metrics": None,
            "artifacts": [], "attempts": 1, "created_at": "2026-12-04T10:00:00Z", "started_at": None,
            "finished_at": None}


def progress(stage: str, fraction: float, step_index: int | None = None) -> dict:
    return {"stage": stage, "step_index": step_index, "fraction": fraction, "epoch": None, "trial": None,
            "message": f"{stage} now"}


def event(event_id: int, kind: str, data: dict) -> bytes:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def test_parser_follows_the_event_stream_rules() -> None:
    lines = [": ping", "", "id: 7", "event: progress", "data: {\"a\":", "data: 1}", "", "retry: 500", "",
             "id: 8\r\n", "data:no space", "", "event: status", "data", "", "id: 9", "event: end", "data: {}"]
    assert list(parse_events(lines)) == [
        ServerEvent("progress", '{"a":\n1}', "7"),
        ServerEvent("message", "no space", "8"),
        ServerEvent("status", "", "8"),
    ]  # a comment and events without data dispatch nothing; an unfinished event at the end is dropped


def _chunk(handler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


def _stream_headers(handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def test_a_dropped_stream_is_resumed_after_the_last_event(scripted) -> None:
    def respond(handler, seen):
        if handler.path != EVENTS:
            send_json(handler, 500, {"error": {"code": "internal_error", "message": "polled"}})
            return
        _stream_headers(handler)
        if "last-event-id" not in handler.headers:
            _chunk(handler, b": ping\n\n" + event(1, "status", job_summary("running")))
            _chunk(handler, event(2, "progress", progress("measure", 0.15)))
            _chunk(handler, b"id: 3\nevent: progress\ndata: {\"sta")  # the connection breaks mid-event
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        _chunk(handler, event(3, "progress", progress("quantize", 0.5, step_index=0)) + b": ping\n\n")
        _chunk(handler, event(4, "end", job_summary("succeeded", 1.0, "upload")))
        handler.wfile.write(b"0\r\n\r\n")

    server = scripted(respond)
    updates: list[Progress] = []
    with Client(server.url, "key") as client:
        job = client.wait(JOB, on_progress=updates.append, timeout=30)
    assert job.status == "succeeded" and job.id == JOB
    assert [(u.status, u.stage, u.step_index) for u in updates] == [
        ("running", None, None), (None, "measure", None), (None, "quantize", 0), ("succeeded", "upload", None)]
    requests = server.requests_to(EVENTS)
    assert len(requests) == 2 and len(server.seen) == 2  # never polled
    assert "last-event-id" not in requests[0].headers and requests[1].headers["last-event-id"] == "2"
    assert requests[0].headers["accept"] == "text/event-stream"


@pytest.mark.parametrize("events_answer", ["404", "json", "reset", "busy"])
def test_without_a_stream_the_job_is_polled_with_its_etag(scripted, events_answer) -> None:
    def respond(handler, seen):
        if handler.path == EVENTS:
            if events_answer == "404":
                send_json(handler, 404, {"error": {"code": "not_found", "message": "Not Found"}})
            elif events_answer == "json":
                send_json(handler, 200, job_summary("running"))
            elif events_answer == "busy":  # every stream slot taken, for longer than the client waits
                send_json(handler, 429, {"error": {"code": "too_many_streams", "message": "busy"}},
                          {"Retry-After": "0"})
            else:
                handler.close_connection = True
                handler.connection.shutdown(2)
            return
        polls = [s for s in seen if s.path == f"/v1/jobs/{JOB}"]
        if not polls:
            send_json(handler, 200, job_summary("running", 0.15, "measure"), {"ETag": 'W/"one"'})
        elif len(polls) == 1:
            handler.send_response(304)
            handler.send_header("ETag", 'W/"one"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        else:
            send_json(handler, 200, job_summary("succeeded", 1.0, "upload"), {"ETag": 'W/"two"'})

    server = scripted(respond)
    updates: list[Progress] = []
    with Client(server.url, "key", max_retries=2) as client:
        job = client.wait(JOB, on_progress=updates.append, timeout=30, poll_interval=0.05)
    assert job.status == "succeeded"
    assert [(u.status, u.stage) for u in updates] == [("running", "measure"), ("succeeded", "upload")]
    polls = server.requests_to(f"/v1/jobs/{JOB}")
    assert len(polls) == 3
    assert "if-none-match" not in polls[0].headers
    assert polls[1].headers["if-none-match"] == 'W/"one"' and polls[2].headers["if-none-match"] == 'W/"one"'
    assert len(server.requests_to(EVENTS)) == (3 if events_answer == "busy" else 1)


def test_a_refused_key_on_the_stream_is_raised_not_polled(scripted) -> None:
    server = scripted(lambda handler, seen: send_json(
        handler, 401, {"error": {"code": "unauthorized", "message": "invalid API key"}}))
    with Client(server.url, "mp_wrong") as client, pytest.raises(ApiError) as refused:
        client.wait(JOB, timeout=30)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized") and len(server.seen) == 1


def test_wait_gives_up_after_its_timeout(scripted) -> None:
    server = scripted(lambda handler, seen: send_json(handler, 404, {"error": {"code": "not_found", "message": "x"}})
                      if handler.path == EVENTS else send_json(handler, 200, job_summary("running")))
    with Client(server.url, "key") as client, pytest.raises(TimeoutError, match=JOB):
        client.wait(JOB, timeout=0.3, poll_interval=0.05)
