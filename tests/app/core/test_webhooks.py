"""Webhooks: target checks, signing (verified with the `standardwebhooks` library), backoff, leases, and sending
for real over HTTP to a local server (webhook_allow_private on) from jobs finished through app.core.jobs."""

import base64
import socket
import threading
import time
from concurrent.futures import wait
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.core import jobs, webhooks
from app.core.auth import create_api_key
from app.core.db import make_engine, make_session_factory, session_scope, utcnow
from app.core.ids import new_id
from app.core.statuses import JobStatus
from app.core.tables import WebhookAttempt, WebhookEvent
from tests.webhook_receiver import Receiver, self_signed
from tests.worker.conftest import add_job, add_model, db, worker_env  # noqa: F401  (fixtures of the real-job test)

# --- target checks ---------------------------------------------------------------------------------------------

REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.2:8080/hook", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped form of 127.0.0.1, a loopback"),
    ("http://[::ffff:7f00:1]/", "IPv4-mapped form of 127.0.0.1, a loopback"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[::127.0.0.1]/", "IPv4-compatible form of 127.0.0.1"),
    ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 form of 169.254.169.254, a link-local"),
    ("http://[2002:a00:1::]/", "6to4 form of 10.0.0.1, a private"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://100.64.0.1/", "not a public address"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.2.1/", "private"),  # documentation range
    ("ftp://8.8.8.8/", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("http://user:pw@8.8.8.8/", "credentials"),
    ("http://999.1.1.1/", "not a valid IPv4 address"),
]


@pytest.mark.parametrize("url, why", REFUSED)
def test_non_public_literal_targets_are_refused(url, why):
    with pytest.raises(webhooks.TargetRefused, match=why):
        webhooks.check_submitted_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["https://8.8.8.8/hook", "http://[2606:4700:4700::1111]:8443/x?y=1",
                                 "http://[::ffff:8.8.8.8]/", "https://hooks.example.com/a/b?c=d",
                                 "http://localhost/"])  # a name: checked when resolved, at each delivery
def test_public_addresses_and_names_pass_at_submission(url):
    webhooks.check_submitted_url(url, allow_private=False)


def test_allow_private_allows_private_but_never_unspecified_or_multicast():
    for url in ("http://127.0.0.1:9/", "http://10.0.0.1/", "http://169.254.169.254/", "http://[::1]/"):
        webhooks.check_submitted_url(url, allow_private=True)
    for url in ("http://0.0.0.0/", "http://224.0.0.1/", "http://[::]/"):
        with pytest.raises(webhooks.TargetRefused):
            webhooks.check_submitted_url(url, allow_private=True)


def test_parse_target_keeps_the_host_for_the_host_header():
    target = webhooks.parse_target("https://Hooks.Example.com:8443/a/b?c=d#frag")
    assert (target.scheme, target.host, target.port, target.path) == ("https", "hooks.example.com", 8443, "/a/b?c=d")
    assert target.host_header == "hooks.example.com:8443" and target.literal is None
    assert webhooks.parse_target("http://[::1]/").host_header == "[::1]"
    assert webhooks.parse_target("http://example.com").path == "/"


@pytest.fixture
def receiver():
    with Receiver(trickle_interval=0.3) as server:
        yield server


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0x7f000001", "2130706433", "[::ffff:127.0.0.1]"])
def test_delivery_refuses_loopback_in_every_form_and_sends_nothing(receiver, host):
    url = f"http://{host}:{receiver.port}/ok"
    outcome = webhooks.post(url, b"{}", {"webhook-id": "msg_x"}, allow_private=False)
    assert outcome.status_code is None and outcome.error.startswith("target refused"), outcome
    assert receiver.received() == []


def test_delivery_resolves_once_and_connects_to_the_checked_address(receiver, monkeypatch):
    """The name is looked up once per attempt; the connection goes to that address (numeric, no second lookup),
    with the name in the Host header."""
    real = socket.getaddrinfo
    names = []

    def counting(host, *args, **kwargs):
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except OSError:
            names.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    outcome = webhooks.post(receiver.url("/ok", host="localhost"), b"{}", {"webhook-id": "msg_x"},
                            allow_private=True)
    assert outcome.delivered, outcome
    assert names == ["localhost"]
    assert receiver.received("/ok")[0].headers["host"] == f"localhost:{receiver.port}"


def test_https_checks_the_certificate_against_the_url_host(tmp_path):
    server_tls, client_tls = self_signed(tmp_path, "localhost")
    with Receiver(tls=server_tls) as server:
        good = webhooks.post(server.url("/ok", host="localhost"), b"{}", {"webhook-id": "msg_x"},
                             allow_private=True, ssl_context=client_tls)
        assert good.delivered, good
        # Same server, same address, but the URL names 127.0.0.1, which the certificate does not cover.
        bad = webhooks.post(server.url("/ok"), b"{}", {"webhook-id": "msg_y"}, allow_private=True,
                            ssl_context=client_tls)
        assert bad.status_code is None and bad.error.startswith("TLS failed"), bad
        assert len(server.received("/ok")) == 1


def test_redirect_is_a_failed_attempt_and_is_not_followed(receiver):
    outcome = webhooks.post(receiver.url("/redirect"), b"{}", {"webhook-id": "msg_x"}, allow_private=True)
    assert (outcome.status_code, outcome.delivered) == (302, False)
    assert "redirect" in outcome.error
    time.sleep(0.2)
    assert receiver.received("/target") == []


def test_trickling_endpoint_is_cut_at_the_total_deadline(receiver):
    start = time.monotonic()
    outcome = webhooks.post(receiver.url("/trickle"), b"{}", {"webhook-id": "msg_x"}, deadline_s=1.5,
                            allow_private=True)
    took = time.monotonic() - start
    assert outcome.status_code is None and "within 1.5 s" in outcome.error
    assert 1.4 <= took < 2.5 and 1400 <= outcome.duration_ms < 2500


def test_closed_port_fails_fast():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = webhooks.post(f"http://127.0.0.1:{port}/", b"{}", {}, allow_private=True)
    assert outcome.status_code is None and "connection failed" in outcome.error and outcome.duration_ms < 2000


# --- signing ---------------------------------------------------------------------------------------------------

def test_secret_format():
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    assert webhooks.new_secret() != secret


def test_signature_verifies_with_standardwebhooks():
    secret, other = webhooks.new_secret(), webhooks.new_secret()
    body = webhooks.event_body({"type": "job.succeeded", "data": {"id": "job_1"}})
    timestamp = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(timestamp),
               "webhook-signature": webhooks.sign("msg_1", timestamp, body, [secret])}
    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded", "data": {"id": "job_1"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    both = {**headers, "webhook-signature": webhooks.sign("msg_1", timestamp, body, [secret, other])}
    assert len(both["webhook-signature"].split(" ")) == 2
    Webhook(secret).verify(body, both)
    Webhook(other).verify(body, both)


# --- backoff ---------------------------------------------------------------------------------------------------

def test_backoff_schedule():
    assert [webhooks.retry_delay(n) for n in range(1, 10)] == [4, 12, 36, 108, 324, 972, 2916, 3600, 3600]
    created = utcnow()
    assert webhooks.next_attempt_at(created, 1, created, 24) == created + timedelta(seconds=4)
    # Past the retry window there is no next attempt: the event fails.
    late = created + timedelta(hours=23, minutes=59)
    assert webhooks.next_attempt_at(created, 20, late, 24) is None
    # Attempts over 24 h with every attempt failing at once: the schedule above, then hourly.
    now, attempts = created, 1
    while (due := webhooks.next_attempt_at(created, attempts, now, 24)) is not None:
        now, attempts = due, attempts + 1
    assert 25 <= attempts <= 32 and now <= created + timedelta(hours=24)


# --- the outbox, leases and sending ----------------------------------------------------------------------------

@pytest.fixture
def wsettings(settings):
    return settings.model_copy(update={"webhook_allow_private": True})


@pytest.fixture
def factory(wsettings):
    engine = make_engine(wsettings.resolved_database_url())
    factory = make_session_factory(engine)
    # The test databases are shared by many tests: leave no earlier test's pending event for these senders.
    with session_scope(factory) as session:
        session.execute(update(WebhookEvent).where(WebhookEvent.status == "pending").values(status="failed"))
    yield factory
    with session_scope(factory) as session:
        session.execute(update(WebhookEvent).where(WebhookEvent.status == "pending").values(status="failed"))
    engine.dispose()


@pytest.fixture
def tenant_id(factory):
    with session_scope(factory) as session:
        return create_api_key(session, new_id("tenant"))[0].id


def finished_job(factory, tenant_id, url, status=JobStatus.SUCCEEDED, **outcome) -> str:
    """A job with this webhook_url, run to `status` through the job state machine."""
    with session_scope(factory) as session:
        job_id = jobs.create_job(session, tenant_id=tenant_id, model_id="mdl_x", recipe={"steps": []}, datasets={},
                                 target={}, queue="cpu", webhook_url=url).id
    with session_scope(factory) as session:
        assert jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60)) is not None
    with session_scope(factory) as session:
        assert jobs.finish(session, job_id, "w1", status, **outcome)
    return job_id


def events(factory, job_id) -> list[WebhookEvent]:
    with factory() as session:
        return list(session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id)))


def attempts_of(factory, event_id) -> list[WebhookAttempt]:
    with factory() as session:
        return list(session.scalars(select(WebhookAttempt).where(WebhookAttempt.event_id == event_id)
                                    .order_by(WebhookAttempt.id)))


def run_round(sender) -> list:
    futures = sender.send_round()
    wait(futures, timeout=30)
    return futures


def test_terminal_transitions_enqueue_one_event_each(factory, tenant_id):
    url = "https://hooks.example.com/x"
    failed = finished_job(factory, tenant_id, url, JobStatus.FAILED, error_code="invalid_model",
                          error_message="does not load")
    [event] = events(factory, failed)
    assert (event.type, event.status, event.attempts, event.url) == ("job.failed", "pending", 0, url)
    assert event.id.startswith("msg_") and event.next_attempt_at <= utcnow()
    data = event.payload["data"]
    assert event.payload["type"] == "job.failed" and event.payload["timestamp"].endswith("Z")
    assert data == {"id": failed, "status": "failed", "model_id": "mdl_x", "finished_at": data["finished_at"],
                    "error": {"code": "invalid_model", "message": "does not load"}}

    succeeded = finished_job(factory, tenant_id, url)
    assert events(factory, succeeded)[0].payload["data"]["error"] is None
    # A second finish of the same job loses its guard and adds nothing.
    with session_scope(factory) as session:
        assert not jobs.finish(session, succeeded, "w1", JobStatus.FAILED)
    assert len(events(factory, succeeded)) == 1

    with session_scope(factory) as session:  # cancelled while queued
        job = jobs.create_job(session, tenant_id=tenant_id, model_id="mdl_x", recipe={"steps": []}, datasets={},
                              target={}, queue="cpu", webhook_url=url)
        assert jobs.request_cancel(session, job)
    assert [e.type for e in events(factory, job.id)] == ["job.cancelled"]

    with session_scope(factory) as session:  # no webhook_url, no event
        job = jobs.create_job(session, tenant_id=tenant_id, model_id="mdl_x", recipe={"steps": []}, datasets={},
                              target={}, queue="cpu")
        assert jobs.request_cancel(session, job)
    assert events(factory, job.id) == []


def test_reaper_failing_a_job_enqueues_its_event_and_requeueing_does_not(factory, tenant_id):
    from app.core.tables import Job

    ids = []
    for attempts in (3, 1):
        with session_scope(factory) as session:
            job = jobs.create_job(session, tenant_id=tenant_id, model_id="mdl_x", recipe={"steps": []},
                                  datasets={}, target={}, queue="cpu", webhook_url="https://hooks.example.com/r")
            ids.append(job.id)
        with session_scope(factory) as session:
            session.execute(update(Job).where(Job.id == job.id).values(
                status="running", attempts=attempts, worker_id="dead", heartbeat_at=utcnow() - timedelta(hours=1)))
    with session_scope(factory) as session:
        outcome = jobs.reap_stale(session, jobs.stale_cutoff(60), 3)
    assert ids[0] in outcome["failed"] and ids[1] in outcome["requeued"]
    [event] = events(factory, ids[0])
    assert event.type == "job.failed" and event.payload["data"]["error"]["code"] == "worker_lost"
    assert events(factory, ids[1]) == []


def test_event_is_delivered_signed_once(factory, wsettings, tenant_id, receiver):
    job_id = finished_job(factory, tenant_id, receiver.url("/ok"))
    sender = webhooks.WebhookSender(factory, wsettings, deadline_s=3)
    try:
        assert len(run_round(sender)) == 1
        assert run_round(sender) == []  # nothing left to send
    finally:
        sender.close()
    [request] = receiver.received("/ok")
    [event] = events(factory, job_id)
    assert (event.status, event.attempts, event.last_status_code) == ("delivered", 1, 200)
    assert event.delivered_at is not None and event.next_attempt_at is None and event.lease_until is None
    with session_scope(factory) as session:
        secret = webhooks.get_secret(session, tenant_id).secret
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload == event.payload and request.headers["webhook-id"] == event.id
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 10
    [attempt] = attempts_of(factory, event.id)
    assert (attempt.status_code, attempt.error) == (200, None) and attempt.duration_ms >= 0


def test_failed_attempt_is_retried_with_the_same_id_on_its_due_time(factory, wsettings, tenant_id, receiver):
    job_id = finished_job(factory, tenant_id, receiver.url("/flaky"))
    sender = webhooks.WebhookSender(factory, wsettings, deadline_s=3)
    try:
        run_round(sender)
        [event] = events(factory, job_id)
        assert (event.status, event.attempts, event.last_status_code) == ("pending", 1, 500)
        wait_s = (event.next_attempt_at - utcnow()).total_seconds()
        assert 2.5 < wait_s <= 4.0  # the first retry, 4 s after the failure
        assert run_round(sender) == []  # not due yet
        with session_scope(factory) as session:  # let the clock pass the due time
            session.execute(update(WebhookEvent).where(WebhookEvent.id == event.id)
                            .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        run_round(sender)
    finally:
        sender.close()
    first, second = receiver.received("/flaky")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event.id
    assert first.body == second.body
    [event] = events(factory, job_id)
    assert (event.status, event.attempts, event.last_status_code) == ("delivered", 2, 200)
    assert [(a.status_code, a.error) for a in attempts_of(factory, event.id)] == [
        (500, "the endpoint answered HTTP 500"), (200, None)]


def test_event_past_its_retry_window_fails(factory, wsettings, tenant_id, receiver):
    job_id = finished_job(factory, tenant_id, receiver.url("/fail"))
    with session_scope(factory) as session:
        session.execute(update(WebhookEvent).where(WebhookEvent.job_id == job_id)
                        .values(created_at=utcnow() - timedelta(hours=24)))
    sender = webhooks.WebhookSender(factory, wsettings, deadline_s=3)
    try:
        run_round(sender)
    finally:
        sender.close()
    [event] = events(factory, job_id)
    assert (event.status, event.attempts, event.next_attempt_at) == ("failed", 1, None)


def test_redirecting_endpoint_is_not_followed(factory, wsettings, tenant_id, receiver):
    job_id = finished_job(factory, tenant_id, receiver.url("/redirect"))
    sender = webhooks.WebhookSender(factory, wsettings, deadline_s=3)
    try:
        run_round(sender)
    finally:
        sender.close()
    time.sleep(0.2)
    assert len(receiver.received("/redirect")) == 1 and receiver.received("/target") == []
    [event] = events(factory, job_id)
    assert (event.status, event.last_status_code, event.last_error) == ("pending", 302, "redirects are not followed")


def test_trickling_endpoint_is_cut_and_does_not_hold_up_another_delivery(factory, wsettings, tenant_id, receiver):
    trickle = finished_job(factory, tenant_id, receiver.url("/trickle"))
    good = finished_job(factory, tenant_id, receiver.url("/ok"))
    sender = webhooks.WebhookSender(factory, wsettings, deadline_s=2)
    try:
        start = time.monotonic()
        futures = sender.send_round()
        submitted = time.monotonic() - start
        [ok] = receiver.wait_for("/ok", timeout=5)
        wait(futures, timeout=10)
        took = time.monotonic() - start
    finally:
        sender.close()
    assert submitted < 1.0  # the round only hands the rows to the pool
    assert ok.at - start < 1.0  # the good endpoint did not wait for the trickling one
    assert 1.9 < took < 4.0
    [slow] = events(factory, trickle)
    assert slow.status == "pending" and slow.last_error == "no complete response within 2 s"
    [attempt] = attempts_of(factory, slow.id)
    assert 1900 <= attempt.duration_ms < 3500
    assert events(factory, good)[0].status == "delivered"


def test_lease_lets_one_of_two_senders_send(factory, wsettings, tenant_id, receiver):
    job_id = finished_job(factory, tenant_id, receiver.url("/slow"))
    engines = [make_engine(wsettings.resolved_database_url()) for _ in range(2)]
    senders = [webhooks.WebhookSender(make_session_factory(e), wsettings, deadline_s=3) for e in engines]
    futures: list = []
    barrier = threading.Barrier(2)

    def go(sender):
        barrier.wait()
        futures.extend(sender.send_round())

    threads = [threading.Thread(target=go, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait(futures, timeout=10)
    for sender in senders:
        sender.close()
    for engine in engines:
        engine.dispose()
    assert len(receiver.received("/slow")) == 1
    [event] = events(factory, job_id)
    assert (event.status, event.attempts) == ("delivered", 1)
    assert len(attempts_of(factory, event.id)) == 1


def test_claim_is_exclusive_until_the_lease_runs_out(factory, tenant_id):
    job_id = finished_job(factory, tenant_id, "https://hooks.example.com/x")
    with factory() as session:
        first = webhooks.claim_next(session, lease_s=60)
    with factory() as session:
        assert webhooks.claim_next(session, lease_s=60) is None
    assert first.attempts == 1 and events(factory, job_id)[0].lease_until > utcnow()
    with session_scope(factory) as session:  # the first sender died: its lease runs out
        session.execute(update(WebhookEvent).where(WebhookEvent.id == first.id)
                        .values(lease_until=utcnow() - timedelta(seconds=1)))
    with factory() as session:
        second = webhooks.claim_next(session, lease_s=60)
    assert second.id == first.id and second.attempts == 2 and second.token != first.token
    # The first sender comes back: its lease is gone, so its result does not overwrite the row.
    with session_scope(factory) as session:
        webhooks.record(session, first, webhooks.Outcome(200, None, 5), 24)
    event = events(factory, job_id)[0]
    assert event.status == "pending" and event.lease_token == second.token


def test_one_tenant_cannot_take_every_sending_slot(factory, tenant_id):
    for _ in range(3):
        finished_job(factory, tenant_id, "https://hooks.example.com/x")
    with session_scope(factory) as session:
        other = create_api_key(session, new_id("tenant"))[0].id
    finished_job(factory, other, "https://hooks.example.com/y")
    claimed = []
    while True:
        with factory() as session:
            row = webhooks.claim_next(session, lease_s=60, per_tenant=2)
        if row is None:
            break
        claimed.append(row.tenant_id)
    assert sorted(claimed) == sorted([tenant_id, tenant_id, other])


def test_secret_is_created_once_and_rotation_keeps_the_old_one_for_a_day(factory, tenant_id):
    with session_scope(factory) as session:
        first = webhooks.get_secret(session, tenant_id).secret
    with session_scope(factory) as session:
        assert webhooks.get_secret(session, tenant_id).secret == first
    with session_scope(factory) as session:
        row = webhooks.rotate_secret(session, tenant_id)
        assert row.secret != first and row.previous_secret == first
        assert timedelta(hours=23) < row.previous_expires_at - utcnow() <= timedelta(hours=24)
        assert webhooks.signing_secrets(row, utcnow()) == [row.secret, first]
        assert webhooks.signing_secrets(row, utcnow() + timedelta(hours=25)) == [row.secret]


def test_real_job_run_in_process_is_announced_once(tmp_path, worker_env, db, add_model, add_job, receiver):  # noqa: F811
    """A real quantize job run by the worker's task in this process (no broker), then one send step."""
    from app.core.tables import Job
    from tests.helpers import save_onnx
    from worker.tasks import run_job

    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"))
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job_id).values(webhook_url=receiver.url("/ok-real")))
    run_job(job_id)
    [event] = events(db, job_id)
    assert event.type == "job.succeeded" and event.payload["data"]["status"] == "succeeded"
    sender = webhooks.WebhookSender(db, worker_env.model_copy(update={"webhook_allow_private": True}), deadline_s=3)
    try:
        run_round(sender)
    finally:
        sender.close()
    time.sleep(0.2)
    [request] = receiver.received("/ok-real")  # only signed requests count: exactly one
    with session_scope(db) as session:
        secret = webhooks.get_secret(session, event.tenant_id).secret
    assert Webhook(secret).verify(request.body, request.headers)["data"]["id"] == job_id
