"""An in-process API (FastAPI TestClient) over a real database, a real filesystem broker and local storage."""

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.core.auth import create_api_key
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.ids import new_id
from tests.helpers import save_onnx, save_pt2


@pytest.fixture
def client(settings):
    app = create_app(settings, housekeeping=False)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def make_key(settings):
    """Creates a fresh tenant with its own key: tests never see each other's data."""
    engine = make_engine(settings.resolved_database_url())
    factory = make_session_factory(engine)

    def _make(tenant: str | None = None) -> dict[str, str]:
        with session_scope(factory) as session:
            _, key = create_api_key(session, tenant or new_id("tenant"))
        return {"Authorization": f"Bearer {key}"}

    yield _make
    engine.dispose()


@pytest.fixture
def auth(make_key) -> dict[str, str]:
    return make_key()


@pytest.fixture(scope="session")
def onnx_bytes(tmp_path_factory) -> bytes:
    return save_onnx(tmp_path_factory.mktemp("onnx") / "mlp.onnx").read_bytes()


@pytest.fixture(scope="session")
def pt2_bytes(tmp_path_factory) -> bytes:
    return save_pt2(tmp_path_factory.mktemp("pt2") / "mlp.pt2").read_bytes()


@pytest.fixture
def upload(client, auth, onnx_bytes):
    def _upload(data: bytes = onnx_bytes, filename: str = "mlp.onnx", headers=None, **fields):
        return client.post("/v1/models", headers=headers or auth, files={"file": (filename, data)}, data=fields)

    return _upload
