"""API keys: list, create, revoke, rotate (with and without grace), last use, and the `modelpress keys` CLI."""

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.api.main import create_app
from app.cli import main
from app.core.config import get_settings
from app.core.db import make_engine, make_session_factory, session_scope, utcnow
from app.core.tables import ApiKey


@pytest.fixture
def client(settings):
    """These tests move keys' times in the database (as time passing would) and read each request's effect on
    `last_used_at`: every request authenticates against the database (the key cache is off)."""
    with TestClient(create_app(settings.model_copy(update={"auth_cache_seconds": 0}), housekeeping=False)) as test:
        yield test


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_of(client, headers) -> dict:
    """The listed entry of the key in `headers`."""
    prefix = headers["Authorization"].split("_")[1]
    return next(k for k in client.get("/v1/keys", headers=headers).json()["data"] if k["prefix"] == prefix)


def set_columns(settings, key_id: str, **values) -> None:
    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(**values))
    engine.dispose()


def test_create_list_never_shows_secrets(client, auth):
    created = client.post("/v1/keys", headers=auth, json={"name": "ci"})
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "ci" and body["active"] and body["key"].startswith(f"mp_{body['prefix']}_")
    assert client.get("/v1/models", headers=bearer(body["key"])).status_code == 200
    assert client.post("/v1/keys", headers=auth).status_code == 201  # the body is optional

    listing = client.get("/v1/keys", headers=auth)
    assert listing.status_code == 200
    keys = listing.json()["data"]
    assert len(keys) == 3 and {k["name"] for k in keys} == {None, "ci"}
    assert body["key"] not in listing.text and auth["Authorization"].split()[1] not in listing.text
    assert all(set(k) == {"id", "prefix", "name", "created_at", "last_used_at", "revoked_at", "expires_at",
                          "active"} for k in keys)
    assert client.post("/v1/keys", headers=auth, json={"name": "x", "secret": "y"}).status_code == 422


def test_revoking_the_key_in_use_takes_effect_at_once(client, make_key):
    headers = make_key()
    spare = client.post("/v1/keys", headers=headers).json()
    mine = key_of(client, headers)
    revoked = client.post(f"/v1/keys/{mine['id']}/revoke", headers=headers)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None and revoked.json()["active"] is False
    assert client.get("/v1/models", headers=headers).status_code == 401
    again = client.post(f"/v1/keys/{mine['id']}/revoke", headers=bearer(spare["key"]))
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]


def test_other_tenants_keys_are_404(client, make_key):
    alice, bob = make_key(), make_key()
    alice_key = key_of(client, alice)
    for action in ("revoke", "rotate"):
        response = client.post(f"/v1/keys/{alice_key['id']}/{action}", headers=bob)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get("/v1/models", headers=alice).status_code == 200
    assert [k["id"] for k in client.get("/v1/keys", headers=bob).json()["data"]] != [alice_key["id"]]


def test_rotate_without_grace_revokes_the_old_key(client, make_key):
    old = make_key()
    rotated = client.post(f"/v1/keys/{key_of(client, old)['id']}/rotate", headers=old)
    assert rotated.status_code == 201
    assert client.get("/v1/models", headers=old).status_code == 401
    assert client.get("/v1/models", headers=bearer(rotated.json()["key"])).status_code == 200
    too_long = client.post(f"/v1/keys/{rotated.json()['id']}/rotate", headers=bearer(rotated.json()["key"]),
                           json={"grace_seconds": 86401})
    assert too_long.status_code == 422 and "grace_seconds" in too_long.json()["error"]["message"]


def test_rotate_with_grace_keeps_both_until_it_ends(client, settings, make_key):
    old = make_key()
    old_id = key_of(client, old)["id"]
    rotated = client.post(f"/v1/keys/{old_id}/rotate", headers=old, json={"grace_seconds": 600}).json()
    new = bearer(rotated["key"])
    assert client.get("/v1/models", headers=old).status_code == 200
    assert client.get("/v1/models", headers=new).status_code == 200
    listed = {k["id"]: k for k in client.get("/v1/keys", headers=new).json()["data"]}
    assert listed[old_id]["expires_at"] is not None and listed[old_id]["revoked_at"] is None
    assert listed[rotated["id"]]["expires_at"] is None

    set_columns(settings, old_id, expires_at=utcnow() - timedelta(seconds=1))  # the grace period is over
    assert client.get("/v1/models", headers=old).status_code == 401
    assert client.get("/v1/models", headers=new).status_code == 200
    refused = client.post(f"/v1/keys/{old_id}/rotate", headers=new)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "key_inactive"


def test_last_used_is_written_at_most_once_a_minute(client, settings, make_key):
    headers = make_key()
    first = key_of(client, headers)["last_used_at"]
    assert first is not None
    client.get("/v1/models", headers=headers)
    assert key_of(client, headers)["last_used_at"] == first

    key_id = key_of(client, headers)["id"]
    set_columns(settings, key_id, last_used_at=utcnow() - timedelta(minutes=2))
    client.get("/v1/models", headers=headers)
    assert key_of(client, headers)["last_used_at"] > first


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path))
    monkeypatch.delenv("MODELPRESS_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_create_list_revoke(cli_env, capsys):
    assert main(["keys", "create", "--tenant", "acme", "--name", "deploy"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]  # the contract: the key alone on the last line
    assert key.startswith("mp_")

    assert main(["keys", "list", "--tenant", "acme"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and key not in lines[1]
    key_id, prefix, status = lines[1].split()[:3]
    assert prefix == key.split("_")[1] and status == "active" and lines[1].endswith("deploy")

    assert main(["keys", "revoke", key_id]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--tenant", "acme"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == "revoked"

    assert main(["keys", "revoke", "key_missing"]) == 1
    assert main(["keys", "list", "--tenant", "nobody"]) == 1
    assert "no tenant" in capsys.readouterr().err


@pytest.fixture
def capped(settings):
    """A client whose tenants may hold at most 3 active keys."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"tenant_max_keys": 3}), housekeeping=False)) as client:
        yield client


def test_active_keys_are_capped_per_tenant(capped, make_key):
    headers = make_key()  # the tenant's first key
    assert [capped.post("/v1/keys", headers=headers).status_code for _ in range(2)] == [201, 201]
    refused = capped.post("/v1/keys", headers=headers, json={"name": "one too many"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_keys"
    assert "limit is 3" in refused.json()["error"]["message"]
    assert len(capped.get("/v1/keys", headers=headers).json()["data"]) == 3
    assert capped.post("/v1/keys", headers=make_key()).status_code == 201  # another tenant has its own count

    mine = key_of(capped, headers)["id"]
    graceful = capped.post(f"/v1/keys/{mine}/rotate", headers=headers, json={"grace_seconds": 60})
    assert graceful.status_code == 429 and "grace_seconds 0" in graceful.json()["error"]["message"]
    rotated = capped.post(f"/v1/keys/{mine}/rotate", headers=headers)  # replaces the key: the count stays
    assert rotated.status_code == 201
    new = bearer(rotated.json()["key"])
    spare = next(k for k in capped.get("/v1/keys", headers=new).json()["data"] if k["active"] and
                 k["id"] != rotated.json()["id"])
    assert capped.post(f"/v1/keys/{spare['id']}/revoke", headers=new).status_code == 200
    assert capped.post("/v1/keys", headers=new).status_code == 201  # revoking made room


def test_a_key_in_its_grace_period_cannot_manage_keys(client, make_key):
    """A leaked key that is being rotated out must not mint keys that outlive its grace period (nor revoke the
    keys that replace it)."""
    old = make_key()
    old_id = key_of(client, old)["id"]
    rotated = client.post(f"/v1/keys/{old_id}/rotate", headers=old, json={"grace_seconds": 600}).json()
    new = bearer(rotated["key"])
    assert client.get("/v1/models", headers=old).status_code == 200  # it still works for everything else
    assert client.get("/v1/keys", headers=old).status_code == 200
    for method_path, body in ((("POST", "/v1/keys"), {"name": "escape"}),
                              (("POST", f"/v1/keys/{rotated['id']}/rotate"), None),
                              (("POST", f"/v1/keys/{old_id}/rotate"), None),
                              (("POST", f"/v1/keys/{rotated['id']}/revoke"), None)):
        response = client.request(*method_path, headers=old, json=body)
        assert response.status_code == 409, (method_path, response.text)
        assert response.json()["error"]["code"] == "key_expiring"
    assert len(client.get("/v1/keys", headers=new).json()["data"]) == 2
    assert client.post(f"/v1/keys/{old_id}/revoke", headers=new).status_code == 200  # the new key may


def test_create_a_key_with_an_expiry(client, settings, make_key):
    headers = make_key()
    when = (utcnow() + timedelta(days=30)).replace(microsecond=0)
    created = client.post("/v1/keys", headers=headers, json={"name": "ci", "expires_at": when.isoformat()})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["expires_at"].startswith(when.strftime("%Y-%m-%dT%H:%M:%S")) and body["active"]
    expiring = bearer(body["key"])
    assert client.get("/v1/models", headers=expiring).status_code == 200
    refused = client.post("/v1/keys", headers=expiring)  # it cannot mint a key that outlives it
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "key_expiring"
    set_columns(settings, body["id"], expires_at=utcnow() - timedelta(seconds=1))
    assert client.get("/v1/models", headers=expiring).status_code == 401


@pytest.mark.parametrize("value, why", [
    ("2001-01-01T00:00:00Z", "in the future"),
    ("2999-01-01T00:00:00Z", "at most 365 days"),
    ("2030-01-01T00:00:00", "RFC 3339"),  # no offset
    ("2030-01-01", "RFC 3339"),
    (1893456000, "RFC 3339"),  # a Unix time
    ("next week", "RFC 3339"),
])
def test_key_expiry_must_be_rfc3339_in_the_coming_year(client, auth, value, why):
    response = client.post("/v1/keys", headers=auth, json={"expires_at": value})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("expires_at: ") and why in message
    assert len(client.get("/v1/keys", headers=auth).json()["data"]) == 1


def test_key_name_is_bounded(client, auth):
    response = client.post("/v1/keys", headers=auth, json={"name": "n" * 201})
    assert response.status_code == 422 and response.json()["error"]["message"].startswith("name: ")
