"""Safe loading in the worker: a planted pickle inside a .pt2 never runs, even if the file skipped the API."""

import pickle

import pytest
import torch

from app.core.tables import Model
from tests.app.core.vetting.modelfile_builders import SystemCall, with_sample_inputs_pickle
from tests.helpers import make_mlp, save_pt2
from worker.errors import JobFailure


def test_planted_payload_never_runs_in_the_worker(tmp_path, worker_env, db, add_model):
    from worker.formats.pt2 import load_program
    from worker.tasks import inspect_model

    marker = tmp_path / "pwned"
    payload = pickle.dumps(SystemCall(f"touch {marker}"), protocol=2)
    evil = with_sample_inputs_pickle(save_pt2(tmp_path / "good.pt2"), payload, tmp_path / "evil.pt2")
    with pytest.raises(JobFailure) as refused:
        load_program(evil)
    assert refused.value.code == "unsafe_pickle" and "system" in refused.value.message
    model = add_model(evil, "pt2")  # stored directly, as if the API had been bypassed
    inspect_model(model.id)
    with db() as session:
        row = session.get(Model, model.id)
    assert row.status == "invalid" and "not allowed" in row.error
    assert not marker.exists()


def test_pickled_module_is_invalid_in_the_worker(tmp_path, worker_env, db, add_model):
    from worker.tasks import inspect_model

    path = tmp_path / "module.pt2"
    torch.save(make_mlp(), path)
    model = add_model(path, "pt2")
    inspect_model(model.id)
    with db() as session:
        row = session.get(Model, model.id)
    assert row.status == "invalid"
    assert "pt2" in row.error or "not allowed" in row.error
