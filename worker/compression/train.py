"""Training after compression: knowledge distillation and fine-tuning (students to distill into: students.py).

Pruning and quantization lose quality; a few epochs of training win most of it back. `distill` trains a
student to match the original model (the teacher), whose soft targets carry more than labels do (Hinton et
al.); `finetune` trains on labels alone. Both keep pruned weights at zero (masks re-applied after every
step), can fake-quantize Linear weights so the model learns weights that survive quantization, keep the
best epoch's weights, and stop cleanly on cancellation or at a deadline.

Models are whatever the pipeline carries: torch.export GraphModules (lifted layers; their train/eval mode
cannot be switched) and Hugging Face adapters (ordinary modules). A model takes positional tensors in input
order and returns a tensor or a tuple of tensors; the first output is what is trained.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from app.core.errors import ErrorCode
from worker.errors import JobCancelled, JobFailure

Tensors = tuple[list[torch.Tensor], torch.Tensor | None]  # inputs, labels


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 2.0      # distillation only
    alpha: float = 0.5            # weight of the soft-target loss; hard-label loss gets 1 - alpha
    hidden_weight: float = 0.0    # > 0: also match extra outputs (MSE) where teacher and student shapes agree
    layer_weight: float = 0.0     # > 0: also match the paired layers' outputs (distill's `layers`), relative MSE
    attention_mask_input: int | None = None  # encoders: the input whose nonzeros mark real tokens (mean pooling)
    fake_quant_bits: int | None = None  # quantization-aware training of Linear weights
    dropout: bool = True          # False: the student learns with every dropout probability at 0
    lr_schedule: str = "constant"  # "linear": the learning rate falls linearly to 0 over the planned epochs
    patience: int | None = None   # stop after this many epochs without a better score (early stopping)
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class TrainData:
    inputs: list[np.ndarray]      # one array per model input, N samples each on axis 0
    labels: np.ndarray | None     # int class labels [N] or None


@dataclass
class TrainResult:
    history: list[dict]           # per epoch: epoch, train_loss, val_loss, val_accuracy, seconds
    best_epoch: int               # 1-based epoch whose weights were kept (0: every epoch diverged)
    stopped: str | None           # None, "time_budget" or "early_stopping" (cancellation re-raises JobCancelled)


@dataclass
class _Objective:
    """The loss: soft * (teacher match) + hard * CE(labels) + hidden * MSE(extra outputs) + layer * (layer match).

    The teacher match on [batch, classes] logits is T^2 * KL(teacher || student) at temperature T, the usual
    implementation of Hinton's soft-target loss (T^2 keeps its gradients on the scale of the CE term); on an
    encoder's [batch, seq, hidden] states it is the hidden-state MSE plus 1 - cosine of the mean-pooled embeddings
    (over real tokens when `mask_input` names the attention mask): what a sentence encoder is used for; on any
    other first output it is the MSE between the two. Extra outputs
    (tuple elements after the first) are paired by position and matched where their shapes agree.
    The layer match is the mean over paired layers of their outputs' squared error relative to the teacher's
    (over real tokens): scale-free, so layers whose states are large do not drown the others.
    Terms that need labels are left out when the data has none (validation data without labels).
    """

    soft: float
    hard: float
    hidden: float
    temperature: float
    mask_input: int | None = None
    layer: float = 0.0

    def __call__(self, student: list[torch.Tensor], teacher: list[torch.Tensor] | None,
                 labels: torch.Tensor | None, inputs: list[torch.Tensor],
                 layers: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor | None:
        first = student[0].float()
        terms = []
        mask = None if self.mask_input is None else inputs[self.mask_input][:len(first)]
        if self.hard > 0:
            if first.dim() != 2:
                raise JobFailure(ErrorCode.INVALID_RECIPE,
                                 "training on labels needs [batch, classes] logits as the "
                                 f"model's first output, got shape {list(first.shape)}; distill "
                                 "from the original model with alpha=1 instead (no labels used)")
            if labels is not None:
                if int(labels.max()) >= first.shape[1]:
                    raise JobFailure(ErrorCode.INVALID_DATASET, f"label {int(labels.max())} is out of range: the model "
                                                                f"has {first.shape[1]} classes")
                terms.append(self.hard * F.cross_entropy(first, labels))
        if self.soft > 0:
            terms.append(self.soft * self._match(first, teacher[0].float(), mask))
        if self.hidden > 0:
            pairs = [(s, t) for s, t in zip(student[1:], teacher[1:]) if s.shape == t.shape]
            if pairs:
                terms.append(self.hidden * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs))
        if self.layer > 0 and layers:
            terms.append(self.layer * sum(_relative_error(s[:len(first)].float(), t[:len(first)].float(), mask)
                                          for s, t in layers) / len(layers))
        return sum(terms) if terms else None

    def _match(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise JobFailure(ErrorCode.INVALID_RECIPE,
                             f"the student's first output has shape {list(student.shape)}, the "
                             f"teacher's {list(teacher.shape)}: they must match to distill")
        if student.dim() == 3:
            pooled_cosine = F.cosine_similarity(_mean_pool(student, mask), _mean_pool(teacher, mask), dim=-1)
            return _real_token_mse(student, teacher, mask) + (1 - pooled_cosine).mean()
        if student.dim() != 2:
            return F.mse_loss(student, teacher)
        t = self.temperature
        return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True) * t * t


def _real_token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE of [batch, seq, hidden] states over the tokens the mask marks: what an encoder computes at padding is
    never used, so the student spends nothing on matching it."""
    if mask is None:
        return F.mse_loss(student, teacher)
    weights = (mask != 0).to(student.dtype).unsqueeze(-1)
    return ((student - teacher) ** 2 * weights).sum() / (weights.sum() * student.shape[-1]).clamp(min=1)


def _relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Squared error of [batch, seq, hidden] states over the teacher's squared norm, at the tokens the mask marks."""
    weights = torch.ones(student.shape[:-1], dtype=student.dtype, device=student.device) if mask is None or \
        mask.shape != student.shape[:-1] else (mask != 0).to(student.dtype)
    error = (((student - teacher) ** 2).sum(-1) * weights).sum()
    return error / ((teacher ** 2).sum(-1) * weights).sum().clamp(min=1e-12)


class _LayerTaps:
    """Records the outputs of paired (student layer, teacher layer) modules at every forward pass, for the
    layer-to-layer transfer of TinyBERT-style distillation: a student matched layer by layer learns faster than
    one matched at its last output alone."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]]):
        self.student: list[torch.Tensor | None] = [None] * len(pairs)
        self.teacher: list[torch.Tensor | None] = [None] * len(pairs)
        self._hooks = [module.register_forward_hook(self._recorder(side, i))
                       for i, pair in enumerate(pairs) for module, side in zip(pair, (self.student, self.teacher))]

    @staticmethod
    def _recorder(side: list, index: int):
        def record(_module: nn.Module, _args: tuple, output) -> None:
            side[index] = output[0] if isinstance(output, (tuple, list)) else output
        return record

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(s, t) for s, t in zip(self.student, self.teacher) if s is not None and t is not None
                and s.shape == t.shape]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _mean_pool(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, hidden]: the mean over the tokens the mask marks (all when None)."""
    if mask is None:
        return states.mean(dim=1)
    weights = (mask != 0).to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class _FakeQuant(nn.Module):
    """Symmetric per-output-channel quantize-dequantize, as the real int quantization does it.

    The rounding passes gradients straight through (w + (q - w).detach()), so the float weights keep
    learning while the loss sees the quantized ones: training settles where quantization hurts least.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / self.qmax
        quantized = torch.clamp(torch.round(weight / scale), -self.qmax - 1, self.qmax) * scale
        return weight + (quantized - weight).detach()


def distill(teacher: nn.Module, student: nn.Module, train: TrainData, val: TrainData | None, cfg: TrainConfig, *,
            masks: dict[str, torch.Tensor] | None = None, device: str = "cpu", static_batch: int | None = None,
            layers: list[tuple[nn.Module, nn.Module]] | None = None,
            on_epoch: Callable[[int, dict], None] = lambda epoch, record: None,
            check: Callable[[], None] = lambda: None, deadline: float | None = None) -> TrainResult:
    """Train `student` in place on alpha * soft-target loss + (1 - alpha) * CE; see _Objective. `layers` pairs
    (student module, teacher module) whose outputs are matched with weight cfg.layer_weight."""
    _validate(cfg)
    if cfg.alpha < 1 and train.labels is None:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"distillation with alpha={cfg.alpha} needs labels (the hard-label "
                                                    "loss gets weight 1 - alpha): add a labels array to the training "
                                                    "dataset, or use alpha=1 to learn from the teacher's outputs alone")
    objective = _Objective(soft=cfg.alpha, hard=1 - cfg.alpha, hidden=cfg.hidden_weight,
                           temperature=cfg.temperature, mask_input=cfg.attention_mask_input,
                           layer=cfg.layer_weight if layers else 0.0)
    _set_training(teacher, False)
    taps = _LayerTaps(layers) if layers and cfg.layer_weight > 0 else None
    try:
        return _train(student, teacher, objective, train, val, cfg, masks, device, static_batch, on_epoch, check,
                      deadline, taps)
    finally:
        if taps is not None:
            taps.remove()


def finetune(model: nn.Module, train: TrainData, val: TrainData | None, cfg: TrainConfig, *,
             masks: dict[str, torch.Tensor] | None = None, device: str = "cpu", static_batch: int | None = None,
             on_epoch: Callable[[int, dict], None] = lambda epoch, record: None,
             check: Callable[[], None] = lambda: None, deadline: float | None = None) -> TrainResult:
    """Train `model` in place on cross-entropy against labels (a classifier: first output [batch, classes])."""
    _validate(cfg)
    if train.labels is None:
        raise JobFailure(ErrorCode.INVALID_DATASET,
                         "fine-tuning needs labels: add a labels array of class ids to the "
                         "training dataset, or distill from the original model with alpha=1, "
                         "which needs no labels")
    objective = _Objective(soft=0.0, hard=1.0, hidden=0.0, temperature=1.0)
    return _train(model, None, objective, train, val, cfg, masks, device, static_batch, on_epoch, check, deadline)


def _validate(cfg: TrainConfig) -> None:
    if not 0 <= cfg.alpha <= 1:
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"alpha must be between 0 and 1, got {cfg.alpha}")
    if cfg.temperature <= 0 or cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise JobFailure(ErrorCode.INVALID_RECIPE,
                         "temperature and lr must be positive, epochs and batch_size at least 1")
    if cfg.lr_schedule not in ("constant", "linear"):
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"lr_schedule must be constant or linear, got {cfg.lr_schedule!r}")
    if cfg.patience is not None and cfg.patience < 1:
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"patience must be at least 1 epoch, got {cfg.patience}")
    if cfg.fake_quant_bits is not None and not 2 <= cfg.fake_quant_bits <= 8:
        raise JobFailure(ErrorCode.INVALID_RECIPE,
                         f"fake_quant_bits must be between 2 and 8, got {cfg.fake_quant_bits}")


def _train(student: nn.Module, teacher: nn.Module | None, objective: _Objective, train: TrainData,
           val: TrainData | None, cfg: TrainConfig, masks: dict[str, torch.Tensor] | None, device: str,
           static_batch: int | None, on_epoch: Callable[[int, dict], None], check: Callable[[], None],
           deadline: float | None, taps: _LayerTaps | None = None) -> TrainResult:
    """The loop shared by distill and finetune.

    Keeps the weights of the best epoch (validation accuracy, else validation loss, else training loss; a
    diverged epoch never counts) and loads them back at the end, on cancellation and at the deadline. When
    the deadline passes mid-epoch the partial epoch is still evaluated, so its training is not wasted.
    """
    train_tensors = _tensors(train, "training")
    val_tensors = _tensors(val, "validation") if val is not None else None
    samples = len(train_tensors[0][0])
    if static_batch and samples < static_batch:
        raise JobFailure(ErrorCode.INVALID_DATASET,
                         f"the model was exported for batches of exactly {static_batch}, but "
                         f"the training data has only {samples} samples")
    size, static = static_batch or cfg.batch_size, bool(static_batch)
    if objective.soft == 0 and objective.hidden == 0:
        teacher = None  # pure hard-label training: no need to run it
    torch.manual_seed(cfg.seed)  # dropout in Hugging Face models
    generator = torch.Generator().manual_seed(cfg.seed)
    for parameter in student.parameters():
        if parameter.is_floating_point():
            parameter.requires_grad_(True)  # exported programs may hold frozen parameters
    fake_quantized = _add_fake_quant(student, cfg.fake_quant_bits) if cfg.fake_quant_bits else []
    dropouts = {} if cfg.dropout else _dropout_off(student)
    try:
        masks = {name: mask.to(device=device, dtype=_weight(student.get_submodule(name)).dtype)
                 for name, mask in (masks or {}).items()}
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        schedule = None
        if cfg.lr_schedule == "linear":
            steps = cfg.epochs * (samples // size if static else math.ceil(samples / size))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
        best_state, best_score, best_epoch = _snapshot(student), -math.inf, 0
        history: list[dict] = []
        stopped = None
        try:
            for epoch in range(1, cfg.epochs + 1):
                started = time.perf_counter()
                order = torch.randperm(samples, generator=generator)
                train_loss, out_of_time = _train_epoch(student, teacher, objective, optimizer, train_tensors, order,
                                                       size, static, masks, device, check, deadline, taps, schedule)
                val_loss, val_accuracy = (None, None) if val_tensors is None else _evaluate(
                    student, teacher, objective, val_tensors, size, static, device, check, taps)
                score = _score(train_loss, val_loss, val_accuracy)
                if score > best_score:
                    best_state, best_score, best_epoch = _snapshot(student), score, epoch
                record = {"epoch": epoch, "train_loss": _finite(train_loss), "val_loss": _finite(val_loss),
                          "val_accuracy": val_accuracy, "lr": optimizer.param_groups[0]["lr"],
                          "seconds": round(time.perf_counter() - started, 3)}
                history.append(record)
                on_epoch(epoch, record)
                if out_of_time:
                    stopped = "time_budget"
                    break
                if cfg.patience is not None and epoch - best_epoch >= cfg.patience:
                    stopped = "early_stopping"
                    break
        except JobCancelled:
            student.load_state_dict(best_state)
            raise
        student.load_state_dict(best_state)
        return TrainResult(history=history, best_epoch=best_epoch, stopped=stopped)
    finally:
        _remove_fake_quant(fake_quantized)
        for layer, probability in dropouts.items():
            layer.p = probability


def _train_epoch(student: nn.Module, teacher: nn.Module | None, objective: _Objective,
                 optimizer: torch.optim.Optimizer, data: Tensors, order: torch.Tensor, size: int, static: bool,
                 masks: dict[str, torch.Tensor], device: str, check: Callable[[], None],
                 deadline: float | None, taps: _LayerTaps | None = None,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> tuple[float, bool]:
    """One pass over the data in `order`; returns (mean training loss, whether it stopped at the deadline).

    Static-batch models cannot take a short last batch: the remainder is dropped (it is reshuffled next
    epoch, so no sample is left out for good).
    """
    samples = len(order)
    end = samples - samples % size if static else samples
    loss_sum, seen = 0.0, 0
    _set_training(student, True)
    try:
        for start in range(0, end, size):
            check()
            index = order[start:start + size]
            inputs, labels = _batch(data, index, device, None if static else objective.mask_input)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = _outputs(teacher(*inputs))
            loss = objective(_outputs(student(*inputs)), teacher_out, labels, inputs, taps.pairs() if taps else ())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            _apply_masks(student, masks)
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
            if deadline is not None and time.monotonic() >= deadline:
                return loss_sum / seen, True
        return loss_sum / seen, False
    finally:
        _set_training(student, False)


def _tensors(data: TrainData, role: str) -> Tensors:
    if not data.inputs:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"the {role} data has no input arrays")
    samples = len(data.inputs[0])
    if samples == 0 or any(len(array) != samples for array in data.inputs):
        raise JobFailure(ErrorCode.INVALID_DATASET,
                         f"the {role} input arrays must hold the same number (> 0) of samples, "
                         f"got {[len(array) for array in data.inputs]}")
    inputs = [torch.from_numpy(np.ascontiguousarray(array)) for array in data.inputs]
    if data.labels is None:
        return inputs, None
    if data.labels.shape != (samples,) or not np.issubdtype(data.labels.dtype, np.integer):
        raise JobFailure(ErrorCode.INVALID_DATASET, f"the {role} labels must be {samples} integer class ids, got "
                                                    f"{data.labels.dtype} of shape {list(data.labels.shape)}")
    if data.labels.min() < 0:
        raise JobFailure(ErrorCode.INVALID_DATASET, f"the {role} labels hold a negative class id")
    return inputs, torch.from_numpy(data.labels.astype(np.int64))


def _batch(tensors: Tensors, index: torch.Tensor, device: str,
           mask_input: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The samples at `index`; with `mask_input` (an encoder's attention mask), cut to the batch's longest text:
    a text dataset is padded to its longest text, and on real prose most batches would otherwise spend most of
    their time on padding (the outputs at real tokens do not change)."""
    inputs, labels = tensors
    picked = [t[index] for t in inputs]
    if mask_input is not None and picked[mask_input].dim() == 2:
        mask = picked[mask_input]
        real = torch.nonzero(mask.any(dim=0)).flatten()
        length = int(real[-1]) + 1 if len(real) else 1
        picked = [t[:, :length] if t.dim() >= 2 and t.shape[:2] == mask.shape else t for t in picked]
    return [t.to(device) for t in picked], None if labels is None else labels[index].to(device)


def _outputs(result: torch.Tensor | tuple | list) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _evaluate(student: nn.Module, teacher: nn.Module | None, objective: _Objective, data: Tensors, size: int,
              static: bool, device: str, check: Callable[[], None],
              taps: _LayerTaps | None = None) -> tuple[float | None, float | None]:
    """(loss, accuracy) over all of `data`; a short last batch is padded for static-batch models."""
    samples = len(data[0][0])
    loss_sum = correct = loss_count = labelled = 0
    with torch.no_grad():
        for start in range(0, samples, size):
            check()
            index = torch.arange(start, min(start + size, samples))
            count = len(index)
            if static and count < size:
                index = torch.cat([index, index[:1].repeat(size - count)])
            inputs, labels = _batch(data, index, device, None if static else objective.mask_input)
            labels = None if labels is None else labels[:count]
            student_out = [o[:count] for o in _outputs(student(*inputs))]
            teacher_out = None if teacher is None else [o[:count] for o in _outputs(teacher(*inputs))]
            loss = objective(student_out, teacher_out, labels, inputs, taps.pairs() if taps else ())
            if loss is not None:
                loss_sum += float(loss) * count
                loss_count += count
            if labels is not None and student_out[0].dim() == 2:
                correct += int((student_out[0].argmax(dim=1) == labels).sum())
                labelled += count
    return (loss_sum / loss_count if loss_count else None), (correct / labelled if labelled else None)


def _score(train_loss: float, val_loss: float | None, val_accuracy: float | None) -> float:
    """Higher is better; a non-finite loss (diverged) is never kept."""
    loss = train_loss if val_loss is None else val_loss
    if not math.isfinite(loss):
        return -math.inf
    return val_accuracy if val_accuracy is not None else -loss


def _finite(value: float | None) -> float | None:
    """JSON (and PostgreSQL jsonb) has no NaN or infinity: a diverged loss is recorded as None."""
    return value if value is not None and math.isfinite(value) else None


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}


def _set_training(module: nn.Module | None, training: bool) -> None:
    """torch.export modules (they have a .graph) refuse train()/eval(): their graph was fixed at export."""
    if module is not None and not hasattr(module, "graph"):
        module.train(training)


def _weight(layer: nn.Module) -> torch.Tensor:
    """The trainable weight, also while a fake-quant parametrization computes `layer.weight` from it."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def _apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            _weight(module.get_submodule(name)).mul_(mask)


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _dropout_off(module: nn.Module) -> dict[nn.Module, float]:
    """Sets every dropout probability to 0 and returns the old ones. Setting `p` rather than switching the layers
    to eval mode also reaches attention dropout, which Hugging Face models read from `dropout.p` themselves."""
    layers = {layer: layer.p for layer in module.modules() if isinstance(layer, DROPOUTS)}
    for layer in layers:
        layer.p = 0.0
    return layers


def _add_fake_quant(module: nn.Module, bits: int) -> list[nn.Linear]:
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _FakeQuant(bits))
    return layers


def _remove_fake_quant(layers: list[nn.Linear]) -> None:
    """Back to plain float weights (the latent ones), which the later quantize step quantizes for real."""
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
