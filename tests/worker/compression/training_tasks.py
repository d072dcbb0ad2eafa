"""Tiny models and a synthetic task for the training tests: 10 (or 16) Gaussian features, classes given by a fixed
random MLP (the "oracle"), so it is nonlinear and a well-trained model approaches but never reaches 100%."""

import numpy as np
import torch
from torch import nn

from worker.compression.modules import lift_layers


def mlp(*sizes: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_task(n: int, seed: int, dims: int = 10, classes: int = 6,
              scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n samples of the oracle's task; `scales` multiplies the features the model sees (not the oracle)."""
    oracle = mlp(dims, 32, classes, seed=1234)
    x = np.random.default_rng(seed).standard_normal((n, dims)).astype(np.float32)
    with torch.no_grad():
        y = oracle(torch.from_numpy(x)).argmax(1).numpy()
    return (x if scales is None else x * scales), y


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def exported(model: nn.Module, batch: int, dynamic: bool) -> torch.fx.GraphModule:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    return lift_layers(torch.export.export(model, (torch.randn(batch, 10),), dynamic_shapes=shapes).module())
