"""ONNX: models that reach for files outside themselves (external data), corrupt protobuf, ops no runtime has,
and files over the upload limit. Each gets a 4xx at upload or an `invalid` model / `failed` job with the reason;
an external-data file is never opened, wherever in the model the reference hides."""

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
QUANTIZE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}
X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])


class WatchedFifo:
    """A FIFO that records whether anything opened it for reading, used as a context manager.

    A reader of a FIFO blocks until a writer comes; the watcher plays that writer (so nothing hangs) and notes
    that it happened. Opening for writing without blocking succeeds only while a reader holds it open.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "WatchedFifo":
        os.mkfifo(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                time.sleep(0.005)
                continue
            self.opened = True
            os.close(descriptor)  # the reader sees end of file and goes on


def external(name: str, location: str) -> TensorProto:
    """A float[4] tensor whose bytes are said to live in the file `location`."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def model(nodes: list, initializers: list | None = None, **graph: object) -> ModelProto:
    built = helper.make_model(helper.make_graph(nodes, "hostile", [X], [Y], initializer=initializers or [], **graph),
                              opset_imports=OPSET)
    built.ir_version = 8
    return built


def in_initializer(location: str) -> ModelProto:
    return model([helper.make_node("Add", ["x", "w"], ["y"])], [external("w", location)])


def in_constant_node(location: str) -> ModelProto:
    return model([helper.make_node("Constant", [], ["w"], value=external("w", location)),
                  helper.make_node("Add", ["x", "w"], ["y"])])


def in_subgraph(location: str) -> ModelProto:
    """The reference sits in the initializer of an If branch, a graph inside a node attribute."""
    def branch(initializers: list) -> object:
        out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
        return helper.make_graph([helper.make_node("Identity", ["w"], ["b"])], "branch", [], [out],
                                 initializer=initializers)

    zeros = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    return model([helper.make_node("If", ["c"], ["w"], then_branch=branch([external("w", location)]),
                                   else_branch=branch([zeros])),
                  helper.make_node("Add", ["x", "w"], ["y"])],
                 [numpy_helper.from_array(np.array(True), "c")])


def in_sparse_initializer(location: str) -> ModelProto:
    values = external("w", location)
    values.dims[:] = [4]
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "w_indices")
    return model([helper.make_node("Add", ["x", "w"], ["y"])],
                 sparse_initializer=[helper.make_sparse_tensor(values, indices, [4])])


PLACES: list[Callable[[str], ModelProto]] = [in_initializer, in_constant_node, in_subgraph, in_sparse_initializer]


def escape_from_workdir(home: Path, target: Path) -> str:
    """`target` relative to the folder the worker keeps the model in (MODELPRESS_HOME/work/<task>-*)."""
    return os.path.relpath(target, home / "work" / "inspect-x")


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
@pytest.mark.parametrize("place", PLACES, ids=lambda place: place.__name__)
def test_external_data_outside_the_model_is_refused_unread(tmp_path: Path, worker_env, add_model, worker,
                                                           place: Callable[[str], ModelProto],
                                                           relative: bool) -> None:
    (tmp_path / "secrets").mkdir()
    with WatchedFifo(tmp_path / "secrets" / "weights.bin") as fifo:
        location = escape_from_workdir(worker.settings.resolved_home(), fifo.path) if relative else str(fifo.path)
        path = tmp_path / "model.onnx"
        path.write_bytes(place(location).SerializeToString())
        inspected = worker.inspect(add_model(path, "onnx").id)
    assert inspected.status == "invalid"
    assert "uses external data" in inspected.error and location in inspected.error
    assert not fifo.opened
    assert worker.leftovers() == []


def test_external_data_upload_is_invalid_after_inspection_and_its_job_fails(client, auth, upload,
                                                                           worker_for_api) -> None:
    """Through the API: the upload is stored (the API does not parse ONNX), the job and the inspection refuse it."""
    response = upload(in_initializer("../../etc/passwd").SerializeToString(), filename="model.onnx")
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    submitted = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": QUANTIZE})
    assert submitted.status_code == 201, submitted.text
    job = worker_for_api.run(submitted.json()["id"])
    assert job.status == "failed" and job.error_code == "invalid_model"
    assert "initializer 'w' uses external data (location '../../etc/passwd')" in job.error_message
    worker_for_api.inspect(model_id)
    shown = client.get(f"/v1/models/{model_id}", headers=auth).json()
    assert shown["status"] == "invalid" and "uses external data" in shown["error"]
    assert client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": QUANTIZE}).status_code == 409
    assert worker_for_api.leftovers() == []


def test_truncated_onnx_upload_is_415(upload, onnx_bytes: bytes) -> None:
    response = upload(onnx_bytes[: len(onnx_bytes) // 2], filename="model.onnx")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_format"


def test_corrupt_protobuf_is_invalid_with_the_reason(client, auth, upload, worker_for_api, onnx_bytes: bytes) -> None:
    """The header the API reads is intact, the graph after it is garbage: the worker cannot parse it."""
    corrupt = onnx_bytes[:64] + b"\xff" * (len(onnx_bytes) - 64)
    response = upload(corrupt, filename="model.onnx")
    assert response.status_code == 201, response.text
    model = worker_for_api.inspect(response.json()["id"])
    assert model.status == "invalid" and model.error.startswith("not a readable ONNX model: DecodeError")


@pytest.mark.parametrize(("op", "reason"), [
    (helper.make_node("Pwn", ["x"], ["y"], domain="com.evil"), "ONNX Runtime cannot load the model"),
    (helper.make_node("NotAnOp", ["x"], ["y"]), "ONNX checker rejected the model"),
], ids=["custom_domain", "unknown_standard_op"])
def test_unsupported_op_is_invalid_naming_it(client, auth, upload, worker_for_api, op, reason: str) -> None:
    built = model([op])
    built.opset_import.append(helper.make_opsetid("com.evil", 1))
    response = upload(built.SerializeToString(), filename="model.onnx")
    assert response.status_code == 201, response.text
    inspected = worker_for_api.inspect(response.json()["id"])
    assert inspected.status == "invalid"
    assert inspected.error.startswith(reason) and op.op_type in inspected.error
    assert str(worker_for_api.settings.resolved_home()) not in inspected.error  # no server paths in messages


def test_model_over_the_upload_limit_is_413(client, auth, upload, settings) -> None:
    weights = numpy_helper.from_array(np.ones(settings.max_upload_bytes // 4 + 1024, np.float32), "w")
    big = model([helper.make_node("Add", ["x", "w"], ["y"])], [weights]).SerializeToString()
    assert len(big) > settings.max_upload_bytes
    response = upload(big, filename="model.onnx")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert client.get("/v1/models", headers=auth).json()["data"] == []
    assert list(settings.upload_tmp_dir().glob("upload-*")) == []
