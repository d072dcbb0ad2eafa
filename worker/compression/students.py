"""Students to distill into: a smaller model derived from the teacher and initialised from its weights.

A student that starts from the teacher's own layers or channels (never from scratch) begins close to it, so
distillation (worker.compression.train) has less to win back and trains faster than a fresh model would.
"""

import copy

import numpy as np
import torch
from torch import nn

from app.core.errors import ErrorCode
from worker.compression.structured import ffn_pairs, prune_graph_channels, prune_transformer_ffn
from worker.errors import JobFailure

IMPORTANCE_SAMPLES = 256  # train samples whose activations rank the feed-forward neurons
IMPORTANCE_BATCH = 32
LAYER_CHOICE_SAMPLES = 64  # train samples on which each layer's removal is measured


def shrink_student(teacher: nn.Module, depth: float, width: float, hf=None, samples: list[np.ndarray] | None = None,
                   mask_input: int | None = None) -> tuple[nn.Module, dict]:
    """A smaller model to distill into, initialised from the teacher (never from scratch: it trains faster).

    Hugging Face transformers (`hf`, a worker.formats.hf.HFModel): fewer layers, the teacher's layers whose removal
    changes its output least on `samples` (removed one at a time, greedily; evenly spaced as DistilBERT did when
    there are no samples), and at width < 1 fewer feed-forward
    neurons in every layer, keeping those whose activations on `samples` (the train inputs; `mask_input`
    marks real tokens) times outgoing weight norm are largest. Attention heads are kept: transformers 5 derives
    the head size from hidden_size / num_attention_heads and has no prune_heads, so a model with fewer heads
    would not load back from its config. torch.export graphs: narrower hidden layers, keeping the channels
    with the largest weight norms (structured pruning). The teacher is not changed. Returns (student module
    with the teacher's inputs and outputs, details).
    """
    if not (0 < depth <= 1 and 0 < width <= 1):
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"depth and width are fractions of the teacher in (0, 1], got depth "
                                                   f"{depth}, width {width}")
    if hf is not None:
        student, details = _fewer_layers(hf, depth, samples, mask_input)
        if width < 1:
            details["feed_forward"] = _narrower_ffn(student, width, samples, mask_input)
        return student, details
    if not hasattr(teacher, "graph"):
        raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, "a student can be derived from Hugging Face transformers and "
                                                      "torch.export models only")
    if depth != 1:
        raise JobFailure(ErrorCode.INVALID_RECIPE,
                         "removing layers from a torch.export model is not supported (its graph "
                         "fixes the layer sequence): use depth 1.0 and width < 1 (narrower "
                         "layers)")
    student = copy.deepcopy(teacher)
    before = _widths(student)
    if width < 1:
        prune_graph_channels(student, sparsity=1 - width, scope="layer", exclude=[])
    after = _widths(student)
    return student, {"width": width,
                     "channels": {name: {"teacher": before[name], "student": after[name]} for name in before},
                     "init": "teacher channels with the largest weight norms"}


def _widths(module: nn.Module) -> dict[str, int]:
    return {name: layer.weight.shape[0] for name, layer in module.named_modules()
            if isinstance(layer, (nn.Linear, nn.Conv2d))}


def _narrower_ffn(student: nn.Module, width: float, samples: list[np.ndarray] | None,
                  mask_input: int | None) -> dict:
    """Keep `width` of every block's feed-forward neurons (config.intermediate_size follows), ranked Wanda-style:
    mean |activation| over real tokens times the norm of the neuron's outgoing weights; by weight norms alone
    when there are no samples."""
    model = student.model
    scores = None if samples is None else _neuron_scores(student, model, samples, mask_input)
    details = prune_transformer_ffn(model, sparsity=1 - width, scope="layer", exclude=[], neuron_scores=scores)
    details["ranked_by"] = "activations on the train samples" if scores is not None else "weight norms"
    return details


def _neuron_scores(student: nn.Module, model: nn.Module, samples: list[np.ndarray],
                   mask_input: int | None) -> list[torch.Tensor]:
    consumers = [consumer for _, consumer in ffn_pairs(model)]
    sums = [torch.zeros(c.in_features) for c in consumers]
    batch: dict[str, torch.Tensor | None] = {"mask": None}

    def recorder(index: int):
        def record(layer: nn.Module, args: tuple) -> None:
            activations = args[0].detach().float().abs()
            if batch["mask"] is not None:
                activations = activations * batch["mask"].unsqueeze(-1)
            sums[index] += activations.reshape(-1, activations.shape[-1]).sum(dim=0).cpu()
        return record

    hooks = [c.register_forward_pre_hook(recorder(i)) for i, c in enumerate(consumers)]
    device = next(model.parameters()).device
    count = min(IMPORTANCE_SAMPLES, len(samples[0]))
    try:
        with torch.no_grad():
            for start in range(0, count, IMPORTANCE_BATCH):
                inputs = [torch.from_numpy(np.ascontiguousarray(a[start:min(start + IMPORTANCE_BATCH, count)]))
                          .to(device) for a in samples]
                batch["mask"] = None if mask_input is None else (inputs[mask_input] != 0).float()
                student(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [s * c.weight.detach().float().norm(dim=0).cpu() for s, c in zip(sums, consumers)]


def matching_layers(student: nn.Module, teacher: nn.Module,
                    chosen: list[int] | None = None) -> list[tuple[nn.Module, nn.Module]]:
    """(student layer, teacher layer) pairs of two transformers models with a single stack of layers each.

    Stacks of the same length (the model recovering after pruning, or a narrower student): layer i with layer i.
    A shallower student made of the teacher's layers `chosen` (shrink_student): its layer j with the teacher's
    layer just before the next kept one, and its last layer with the teacher's last, so that each student layer
    learns to stand in for the teacher's layers removed after it. [] when the layers cannot be paired."""
    stacks = [_layer_stack(model) for model in (student, teacher)]
    if any(stack is None for stack in stacks):
        return []
    if len(stacks[0]) == len(stacks[1]):
        return list(zip(*stacks))
    if chosen is None or len(chosen) != len(stacks[0]) or max(chosen) >= len(stacks[1]):
        return []
    targets = [following - 1 for following in chosen[1:]] + [len(stacks[1]) - 1]
    return [(stacks[0][j], stacks[1][k]) for j, k in enumerate(targets)]


def _layer_stack(model: nn.Module) -> nn.ModuleList | None:
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    return lists[0] if len(lists) == 1 else None


def _fewer_layers(hf, depth: float, samples: list[np.ndarray] | None = None,
                  mask_input: int | None = None) -> tuple[nn.Module, dict]:
    """A transformers model of the same class with `depth` of the layers (all at depth 1); every weight copied
    from the teacher."""
    from worker.formats.hf import TextModelAdapter

    teacher = hf.model
    config = copy.deepcopy(teacher.config)
    layers = config.num_hidden_layers
    count = max(1, round(depth * layers))
    stacks = [name for name, m in teacher.named_modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
    if len(stacks) != 1:
        raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, f"cannot find the single list of {layers} layers in "
                                                      f"{type(teacher).__name__} to take the student's layers from")
    if samples is not None and count < layers:
        chosen, removals = _layers_by_removal(hf, stacks[0], count, samples, mask_input)
        how = {"by": "removal measured on the train samples", "removals": removals}
    else:
        chosen, how = [i * layers // count for i in range(count)], {"by": "even spacing"}
    config.num_hidden_layers = count
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in chosen]
    student = type(teacher)(config)
    prefix = stacks[0] + "."
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        name = key
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            name = f"{prefix}{chosen[int(index)]}.{rest}"
        state[key] = source[name]
    student.load_state_dict(state)
    student = student.float().eval()
    module = TextModelAdapter(student, hf.input_names, hf.output_names, hf.module.extra).eval()
    return module, {"layers": {"teacher": layers, "student": count, "chosen": chosen, **how},
                    "init": f"teacher layers {chosen}"}


def _layers_by_removal(hf, stack: str, count: int, samples: list[np.ndarray],
                       mask_input: int | None) -> tuple[list[int], list[dict]]:
    """The `count` layers to keep: layers are removed one at a time, each time the one whose removal leaves the
    model's first output closest to the teacher's on a few samples (cosine of the mean over real tokens, what an
    encoder is distilled on). Measured because position matters: on all-MiniLM-L6-v2 four layers evenly spaced
    from the bottom (0, 1, 3, 4) start at embedding cosine 0.41 on real prose, while 0, 2, 4, 5 start at 0.84."""
    from worker.formats.hf import TextModelAdapter

    probe = copy.deepcopy(hf.model).eval()
    parent_name, _, attribute = stack.rpartition(".")
    parent = probe.get_submodule(parent_name) if parent_name else probe
    all_layers = list(getattr(parent, attribute))
    layer_types = getattr(probe.config, "layer_types", None)
    size = min(LAYER_CHOICE_SAMPLES, len(samples[0]))
    inputs = [torch.from_numpy(np.ascontiguousarray(a[:size])) for a in samples]
    names = list(hf.input_names)

    def embedding(kept: list[int]) -> torch.Tensor:
        setattr(parent, attribute, nn.ModuleList(all_layers[i] for i in kept))
        probe.config.num_hidden_layers = len(kept)
        if isinstance(layer_types, list):
            probe.config.layer_types = [layer_types[i] for i in kept]
        with torch.no_grad():
            out = TextModelAdapter(probe, names, hf.output_names, hf.module.extra)(*inputs)[0].float()
        if out.dim() != 3:
            return out.reshape(out.shape[0], -1)
        weights = torch.ones(out.shape[:2]) if mask_input is None else (inputs[mask_input] != 0).float()
        return (out * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)

    reference = embedding(list(range(len(all_layers))))
    kept, removals = list(range(len(all_layers))), []
    while len(kept) > count:
        scores = {layer: float(torch.nn.functional.cosine_similarity(
            embedding([k for k in kept if k != layer]), reference, dim=-1).mean()) for layer in kept}
        layer = max(scores, key=scores.get)
        kept.remove(layer)
        removals.append({"removed": layer, "cosine": round(scores[layer], 4)})
    return kept, removals
