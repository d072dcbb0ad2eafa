"""Fixtures of the training tests (test_train, test_students): one CPU thread, the task, its trained teacher."""

import pytest
import torch

from tests.worker.compression.training_tasks import make_task, mlp
from worker.compression.train import TrainConfig, TrainData, finetune


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls spend more time in OpenMP hand-offs than computing (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    train, val, test = make_task(3000, 0), make_task(300, 1), make_task(2000, 2)
    return {"train": TrainData([train[0]], train[1]), "val": TrainData([val[0]], val[1]), "test": test}


@pytest.fixture(scope="module")
def teacher(task):
    model = mlp(10, 128, 6)
    finetune(model, task["train"], task["val"], TrainConfig(epochs=10, lr=3e-3, batch_size=64))
    return model
