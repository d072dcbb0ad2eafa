"""Tests for worker.compression.train: tiny models and synthetic tasks made here, seeded, on one CPU thread.

The task: 10 (or 16) Gaussian features, classes given by a fixed random MLP (the "oracle"), so it is
nonlinear and a well-trained model approaches but never reaches 100%.
"""

import copy
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from tests.worker.compression.training_tasks import accuracy, exported, make_task, mlp, same_weights, state
from worker.compression.modules import WeightOnlyLinear, quantize_weight, replace_linears
from worker.compression.prune import prune_unstructured
from worker.compression.train import TrainConfig, TrainData, distill, finetune
from worker.errors import JobCancelled, JobFailure

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distillation_beats_hard_labels_with_few_labels(task, teacher):
    """100 labelled samples: the student trained on them alone vs the same student (same init, same epochs)
    distilled from the teacher's soft targets on those samples plus 1000 unlabelled ones (alpha=1: no labels).
    Measured: teacher 0.89; hard labels 0.73-0.76, distilled 0.86-0.87 (labelled sets 10-12, student inits 5-6)."""
    x_test, y_test = task["test"]
    assert accuracy(teacher, x_test, y_test) > 0.85
    (x_few, y_few), (x_more, _) = make_task(100, 10), make_task(1000, 20)
    cfg = TrainConfig(epochs=40, lr=3e-3, batch_size=32, alpha=1.0, temperature=4.0)

    scratch = mlp(10, 16, 6, seed=5)
    finetune(scratch, TrainData([x_few], y_few), task["val"], cfg)
    student = mlp(10, 16, 6, seed=5)
    result = distill(teacher, student, TrainData([np.concatenate([x_few, x_more])], None), task["val"], cfg)

    hard, soft = accuracy(scratch, x_test, y_test), accuracy(student, x_test, y_test)
    assert soft > hard + 0.06, (hard, soft)
    assert len(result.history) == 40 and result.stopped is None
    assert set(result.history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}
    assert {epoch["lr"] for epoch in result.history} == {3e-3}  # constant by default


def test_labels_are_required_unless_alpha_is_one(task, teacher):
    unlabelled = TrainData(task["train"].inputs, None)
    with pytest.raises(JobFailure, match="needs labels") as failure:
        distill(teacher, mlp(10, 16, 6), unlabelled, None, TrainConfig(alpha=0.0))
    assert failure.value.code == "invalid_dataset"
    with pytest.raises(JobFailure, match="fine-tuning needs labels"):
        finetune(mlp(10, 16, 6), unlabelled, None, TrainConfig())
    with pytest.raises(JobFailure, match="out of range"):
        finetune(mlp(10, 16, 3), task["train"], None, TrainConfig(epochs=1))


@pytest.mark.parametrize("bits", [None, 8])
def test_masks_keep_pruned_weights_at_zero(task, teacher, bits):
    x_test, y_test = task["test"]
    model = copy.deepcopy(teacher)
    masks, _ = prune_unstructured(model, method="magnitude", sparsity=0.8, threshold=None, scope="layer",
                                  pattern="unstructured", exclude=[], calibration=None)
    pruned = accuracy(model, x_test, y_test)
    finetune(model, task["train"], task["val"], TrainConfig(epochs=3, lr=3e-3, fake_quant_bits=bits), masks=masks)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0) and torch.count_nonzero(weight[mask]) > 0.9 * mask.sum()
    assert accuracy(model, x_test, y_test) > pruned + 0.03, pruned


def test_best_epoch_weights_are_kept(task, teacher):
    """Fine-tuning a good model on shuffled labels gets worse every epoch: epoch 1's weights come back."""
    model = copy.deepcopy(teacher)
    labels = np.random.default_rng(0).permutation(task["train"].labels[:400])
    data = TrainData([task["train"].inputs[0][:400]], labels)
    snapshots = {}
    result = finetune(model, data, task["val"], TrainConfig(epochs=4, lr=0.01),
                      on_epoch=lambda epoch, record: snapshots.update({epoch: state(model)}))
    accuracies = [record["val_accuracy"] for record in result.history]
    assert result.best_epoch == 1 and max(accuracies[1:]) < accuracies[0] - 0.1, accuracies
    assert same_weights(state(model), snapshots[1])
    x_val, y_val = task["val"].inputs[0], task["val"].labels
    assert accuracy(model, x_val, y_val) == accuracies[0]


def test_early_stopping_ends_after_patience_epochs_without_a_better_score(task, teacher):
    """Shuffled labels make every epoch after the first worse: with patience 2, epoch 3 is the last of 10."""
    model = copy.deepcopy(teacher)
    labels = np.random.default_rng(0).permutation(task["train"].labels[:400])
    result = finetune(model, TrainData([task["train"].inputs[0][:400]], labels), task["val"],
                      TrainConfig(epochs=10, lr=0.01, patience=2))
    assert (result.stopped, result.best_epoch, len(result.history)) == ("early_stopping", 1, 3)


def test_diverged_epochs_are_never_kept(task):
    """Weights blown up to NaN in epoch 2 (as a far too high learning rate would): epoch 1 is returned."""
    model = mlp(10, 16, 6)
    batches_per_epoch = 400 // 32 + 1
    calls = []
    snapshots = {}

    def blow_up():
        calls.append(1)
        if len(calls) == batches_per_epoch + 2:
            with torch.no_grad():
                model[0].weight.fill_(float("nan"))

    data = TrainData([task["train"].inputs[0][:400]], task["train"].labels[:400])
    result = finetune(model, data, None, TrainConfig(epochs=3), check=blow_up,
                      on_epoch=lambda epoch, record: snapshots.update({epoch: state(model)}))
    assert result.best_epoch == 1
    assert [record["train_loss"] is None for record in result.history] == [False, True, True]
    assert same_weights(state(model), snapshots[1]) and torch.isfinite(model[0].weight).all()


def test_cancel_restores_best_weights_and_reraises(task):
    model = mlp(10, 16, 6)
    data = TrainData([task["train"].inputs[0][:320]], task["train"].labels[:320])  # 10 batches per epoch
    calls = []
    snapshots = {}

    def cancel_in_epoch_two():
        calls.append(1)
        if len(calls) == 14:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        finetune(model, data, None, TrainConfig(epochs=3, fake_quant_bits=4), check=cancel_in_epoch_two,
                 on_epoch=lambda epoch, record: snapshots.update({epoch: state(model)}))
    assert list(snapshots) == [1]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # fake quantization removed
    assert same_weights(state(model), {k.replace(".parametrizations.weight.original", ".weight"): v
                                       for k, v in snapshots[1].items()})


def test_deadline_stops_with_time_budget(task):
    model = mlp(10, 16, 6)
    before = state(model)
    records = []
    result = finetune(model, task["train"], task["val"], TrainConfig(epochs=5), deadline=time.monotonic(),
                      on_epoch=lambda epoch, record: records.append(record))
    assert result.stopped == "time_budget" and result.best_epoch == 1
    assert len(result.history) == 1 and records == result.history and result.history[0]["val_accuracy"] is not None
    assert not same_weights(state(model), before)  # the one batch it trained is kept


def test_exported_graph_trains_without_mode_switching(task):
    graph = exported(mlp(10, 32, 6).eval(), 4, dynamic=True)

    def refuse(*args):
        raise AssertionError("train()/eval() must not be called on a torch.export module")

    graph.train, graph.eval = refuse, refuse
    for parameter in graph.parameters():
        parameter.requires_grad_(False)  # as an exported program may hand them over
    x_test, y_test = task["test"]
    before = accuracy(graph, x_test, y_test)
    finetune(graph, task["train"], task["val"], TrainConfig(epochs=2, lr=3e-3))
    assert accuracy(graph, x_test, y_test) > before + 0.2


def test_static_batch_drops_the_training_remainder_and_pads_validation(task):
    graph = exported(mlp(10, 32, 6).eval(), 16, dynamic=False)
    sizes = []
    graph.get_submodule("0").register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    data = TrainData([task["train"].inputs[0][:100]], task["train"].labels[:100])
    val = TrainData([task["val"].inputs[0][:37]], task["val"].labels[:37])
    result = finetune(graph, data, val, TrainConfig(epochs=2, lr=3e-3), static_batch=16)
    assert set(sizes) == {16}
    assert len(sizes) == 2 * (6 + 3)  # 6 training batches (4 samples dropped), 3 validation batches (padded)
    eager = mlp(10, 32, 6)
    eager.load_state_dict(graph.state_dict())
    assert accuracy(eager, val.inputs[0], val.labels) == result.history[result.best_epoch - 1]["val_accuracy"]
    with pytest.raises(JobFailure, match="exactly 16"):
        finetune(graph, TrainData([data.inputs[0][:10]], data.labels[:10]), None, TrainConfig(), static_batch=16)


class WithHidden(nn.Module):
    """Logits plus the hidden layer's activations as a second output."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden, self.head = nn.Linear(10, 16), nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.hidden(x))
        return self.head(h), h


def test_hidden_weight_matches_extra_outputs(task):
    teacher = WithHidden(0)
    inputs = torch.from_numpy(task["val"].inputs[0])
    gaps = {}
    for weight in (0.0, 1.0):
        student = WithHidden(1)
        distill(teacher, student, TrainData(task["train"].inputs, None), None,
                TrainConfig(epochs=3, alpha=1.0, hidden_weight=weight))
        with torch.no_grad():
            gaps[weight] = float(nn.functional.mse_loss(student(inputs)[1], teacher(inputs)[1]))
    assert gaps[1.0] < 0.5 * gaps[0.0], gaps


def quantized_accuracy(model: nn.Module, bits: int, x: np.ndarray, y: np.ndarray) -> float:
    """int4 through the real weight-only module; int3 through the same per-channel rounding."""
    model = copy.deepcopy(model)
    if bits == 4:
        replace_linears(model, lambda linear: WeightOnlyLinear(linear, 4, None), lambda name: False)
    else:
        for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
            q, scale = quantize_weight(linear.weight.detach(), bits, None)
            linear.weight.data = q.float() * scale
    return accuracy(model, x, y)


def test_fake_quant_training_survives_low_bit_quantization():
    """Features on scales from 1 to 0.001 make per-channel int4 weights lossy (the large first-layer weights
    of the small features set each row's scale). Fine-tuning the same model with and without fake
    quantization, then quantizing both for real. Measured over model seeds 0-3 (float 0.75-0.77): int4
    0.67-0.71 without, 0.74-0.78 with; int3 0.49-0.63 without, 0.72-0.75 with."""
    scales = (10.0 ** (-3 * np.arange(16) / 15)).astype(np.float32)
    (x, y), (x_val, y_val), (x_test, y_test) = (make_task(n, s, 16, 4, scales) for n, s in
                                                ((3000, 0), (500, 1), (2000, 2)))
    base = mlp(16, 128, 128, 4)
    train, val = TrainData([x], y), TrainData([x_val], y_val)
    finetune(base, train, val, TrainConfig(epochs=15, lr=1e-2, batch_size=64))
    results = {}
    for bits in (None, 4, 3):
        model = copy.deepcopy(base)
        finetune(model, train, val, TrainConfig(epochs=6, lr=3e-3, batch_size=64, fake_quant_bits=bits))
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
        results[bits] = {b: quantized_accuracy(model, b, x_test, y_test) for b in (4, 3)}
    assert results[4][4] > results[None][4] + 0.03, results
    assert results[3][3] > results[None][3] + 0.05, results


def test_an_encoder_is_matched_on_its_pooled_embedding_over_real_tokens_only():
    """The encoder loss (hidden-state MSE + 1 - cosine of mean-pooled embeddings) looks only where the attention
    mask is set: what padding positions hold changes neither term."""
    from worker.compression.train import _Objective

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    objective = _Objective(soft=1.0, hard=0.0, hidden=0.0, temperature=1.0, mask_input=1)
    loss = objective([student], [teacher], None, [torch.zeros(2, 5), mask])
    padded = student.clone()
    padded[0, 3:] = 100.0
    assert torch.isclose(objective([padded], [teacher], None, [torch.zeros(2, 5), mask]), loss)
    real = mask.bool()
    mse = ((student - teacher)[real] ** 2).mean()
    pooled = torch.nn.functional.cosine_similarity(
        (student * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
        (teacher * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    assert torch.isclose(loss, mse + (1 - pooled).mean())
    assert objective([teacher], [teacher], None, [torch.zeros(2, 5), mask]) < 1e-6


def _tiny_encoder_and_pruned_copy():
    """(teacher, its 50% magnitude-pruned copy, the masks): a tiny BERT with weights as large as a trained model's
    and no dropout, so that pruning costs fidelity and a few epochs win it back."""
    from transformers import BertConfig, BertModel

    from worker.formats.hf import TextModelAdapter

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, initializer_range=0.3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    names = ["input_ids", "attention_mask"]
    teacher = TextModelAdapter(BertModel(config).eval(), names, ["last_hidden_state"], {})
    student = copy.deepcopy(teacher)
    masks, _ = prune_unstructured(student, method="magnitude", sparsity=0.5, pattern="unstructured",
                                  threshold=None, scope="layer", exclude=[], calibration=None, check=lambda: None)
    return teacher, student, masks


def test_an_encoder_distils_on_unlabelled_tokens_with_masks_kept():
    """Recovery at the training level: a pruned copy of a tiny encoder learns back toward the original from
    token ids alone (no labels), and its pruned weights stay zero."""
    teacher, student, masks = _tiny_encoder_and_pruned_copy()
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, size=(96, 8)).astype(np.int64)
    attention = np.ones_like(ids)
    attention[::2, 5:] = 0

    def gap():
        with torch.no_grad():
            inputs = torch.from_numpy(ids[:32]), torch.from_numpy(attention[:32])
            return float(torch.nn.functional.mse_loss(student(*inputs)[0], teacher(*inputs)[0]))

    before = gap()
    distill(teacher, student, TrainData([ids, attention], None), None,
            TrainConfig(epochs=3, lr=3e-3, batch_size=16, alpha=1.0, attention_mask_input=1), masks=masks)
    assert gap() < 0.7 * before
    for name, mask in masks.items():
        assert not student.get_submodule(name).weight[mask == 0].any()


def test_an_encoder_batch_is_cut_to_its_longest_text():
    from worker.compression.train import _batch

    ids = torch.arange(24).reshape(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    inputs, _ = _batch(([ids, mask], None), torch.tensor([0, 1]), "cpu", mask_input=1)
    assert [list(t.shape) for t in inputs] == [[2, 3], [2, 3]] and torch.equal(inputs[0], ids[:2, :3])
    inputs, _ = _batch(([ids, mask], None), torch.tensor([0, 2]), "cpu", mask_input=1)
    assert inputs[0].shape == (2, 6)  # the longest text fills the row
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])  # left padding: nothing to cut at the end
    inputs, _ = _batch(([ids[:2], left], None), torch.tensor([0, 1]), "cpu", mask_input=1)
    assert inputs[0].shape == (2, 6)
    inputs, _ = _batch(([ids, mask], None), torch.tensor([0, 1]), "cpu")
    assert inputs[0].shape == (2, 6)  # no mask named: as stored


def test_the_layer_match_is_relative_squared_error_over_real_tokens():
    from worker.compression.train import _Objective

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    objective = _Objective(soft=0.0, hard=0.0, hidden=0.0, temperature=1.0, mask_input=1, layer=2.0)
    inputs = [torch.zeros(2, 5), mask]
    loss = objective([student[..., :3]], None, None, inputs, [(student, teacher), (teacher, teacher)])
    real = mask.bool()
    relative = ((student - teacher)[real] ** 2).sum() / (teacher[real] ** 2).sum()
    assert torch.isclose(loss, 2.0 * (relative + 0) / 2)
    padded = student.clone()
    padded[0, 3:] = 100.0
    assert torch.isclose(objective([student[..., :3]], None, None, inputs, [(padded, teacher), (teacher, teacher)]),
                         loss)


@pytest.mark.parametrize("dropout", [True, False])
def test_dropout_off_makes_every_training_pass_deterministic_and_is_restored_after(task, teacher, dropout):
    """`dropout=False` zeroes every dropout probability while the student learns (the probability itself, which
    Hugging Face attention reads too) and puts the old ones back when training ends."""
    student = nn.Sequential(nn.Dropout(0.5), copy.deepcopy(teacher), nn.Dropout1d(0.3))
    seen = []

    def record(module, args, output):
        if module.training:
            seen.append((module[0].p, module[2].p))

    student.register_forward_hook(record)
    distill(teacher, student, TrainData(task["train"].inputs, None), None,
            TrainConfig(epochs=1, batch_size=64, alpha=1.0, dropout=dropout))
    assert seen and set(seen) == {(0.5, 0.3) if dropout else (0.0, 0.0)}
    assert (student[0].p, student[2].p) == (0.5, 0.3)


def test_linear_schedule_brings_the_learning_rate_down_to_zero_by_the_last_planned_step(task, teacher):
    """160 samples in batches of 32: 5 steps an epoch, 20 in 4 epochs; the lr after epoch k is lr * (1 - k/4)."""
    data = TrainData([task["train"].inputs[0][:160]], None)
    result = distill(teacher, mlp(10, 16, 6), data, None,
                     TrainConfig(epochs=4, lr=1e-3, batch_size=32, alpha=1.0, lr_schedule="linear"))
    assert [epoch["lr"] for epoch in result.history] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    with pytest.raises(JobFailure, match="lr_schedule must be constant or linear"):
        distill(teacher, mlp(10, 16, 6), data, None, TrainConfig(alpha=1.0, lr_schedule="cosine"))


def test_layer_transfer_pulls_every_paired_layer_toward_the_teacher():
    """A pruned copy of a tiny encoder recovering with its layers matched to the teacher's ends closer to the
    teacher at the first layer than the same training matched at the last output alone."""
    from worker.compression.students import matching_layers

    teacher, pruned, masks = _tiny_encoder_and_pruned_copy()
    ids = np.random.default_rng(0).integers(5, 40, size=(96, 8)).astype(np.int64)
    data = TrainData([ids, np.ones_like(ids)], None)
    probe = torch.from_numpy(ids[:32]), torch.ones(32, 8, dtype=torch.int64)

    def first_layer_gap(student) -> float:
        out = {}
        hooks = [m.encoder.layer[0].register_forward_hook(lambda _m, _a, o, key=key: out.__setitem__(key, o[0]))
                 for key, m in (("s", student.model), ("t", teacher.model))]
        with torch.no_grad():
            student(*probe), teacher(*probe)
        for hook in hooks:
            hook.remove()
        return float(((out["s"] - out["t"]) ** 2).sum() / (out["t"] ** 2).sum())

    gaps = {}
    for weight in (0.0, 1.0):
        student = copy.deepcopy(pruned)
        layers = matching_layers(student.model, teacher.model)
        assert len(layers) == 2
        distill(teacher, student, data, None, TrainConfig(epochs=3, lr=3e-3, batch_size=16, alpha=1.0,
                                                          attention_mask_input=1, layer_weight=weight),
                masks=masks, layers=layers)
        gaps[weight] = first_layer_gap(student)
        assert not any(m.encoder.layer[0]._forward_hooks for m in (student.model, teacher.model))  # taps removed
    assert gaps[1.0] < 0.8 * gaps[0.0], gaps
