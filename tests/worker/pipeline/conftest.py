"""Fixtures of the pipeline tests that several modules share."""

import json

import numpy as np
import pytest

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.storage import open_storage
from app.core.tables import Dataset
from tests.helpers import VOCAB


@pytest.fixture
def add_text_dataset(worker_env, db):
    """Store a .jsonl of short texts over the tiny test vocabulary (labelled 0..2 unless `labelled` is False) and
    its row, as an upload would."""
    storage = open_storage(worker_env.resolved_storage_url())

    def _add(model, path, count=40, labelled=True):
        rng = np.random.default_rng(0)
        lines = []
        for _ in range(count):
            words = rng.choice(VOCAB[5:], size=rng.integers(3, 9))
            label = int(rng.integers(0, 3))
            lines.append(json.dumps({"text": " ".join(words), **({"label": label} if labelled else {})}))
        path.write_text("\n".join(lines) + "\n")
        with session_scope(db) as session:
            dataset_id = new_id("ds")
            key = f"tenants/{model.tenant_id}/datasets/{dataset_id}/data.jsonl"
            storage.put_file(key, path)
            session.add(Dataset(id=dataset_id, tenant_id=model.tenant_id, name=path.name, format="jsonl",
                                size_bytes=path.stat().st_size, sha256="0" * 64, storage_key=key,
                                num_samples=count, has_labels=labelled, info={}))
        return dataset_id

    return _add
