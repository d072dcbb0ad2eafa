"""Tiny inputs that used to cost gigabytes: work is bounded by what the input declares, checked before it is done,
and whatever still slips through is stopped by the sandbox's memory cap with `resource_limit`."""

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.ids import new_id
from app.core.storage import open_storage
from app.core.tables import Dataset
from tests.helpers import save_onnx
from tests.hostile.builders import TINY_CONFIG, hf_files, hf_zip, zip_bytes

GIB = 1024**3


def cap_memory(monkeypatch, limit: int) -> None:
    from worker import resources

    monkeypatch.setenv("MODELPRESS_WORKER_MEMORY_BYTES", str(limit))
    get_settings.cache_clear()
    resources._resources.cache_clear()


def folding_bomb(path: Path) -> Path:
    """148 bytes: ConstantOfShape([2^28]) + x, which constant folding (or a run) turns into 1 GiB floats."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [2**28])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Add", ["big", "x"], ["y"])]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2**28])], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_onnx_that_folds_into_a_gigabyte_is_inspected_cheaply_and_capped_when_run(
        tmp_path, add_model, add_job, worker, monkeypatch) -> None:
    path = folding_bomb(tmp_path / "bomb.onnx")
    assert path.stat().st_size < 200
    cap_memory(monkeypatch, int(1.2 * GIB))
    model = add_model(path, "onnx")
    inspected = worker.inspect(model.id)
    assert inspected.status == "ready", inspected.error  # described without folding the constant
    job = worker.run(add_job(model))
    assert (job.status, job.error_code) == ("failed", "resource_limit"), job.error_message
    assert worker.run(add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"))).status == "succeeded"


def compressed_zeros_npz(path: Path, rows: int, columns: int) -> Path:
    """An .npz whose one array declares rows x columns float32 zeros, deflated to about a thousandth of that."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, columns)}
    text = repr(header).encode().ljust(118) + b"\n"
    chunk = bytes(64 * 1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("x.npy", "w", force_zip64=True) as member:
        member.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text)
        left = rows * columns * 4
        while left:
            member.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
    return path


def test_a_dataset_that_declares_a_gigabyte_costs_only_the_rows_a_job_reads(
        tmp_path, add_model, add_job, worker, worker_env, db, monkeypatch) -> None:
    path = compressed_zeros_npz(tmp_path / "zeros.npz", rows=4_194_304, columns=16)
    assert path.stat().st_size < 2 * 1024 * 1024
    model = add_model(save_onnx(tmp_path / "m.onnx", in_features=16), "onnx")
    storage = open_storage(worker_env.resolved_storage_url())
    with session_scope(db) as session:
        dataset_id = new_id("ds")
        key = f"tenants/{model.tenant_id}/datasets/{dataset_id}/data.npz"
        storage.put_file(key, path)
        session.add(Dataset(id=dataset_id, tenant_id=model.tenant_id, name="zeros.npz", format="npz",
                            size_bytes=path.stat().st_size, sha256="0" * 64, storage_key=key,
                            num_samples=4_194_304, has_labels=False, info={}))
    cap_memory(monkeypatch, int(1.0 * GIB))  # the whole array alone is 256 MiB, and is read as well as copied
    job = worker.run(add_job(model, datasets={"eval": dataset_id}))
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert job.metrics["evaluation"]["samples"] == 512


def test_a_config_that_asks_for_a_huge_embedding_is_refused_before_it_is_allocated(tmp_path, add_model,
                                                                                   worker) -> None:
    config = {**TINY_CONFIG, "vocab_size": 2**23}
    path = tmp_path / "huge.zip"
    path.write_bytes(hf_zip(hf_files(config)))
    assert path.stat().st_size < 100 * 1024
    model = worker.inspect(add_model(path, "hf").id)
    assert model.status == "invalid"
    assert "refused before anything is allocated" in model.error and "weights hold 16 numbers" in model.error


def test_a_zip_of_many_empty_members_is_refused_before_its_directory_is_read(upload, client, auth) -> None:
    data = zip_bytes([(f"model/{i}", b"") for i in range(25_000)])
    response = upload(data, filename="many.zip")
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "archive_too_large" and "25000 members" in error["message"]
    assert client.get("/v1/models", headers=auth).json()["data"] == []


@pytest.mark.parametrize("limit", [3, None])
def test_jsonl_is_read_only_up_to_the_samples_a_job_takes(tmp_path, limit) -> None:
    from worker.dataset_arrays import load_arrays

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)))
    assert len(load_arrays(path, "jsonl", limit).texts) == (limit or 10)


def test_npz_rows_are_read_exactly(tmp_path) -> None:
    from worker.dataset_arrays import load_arrays

    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.savez_compressed(tmp_path / "d.npz", x=x, labels=np.arange(10))
    data = load_arrays(tmp_path / "d.npz", "npz", 3)
    np.testing.assert_array_equal(data.inputs["x"], x[:3])
    np.testing.assert_array_equal(data.labels, np.arange(3))
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x))
    np.testing.assert_array_equal(load_arrays(tmp_path / "f.npz", "npz", 4).inputs["x"], x[:4])
