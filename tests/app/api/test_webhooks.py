"""Webhook routes (secret, rotate, deliveries), the 422 for literal non-public webhook_url, and delivery by the
API's housekeeping to a real local HTTP server (webhook_allow_private on)."""

import base64
import time
from concurrent.futures import wait
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.api.housekeeping import Housekeeper
from app.api.main import create_app
from app.core import jobs
from app.core.db import make_engine, make_session_factory, session_scope, utcnow
from app.core.queue import make_celery
from app.core.statuses import JobStatus
from app.core.tables import WebhookEvent, WebhookSecret
from tests.webhook_receiver import Receiver

RECIPE = {"steps": [{"op": "quantize"}]}


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
def wclient(wsettings):
    with TestClient(create_app(wsettings, housekeeping=False)) as test_client:
        yield test_client


@pytest.fixture
def housekeeper(factory, wsettings):
    keeper = Housekeeper(factory, make_celery(wsettings), wsettings)
    keeper.webhooks.deadline_s = 3
    yield keeper
    keeper.webhooks.close()


@pytest.fixture
def receiver():
    with Receiver() as server:
        yield server


@pytest.fixture
def model_id(wclient, auth, onnx_bytes):
    return wclient.post("/v1/models", headers=auth, files={"file": ("m.onnx", onnx_bytes)}).json()["id"]


def finish(factory, job_id, status=JobStatus.SUCCEEDED):
    """What a worker does at the end of a job, through the job state machine."""
    with session_scope(factory) as session:
        assert jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60)) is not None
    with session_scope(factory) as session:
        assert jobs.finish(session, job_id, "w1", status, metrics={})


def submit(client, auth, model_id, url):
    response = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": RECIPE,
                                                            "webhook_url": url})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def send(housekeeper):
    wait(housekeeper.send_webhooks(), timeout=30)


def test_secret_is_created_on_first_use_and_stable(client, auth, make_key):
    first = client.get("/v1/webhooks/secret", headers=auth)
    assert first.status_code == 200
    secret = first.json()["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert first.json()["previous_expires_at"] is None
    assert client.get("/v1/webhooks/secret", headers=auth).json()["secret"] == secret
    assert client.get("/v1/webhooks/secret", headers=make_key()).json()["secret"] != secret
    assert client.get("/v1/webhooks/secret").status_code == 401


def test_rotate_returns_a_new_secret_and_the_old_one_signs_beside_it_for_a_day(
        wclient, auth, model_id, factory, housekeeper, receiver):
    old = wclient.get("/v1/webhooks/secret", headers=auth).json()["secret"]
    rotated = wclient.post("/v1/webhooks/secret/rotate", headers=auth)
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != old and new.startswith("whsec_")
    grace = rotated.json()["previous_expires_at"]
    assert grace is not None and wclient.get("/v1/webhooks/secret", headers=auth).json() == rotated.json()

    job_id = submit(wclient, auth, model_id, receiver.url("/ok-grace"))
    finish(factory, job_id)
    send(housekeeper)
    [request] = receiver.received("/ok-grace")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(request.body, request.headers)["data"]["id"] == job_id
    assert Webhook(old).verify(request.body, request.headers)["data"]["id"] == job_id

    with session_scope(factory) as session:  # a day later
        session.execute(update(WebhookSecret).where(WebhookSecret.secret == new)
                        .values(previous_expires_at=utcnow() - timedelta(seconds=1)))
    assert wclient.get("/v1/webhooks/secret", headers=auth).json()["previous_expires_at"] is None
    job_id = submit(wclient, auth, model_id, receiver.url("/ok-after"))
    finish(factory, job_id)
    send(housekeeper)
    [request] = receiver.received("/ok-after")
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(request.body, request.headers)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://127.0.0.1:8080/hook", "http://0x7f000001/", "http://2130706433/",
    "http://0177.0.0.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.0.10/", "http://[fe80::1]/",
])
def test_literal_non_public_webhook_url_is_422(client, auth, upload, url):
    model_id = upload().json()["id"]
    response = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": RECIPE,
                                                           "webhook_url": url})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith("webhook_url: "), error


def test_names_and_public_addresses_are_accepted_at_submission(client, auth, upload):
    model_id = upload().json()["id"]
    for url in ("https://hooks.example.com/modelpress", "http://8.8.8.8/hook"):
        response = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": RECIPE,
                                                               "webhook_url": url})
        assert response.status_code == 201, response.text
        assert response.json()["webhook_url"] == url


def test_allow_private_accepts_loopback(wclient, auth, model_id):
    submit(wclient, auth, model_id, "http://127.0.0.1:9/hook")


def test_deliveries_routes(wclient, auth, make_key, model_id, factory, housekeeper, receiver):
    delivered = submit(wclient, auth, model_id, receiver.url("/ok-list"))
    failing = submit(wclient, auth, model_id, receiver.url("/fail-list"))
    quiet = submit(wclient, auth, model_id, None)
    assert wclient.get(f"/v1/jobs/{delivered}/webhook-deliveries", headers=auth).json() == {"data": []}
    for job_id in (delivered, failing, quiet):
        finish(factory, job_id)
    send(housekeeper)

    good = wclient.get(f"/v1/jobs/{delivered}/webhook-deliveries", headers=auth)
    assert good.status_code == 200
    [event] = good.json()["data"]
    assert event["id"].startswith("msg_") and event["type"] == "job.succeeded" and event["job_id"] == delivered
    assert (event["status"], event["attempt_count"], event["last_status_code"]) == ("delivered", 1, 200)
    assert event["next_attempt_at"] is None and event["delivered_at"] is not None
    [attempt] = event["attempts"]
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["duration_ms"] >= 0
    assert receiver.received("/ok-list")[0].headers["webhook-id"] == event["id"]

    [bad] = wclient.get(f"/v1/jobs/{failing}/webhook-deliveries", headers=auth).json()["data"]
    assert (bad["status"], bad["last_status_code"], bad["last_error"]) == (
        "pending", 500, "the endpoint answered HTTP 500")
    assert bad["next_attempt_at"] is not None and bad["attempts"][0]["status_code"] == 500
    assert wclient.get(f"/v1/jobs/{quiet}/webhook-deliveries", headers=auth).json() == {"data": []}

    page = wclient.get("/v1/webhooks/deliveries", headers=auth, params={"limit": 1}).json()
    assert [e["id"] for e in page["data"]] == [bad["id"]] and page["next_cursor"]  # newest first
    rest = wclient.get("/v1/webhooks/deliveries", headers=auth,
                       params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [e["id"] for e in rest["data"]] == [event["id"]] and rest["next_cursor"] is None
    only = wclient.get("/v1/webhooks/deliveries", headers=auth, params={"status": "delivered"}).json()
    assert [e["id"] for e in only["data"]] == [event["id"]]
    assert wclient.get("/v1/webhooks/deliveries", headers=auth, params={"cursor": "nope"}).status_code == 400

    other = make_key()
    assert wclient.get("/v1/webhooks/deliveries", headers=other).json() == {"data": [], "next_cursor": None}
    response = wclient.get(f"/v1/jobs/{delivered}/webhook-deliveries", headers=other)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_cancelled_queued_job_is_delivered(wclient, auth, model_id, factory, housekeeper, receiver):
    job_id = submit(wclient, auth, model_id, receiver.url("/ok-cancel"))
    assert wclient.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 202
    send(housekeeper)
    [request] = receiver.received("/ok-cancel")
    secret = wclient.get("/v1/webhooks/secret", headers=auth).json()["secret"]
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload["type"] == "job.cancelled" and payload["data"]["status"] == "cancelled"


def test_housekeeping_loop_delivers_after_the_job_finishes(wclient, auth, model_id, factory, wsettings, receiver):
    """The running loop (every `dispatch_interval`), not a single call: the event arrives, once."""
    fast = wsettings.model_copy(update={"dispatch_interval": 0.2})
    keeper = Housekeeper(factory, make_celery(fast), fast)
    job_id = submit(wclient, auth, model_id, receiver.url("/ok-loop"))
    keeper.start()
    try:
        finished = time.monotonic()
        finish(factory, job_id)
        [request] = receiver.wait_for("/ok-loop", timeout=10)
        assert request.at - finished < 3
        time.sleep(0.6)  # a few more rounds: nothing is sent twice
        assert len(receiver.received("/ok-loop")) == 1
    finally:
        keeper.stop()
