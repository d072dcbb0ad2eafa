import pytest
import torch

from worker.compression.modules import (
    DynamicInt8Linear,
    WeightOnlyLinear,
    count_weights,
    lift_layers,
    pack_int4,
    replace_linears,
    unpack_int4,
)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.inner(x))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 8), torch.nn.Linear(8, 8)])
        self.block = Block()

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.block(x)


def test_lift_layers_restores_named_modules_and_outputs():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 4, 4)
    lifted = lift_layers(torch.export.export(model, (x,)).module())
    kinds = {name: type(m) for name, m in lifted.named_modules()}
    assert kinds["conv"] is torch.nn.Conv2d and kinds["layers.0"] is torch.nn.Linear
    assert kinds["block.inner"] is torch.nn.Linear and kinds["block.out"] is torch.nn.Linear
    assert torch.equal(lifted(x), model(x))
    torch.export.export(lifted, (x,))  # still exportable


@pytest.mark.parametrize("bits, group, tolerance", [(8, None, 0.02), (4, 8, 0.3), (4, None, 0.3)])
def test_weight_only_linear_is_close_and_compact(bits, group, tolerance):
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(32, 16), torch.randn(5, 32)
    quantized = WeightOnlyLinear(linear, bits, group)
    assert (quantized(x) - linear(x)).abs().max() < tolerance
    assert quantized.qweight.dtype in (torch.int8, torch.uint8)
    assert quantized.qweight.numel() == 32 * 16 // (2 if bits == 4 else 1)


def test_int4_pack_roundtrip():
    q = torch.randint(-8, 8, (3, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_int8_linear_is_close(per_channel):
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(64, 32), torch.randn(4, 7, 64)
    out = DynamicInt8Linear(linear, per_channel)(x)
    assert out.shape == (4, 7, 32)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), linear(x).flatten(), dim=0)
    assert cosine > 0.999


def test_count_weights_counts_logical_params():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = count_weights(model)
    replace_linears(model, lambda layer: WeightOnlyLinear(layer, 4, 8), lambda name: name == "2")
    assert count_weights(model)[0] == before[0] == 16 * 8 + 8 + 8 * 4 + 4
