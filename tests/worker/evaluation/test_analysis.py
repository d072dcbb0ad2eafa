import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from app.core.recipe import Recipe
from tests.helpers import make_mlp, save_onnx
from worker.compression.modules import lift_layers
from worker.compression.quantize import excluded_nodes
from worker.evaluation import analysis
from worker.evaluation.analysis import analyze_module, analyze_onnx


def batches(shape=(8, 16), count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=generator),) for _ in range(count)]


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_identical(module, before):
    after = module.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def add_outliers(model):
    """Hidden unit 0 is dead (zero weights, negative bias), so huge weights reading it leave the outputs as they
    were, but they set layer 2's per-channel int8 scales: its other weights all round to zero."""
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0
        model[2].weight[:, 0] = 1000.0
    return model


def redundant(model, seed=0):
    """Weights mostly near zero, as in a trained, redundant model (pruning half costs nothing), and the large ones
    on a grid of 0.1 up to 0.7 in every row, which int4 (7 levels each side) represents almost exactly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            w = layer.weight
            big = torch.rand(w.shape, generator=generator) < 0.25
            grid = torch.randint(-7, 8, w.shape, generator=generator) * 0.1
            w.copy_(grid * big + 1e-4 * torch.randn(w.shape, generator=generator))
            w[:, 0] = 0.7
    return model


def test_statistics_match_numpy():
    model = make_mlp()
    with torch.no_grad():
        model[2].weight[:5].zero_()
    result = analyze_module(model, batches(), bins=16)
    layers = {layer["name"]: layer for layer in result["layers"]}
    assert list(layers) == ["0", "2", "4"]
    for name, layer in layers.items():
        w = model.get_submodule(name).weight.detach().numpy()
        assert layer["kind"] == "Linear" and layer["shape"] == list(w.shape) and layer["params"] == w.size
        assert layer["min"] == pytest.approx(w.min()) and layer["max"] == pytest.approx(w.max())
        assert layer["mean"] == pytest.approx(w.mean(), abs=1e-7) and layer["std"] == pytest.approx(w.std(), rel=1e-5)
        assert layer["sparsity"] == pytest.approx((w == 0).mean())
        counts, edges = np.histogram(w, bins=16)
        assert layer["histogram"]["counts"] == counts.tolist() and sum(layer["histogram"]["counts"]) == w.size
        assert np.allclose(layer["histogram"]["edges"], edges) and len(layer["histogram"]["edges"]) == 17
        assert set(layer["sensitivity"]) == {"int8", "int4", "prune50"}
    assert layers["2"]["sparsity"] == pytest.approx(5 / 32)
    assert sum(layer["param_share"] for layer in layers.values()) == pytest.approx(1.0)
    weight_params = 16 * 32 + 32 * 32 + 32 * 4
    assert result["totals"] == {"params": sum(p.numel() for p in model.parameters()), "weight_params": weight_params,
                                "sparsity": pytest.approx(5 * 32 / weight_params)}


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    return save_onnx(tmp_path_factory.mktemp("analysis") / "mlp.onnx")


@pytest.mark.parametrize("lifted", [False, True])
def test_outlier_layer_is_most_sensitive_and_kept_out_of_quantization(lifted, mlp_onnx):
    model, data = add_outliers(make_mlp()), batches()
    if lifted:
        model = lift_layers(torch.export.export(model, data[0]).module())
    before = snapshot(model)
    result = analyze_module(model, data)
    assert_identical(model, before)
    sensitivity = {layer["name"]: layer["sensitivity"]["int8"] for layer in result["layers"]}
    assert sensitivity["2"] > 1e-2 and sensitivity["2"] > 100 * max(sensitivity["0"], sensitivity["4"])
    recipe = Recipe.model_validate(result["suggested_recipe"])
    quantize = recipe.steps[-1]
    assert quantize.op == "quantize" and quantize.method == "dynamic" and quantize.granularity == "per_channel"
    # the module name (pytorch target) and its weight's name (ONNX file for onnxruntime), both exact
    assert quantize.exclude == ["^2$", r"^2\.weight$"]
    assert [n for n in ("2", "2.weight", "0", "20", "12.weight") if any(re.search(p, n) for p in quantize.exclude)] \
        == ["2", "2.weight"]
    assert excluded_nodes(mlp_onnx, quantize.exclude) == ["node_linear_1"]  # in the ONNX form of the same model
    assert any("except 2 (" in line for line in result["rationale"])


def test_pruning_rules_follow_prune50_sensitivity():
    model, data = redundant(make_mlp()), batches()
    result = analyze_module(model, data)
    prune = Recipe.model_validate(result["suggested_recipe"]).steps[0]
    assert prune.op == "prune" and prune.method == "magnitude" and prune.sparsity == 0.5 and prune.exclude == []
    assert all(layer["sensitivity"]["prune50"] < analysis.PRUNE_LOW for layer in result["layers"])
    assert any("weight_only" in line and "pytorch" in line for line in result["rationale"])  # int4 is harmless

    with torch.no_grad():  # every weight of the head matters equally: pruning half of them hurts
        head = model[4].weight
        head.copy_(torch.sign(torch.randn(head.shape)) * (1 + 0.01 * torch.rand(head.shape)))
    result = analyze_module(model, data)
    prune = Recipe.model_validate(result["suggested_recipe"]).steps[0]
    assert result["layers"][2]["sensitivity"]["prune50"] >= analysis.PRUNE_HIGH
    assert prune.sparsity == 0.5 and prune.exclude == ["^4$"]


def test_random_layers_get_moderate_pruning_and_no_int4_alternative():
    result = analyze_module(make_mlp(), batches())
    recipe = Recipe.model_validate(result["suggested_recipe"])
    assert [step.op for step in recipe.steps] == ["prune", "quantize"]
    assert recipe.steps[0].sparsity == 0.3 and recipe.steps[1].exclude == []
    assert not any("weight_only" in line for line in result["rationale"])


def test_only_the_largest_layers_are_measured_beyond_the_cap(monkeypatch):
    monkeypatch.setattr(analysis, "MAX_LAYERS", 2)
    result = analyze_module(make_mlp(), batches())
    measured = {layer["name"]: layer["sensitivity"] is not None for layer in result["layers"]}
    assert measured == {"0": True, "2": True, "4": False}  # 4 is the smallest (32 x 4)
    assert any("the 2 largest" in line for line in result["rationale"])
    Recipe.model_validate(result["suggested_recipe"])


def test_cancellation_propagates_and_weights_are_restored():
    model = make_mlp()
    before = snapshot(model)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 4:  # inside the sensitivity loop
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        analyze_module(model, batches(), check=check)
    assert_identical(model, before)


def test_batches_are_required():
    with pytest.raises(ValueError):
        analyze_module(make_mlp(), [])


# --- ONNX ----------------------------------------------------------------------------------------------------

def numpy_batches():
    return [[b[0].numpy()] for b in batches(shape=(4, 16))]  # save_onnx exports a fixed batch of 4


def test_onnx_gemm_model_matches_the_torch_analysis(mlp_onnx):
    original = mlp_onnx.read_bytes()
    result = analyze_onnx(mlp_onnx, numpy_batches(), bins=16)
    assert mlp_onnx.read_bytes() == original
    reference = analyze_module(make_mlp(), batches(shape=(4, 16)), bins=16)
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(mlp_onnx)).graph.initializer}
    assert [layer["kind"] for layer in result["layers"]] == ["Gemm"] * 3
    for layer, torch_layer, weight in zip(result["layers"], reference["layers"], ["0.weight", "2.weight", "4.weight"]):
        w = initializers[weight]
        assert layer["shape"] == list(w.shape) and layer["params"] == w.size
        assert layer["min"] == w.min() and layer["max"] == w.max() and layer["sparsity"] == (w == 0).mean()
        assert layer["mean"] == pytest.approx(w.mean(), abs=1e-7) and layer["std"] == pytest.approx(w.std(), rel=1e-5)
        assert sum(layer["histogram"]["counts"]) == w.size
        for variant in analysis.VARIANTS:
            expected = torch_layer["sensitivity"][variant]
            assert layer["sensitivity"][variant] == pytest.approx(expected, rel=1e-3, abs=1e-9)
    assert sum(layer["param_share"] for layer in result["layers"]) == pytest.approx(1.0)
    assert result["totals"]["params"] == sum(w.size for w in initializers.values())
    assert not any("weight_only" in line for line in result["rationale"])  # pytorch-target alternative only
    Recipe.model_validate(result["suggested_recipe"])


def test_onnx_outlier_layer_is_excluded_by_node_name(mlp_onnx, tmp_path):
    model = onnx.load(str(mlp_onnx))
    tensors = {t.name: t for t in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t).copy() for name, t in tensors.items()}
    arrays["0.weight"][0] = 0
    arrays["0.bias"][0] = -1
    arrays["2.weight"][:, 0] = 1000
    for name in ("0.weight", "0.bias", "2.weight"):
        tensors[name].CopyFrom(numpy_helper.from_array(arrays[name], name))
    path = tmp_path / "outliers.onnx"
    onnx.save(model, str(path))
    result = analyze_onnx(path, numpy_batches())
    names = [layer["name"] for layer in result["layers"]]
    int8 = {layer["name"]: layer["sensitivity"]["int8"] for layer in result["layers"]}
    assert int8[names[1]] > 100 * max(int8[names[0]], int8[names[2]])
    recipe = Recipe.model_validate(result["suggested_recipe"])
    assert recipe.steps[-1].exclude == [f"^{re.escape(names[1])}$"]


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def conv_onnx(model: ConvNet, path):
    """The same network by hand: Conv weights [out, in, kh, kw] and a MatMul weight stored as [in, out]."""
    weights = [numpy_helper.from_array(model.conv.weight.detach().numpy(), "conv_w"),
               numpy_helper.from_array(model.conv.bias.detach().numpy(), "conv_b"),
               numpy_helper.from_array(model.fc.weight.detach().numpy().T.copy(), "fc_w"),
               numpy_helper.from_array(model.fc.bias.detach().numpy(), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
             helper.make_node("MatMul", ["f", "fc_w"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc_bias")]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], weights)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, str(path))
    return path


def test_conv_and_matmul_weights_torch_and_onnx_agree(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    data = batches(shape=(6, 3, 4, 4))
    before = snapshot(model)
    torch_result = analyze_module(model, data)
    assert_identical(model, before)
    onnx_result = analyze_onnx(conv_onnx(model, tmp_path / "conv.onnx"), [[b[0].numpy()] for b in data])
    assert [(x["name"], x["kind"], x["shape"]) for x in torch_result["layers"]] == \
        [("conv", "Conv2d", [4, 3, 3, 3]), ("fc", "Linear", [5, 64])]
    assert [(x["name"], x["kind"], x["shape"]) for x in onnx_result["layers"]] == \
        [("conv", "Conv", [4, 3, 3, 3]), ("fc", "MatMul", [64, 5])]
    for a, b in zip(torch_result["layers"], onnx_result["layers"]):
        for stat in ("min", "max", "mean", "std", "sparsity", "params", "param_share"):
            assert a[stat] == pytest.approx(b[stat], rel=1e-6, abs=1e-9)
        assert a["histogram"]["counts"] == b["histogram"]["counts"]
        for variant in analysis.VARIANTS:  # per output channel on both, whatever the storage layout
            assert a["sensitivity"][variant] == pytest.approx(b["sensitivity"][variant], rel=1e-3, abs=1e-9)
    Recipe.model_validate(torch_result["suggested_recipe"])
    Recipe.model_validate(onnx_result["suggested_recipe"])
