import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.helpers import make_mlp, save_onnx
from worker.compression.prune import apply_masks, layer_sparsity, prune_onnx, prune_unstructured
from worker.errors import JobFailure


def step(**fields) -> dict:
    """The pruning functions' keyword arguments: a prune step's defaults, overridden by `fields`."""
    return {"method": "magnitude", "sparsity": None, "threshold": None, "scope": "layer", "pattern": "unstructured",
            "exclude": [], **fields}


def weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_hits_target_sparsity(scope):
    model = make_mlp(32, 64, 8)
    masks, details = prune_unstructured(model, **step(sparsity=0.6, scope=scope), calibration=None)
    total = sum(w.numel() for w in weights(model).values())
    zeros = sum(int((w == 0).sum()) for w in weights(model).values())
    assert abs(zeros / total - 0.6) < 0.01
    if scope == "layer":
        assert all(abs(info["sparsity"] - 0.6) < 0.02 for info in layer_sparsity(model).values())
    assert set(masks) == set(weights(model)) and details["layers"] == 3


def test_global_scope_prunes_small_layers_more():
    model = make_mlp(32, 64, 8)
    with torch.no_grad():
        model[4].weight.mul_(0.01)  # a layer of tiny weights
    prune_unstructured(model, **step(sparsity=0.5, scope="global"), calibration=None)
    assert (model[4].weight == 0).float().mean() > 0.95


def test_threshold_zeroes_exactly_the_small_weights():
    model = make_mlp(16, 16, 4)
    originals = {n: w.detach().clone() for n, w in weights(model).items()}
    prune_unstructured(model, **step(threshold=0.1), calibration=None)
    for name, weight in weights(model).items():
        small = originals[name].abs() < 0.1
        assert torch.all(weight[small] == 0) and torch.equal(weight[~small], originals[name][~small])


def test_two_four_keeps_two_of_every_four():
    model = make_mlp(16, 32, 4)
    prune_unstructured(model, **step(pattern="2:4", sparsity=0.5), calibration=None)  # 2:4 is sparsity 0.5
    for weight in weights(model).values():
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert torch.all(groups <= 2)


def test_exclude_keeps_layers_dense():
    model = make_mlp(16, 32, 4)
    prune_unstructured(model, **step(sparsity=0.5, exclude=["^4$"]), calibration=None)
    assert (model[4].weight == 0).sum() == 0 and (model[0].weight == 0).float().mean() >= 0.49


def test_activation_aware_beats_magnitude_when_inputs_are_uneven():
    """Inputs whose scale varies a lot per feature: weighting by activation norms keeps far more fidelity."""
    torch.manual_seed(0)
    scale = torch.logspace(-2, 1, 64)
    batches = [(torch.randn(32, 64) * scale,) for _ in range(4)]
    test = torch.randn(256, 64) * scale
    errors = {}
    for method in ("magnitude", "activation_aware"):
        model = make_mlp(64, 64, 8, seed=1)
        want = model(test).detach()
        prune_unstructured(model, **step(method=method, sparsity=0.5),
                           calibration=batches if method == "activation_aware" else None)
        errors[method] = float((model(test).detach() - want).norm() / want.norm())
    assert errors["activation_aware"] < 0.7 * errors["magnitude"], errors


def test_masks_keep_pruned_weights_at_zero_after_training():
    model = make_mlp(16, 16, 4)
    masks, _ = prune_unstructured(model, **step(sparsity=0.5), calibration=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    apply_masks(model, masks)
    assert all(torch.all(model.get_submodule(n).weight[~m] == 0) for n, m in masks.items())


def test_onnx_magnitude_pruning_on_initializers(tmp_path):
    path = save_onnx(tmp_path / "m.onnx", 16, 64, 4)
    details = prune_onnx(path, tmp_path / "p.onnx", **step(sparsity=0.5))
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    assert details["layers"] == 3
    assert all(abs(float((pruned[n] == 0).mean()) - 0.5) < 0.02 for n in ("0.weight", "2.weight", "4.weight"))
    assert not np.any(pruned["0.bias"] == 0)


def test_onnx_refuses_methods_that_need_torch(tmp_path):
    path = save_onnx(tmp_path / "m.onnx")
    with pytest.raises(JobFailure) as refused:
        prune_onnx(path, tmp_path / "p.onnx", **step(method="structured", pattern="channel", sparsity=0.5))
    assert "PyTorch" in refused.value.message


class TokenModel(torch.nn.Module):
    """An embedding table feeding a Linear layer: the smallest model with a table worth pruning."""

    def __init__(self, vocab: int = 40, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.table(ids))


def test_embedding_tables_stay_dense_unless_asked():
    model = TokenModel()
    masks, details = prune_unstructured(model, **step(sparsity=0.5), calibration=None)
    assert set(masks) == {"out"} and (model.table.weight == 0).sum() == 0
    assert "embedding_tables" not in details and set(layer_sparsity(model)) == {"out"}


@pytest.mark.parametrize("method", ["magnitude", "activation_aware"])
def test_embedding_tables_are_pruned_within_each_token_vector(method):
    model = TokenModel()
    original = model.table.weight.detach().clone()
    calibration = [(torch.randint(0, 40, (4, 6)),)] if method == "activation_aware" else None
    masks, details = prune_unstructured(model, **step(method=method, sparsity=0.5), calibration=calibration,
                                        embeddings=True)
    assert set(masks) == {"table", "out"} and details["embedding_tables"] == ["table"] and details["layers"] == 1
    kept = model.table.weight != 0
    assert torch.all(kept.sum(dim=1) == 8)  # every token keeps half of its vector, rare ones too
    smallest_kept = original.abs().where(kept, torch.inf).min(dim=1).values
    largest_pruned = original.abs().where(~kept, -torch.inf).max(dim=1).values
    assert torch.all(smallest_kept >= largest_pruned)  # by magnitude
    assert layer_sparsity(model)["table"]["sparsity"] == 0.5


def test_embedding_tables_take_the_two_four_pattern_and_the_exclusions():
    model = TokenModel()
    prune_unstructured(model, **step(pattern="2:4", sparsity=0.5), calibration=None, embeddings=True)
    assert torch.all((model.table.weight != 0).reshape(40, -1, 4).sum(-1) <= 2)
    dense = TokenModel()
    masks, _ = prune_unstructured(dense, **step(sparsity=0.5, exclude=["^table$"]), calibration=None, embeddings=True)
    assert set(masks) == {"out"} and (dense.table.weight == 0).sum() == 0


def test_a_model_of_embedding_tables_alone_has_nothing_to_prune():
    with pytest.raises(JobFailure) as refused:
        prune_unstructured(torch.nn.Sequential(torch.nn.Embedding(10, 4)), **step(sparsity=0.5), calibration=None,
                           embeddings=True)
    assert "no Linear or Conv2d" in refused.value.message


def correlated_batches(seed: int = 0, features: int = 64) -> tuple[list[tuple[torch.Tensor]], torch.Tensor]:
    """Calibration batches and held-out inputs from one low-rank source plus noise: inputs that move together,
    as real activations do, so that the weights left can make up for the ones removed."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(12, features, generator=generator)

    def draw(rows: int) -> torch.Tensor:
        return torch.randn(rows, 12, generator=generator) @ mixing + 0.1 * torch.randn(rows, features,
                                                                                       generator=generator)
    return [(draw(64),) for _ in range(6)], draw(256)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_corrects_the_weights_that_stay(pattern):
    """Same sparsity as Wanda, far less output error: the weights kept absorb the pruned ones' contribution."""
    batches, test = correlated_batches()
    errors = {}
    for method in ("activation_aware", "sparsegpt"):
        model = make_mlp(64, 128, 8, seed=1)
        want = model(test).detach()
        masks, details = prune_unstructured(model, **step(method=method, sparsity=0.5, pattern=pattern),
                                            calibration=batches)
        errors[method] = float((model(test).detach() - want).norm() / want.norm())
        for name, weight in weights(model).items():
            assert torch.equal(weight != 0, masks[name])  # exactly the masked weights are zero
            assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01
            if pattern == "2:4":
                assert torch.all((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2)
        assert details["method"] == method and details["layers"] == 3
    assert errors["sparsegpt"] < 0.7 * errors["activation_aware"], errors


def test_sparsegpt_prunes_grouped_convolutions_and_needs_calibration():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 1))
    smooth = torch.nn.functional.avg_pool2d(torch.randn(24, 8, 10, 10), 3, stride=1, padding=1)  # neighbours agree
    want = model(smooth).detach()
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        pruned = copy.deepcopy(model)
        masks, _ = prune_unstructured(pruned, **step(method=method, sparsity=0.5),
                                      calibration=[(smooth[:12],), (smooth[12:],)])
        errors[method] = float((pruned(smooth).detach() - want).norm() / want.norm())
        assert set(masks) == {"0", "2", "4"}
        assert all(torch.equal(pruned.get_submodule(n).weight != 0, m) for n, m in masks.items())
    assert errors["sparsegpt"] < errors["magnitude"], errors
    with pytest.raises(JobFailure) as refused:
        prune_unstructured(model, **step(method="sparsegpt", sparsity=0.5), calibration=None)
    assert "calibration" in refused.value.message


def test_sparsegpt_leaves_padded_tokens_out():
    """With the attention mask named, padded positions (here huge values) do not enter the Hessian: the result is
    the one that calibrating on the real tokens alone gives."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    batches, _ = correlated_batches(features=16)
    real = [x.reshape(8, 8, 16) for (x,) in batches]
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[:, 8:] = 0
    padded = [(torch.cat([x, 1e3 * torch.randn(8, 4, 16)], dim=1), mask) for x in real]
    results = []
    for calibration, token_mask in (([(x, torch.ones(8, 8, dtype=torch.long)) for x in real], 1), (padded, 1),
                                    (padded, None)):
        model = Masked()
        prune_unstructured(model, **step(method="sparsegpt", sparsity=0.5), calibration=calibration,
                           token_mask=token_mask)
        results.append(model.proj.weight.detach())
    assert torch.allclose(results[0], results[1], atol=1e-5)
    assert not torch.allclose(results[0], results[2], atol=1e-3)
