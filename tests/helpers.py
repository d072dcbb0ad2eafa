"""Tiny models made inside the tests."""

from pathlib import Path


def make_mlp(in_features: int = 16, hidden: int = 32, out_features: int = 4, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, out_features)).eval()


def save_pt2(path: Path, in_features: int = 16, hidden: int = 32, out_features: int = 4, batch: int = 4) -> Path:
    import torch

    program = torch.export.export(make_mlp(in_features, hidden, out_features), (torch.randn(batch, in_features),))
    torch.export.save(program, str(path))
    return path


def save_onnx(path: Path, in_features: int = 16, hidden: int = 32, out_features: int = 4, batch: int = 4) -> Path:
    import torch

    torch.onnx.export(make_mlp(in_features, hidden, out_features), (torch.randn(batch, in_features),), str(path),
                      dynamo=True, external_data=False, verbose=False)
    return path
