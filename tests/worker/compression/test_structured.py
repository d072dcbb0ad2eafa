import torch

from worker.compression.modules import lift_layers
from worker.compression.structured import prune_graph_channels, prune_transformer_ffn


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c2, self.fc = torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(x + self.a(x))


def prune_step(sparsity=0.5, scope="layer") -> dict:
    """The structured pruning functions' keyword arguments (no layer excluded, as a prune step's default)."""
    return {"sparsity": sparsity, "scope": scope, "exclude": []}


def test_cnn_channels_really_removed():
    torch.manual_seed(0)
    model, x = CNN().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn.running_mean.uniform_()
        model.bn.running_var.uniform_(0.5, 2)
    graph = lift_layers(torch.export.export(model, (x,)).module())
    details = prune_graph_channels(graph, **prune_step())
    assert details["channels_removed"] == {"c1": 8, "c2": 16}
    assert graph.c1.weight.shape == (8, 3, 3, 3) and graph.c2.weight.shape == (16, 8, 3, 3)
    assert graph.fc.weight.shape == (10, 16 * 4 * 4)
    assert graph(x).shape == (2, 10)
    assert sum(p.numel() for p in graph.parameters()) < 0.45 * sum(p.numel() for p in model.parameters())
    torch.export.export(graph, (x,))


def test_zero_channels_are_removed_first_without_changing_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[8:] = 0
        model[0].bias[8:] = 0
    x = torch.randn(4, 8)
    graph = lift_layers(torch.export.export(model, (x,)).module())
    prune_graph_channels(graph, **prune_step())
    assert graph.get_submodule("0").out_features == 8
    assert torch.allclose(graph(x), model(x), atol=1e-6)


def test_residual_connections_are_left_alone():
    graph = lift_layers(torch.export.export(Residual(), (torch.randn(2, 8),)).module())
    try:
        prune_graph_channels(graph, **prune_step())
    except Exception as exc:
        assert "no layer" in str(exc)
    assert graph.a.out_features == 8


def test_transformer_ffn_neurons_removed_and_config_follows():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32)
    model = BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 6))
    details = prune_transformer_ffn(model, **prune_step(0.25))
    assert details["neurons_per_block"] == {"before": 32, "after": 24}
    assert all(layer.intermediate.dense.out_features == 24 for layer in model.encoder.layer)
    assert model.config.intermediate_size == 24
    assert model(input_ids=ids).last_hidden_state.shape == (2, 6, 16)
