"""Structured pruning: remove whole output channels / neurons and the inputs that consumed them.

Two ways to find what can be removed together:
- torch.export graphs (.pt2 uploads): follow each Linear/Conv2d output through element-wise ops, pooling,
  batch norm and flatten to the layers that consume it; a layer is pruned only when every path ends in a
  Linear/Conv2d input (a residual add or a reshape stops it, since removing channels there would break shapes).
- Hugging Face transformers: feed-forward neurons (BERT-style intermediate/output, LLaMA-style
  gate/up/down projections), the same number in every layer so the config stays valid and `save_pretrained`
  output loads back.
Channels are ranked by the L2 norm of their weights.
"""

import math

import torch
from torch import nn
from torch.fx import GraphModule, Node

from app.core.errors import ErrorCode
from worker.compression.quantize import compile_patterns
from worker.errors import JobFailure

aten = torch.ops.aten
PASS_THROUGH = {aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default,
                aten.tanh.default, aten.hardtanh.default, aten.leaky_relu.default, aten.dropout.default,
                aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
                aten.clone.default, aten.contiguous.default, aten.elu.default, aten.mish.default,
                aten.hardswish.default}
BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}
FLATTEN = {aten.flatten.using_ints}


class _Plan:
    def __init__(self, producer: str):
        self.producer = producer
        self.consumers: list[tuple[str, int]] = []  # (module name, input block size: 1, or H*W after flatten)
        self.batch_norms: list[Node] = []


def _module(gm: nn.Module, node: Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _plan_for(gm: GraphModule, node: Node) -> _Plan | None:
    plan = _Plan(node.target)
    frontier = [(node, 1)]
    while frontier:
        current, block = frontier.pop()
        for user in current.users:
            module = _module(gm, user)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and user.args[0] is current:
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    return None
                plan.consumers.append((user.target, block))
            elif user.op == "call_function" and user.target in PASS_THROUGH and user.args[0] is current:
                frontier.append((user, block))
            elif user.op == "call_function" and user.target in BATCH_NORMS and user.args[0] is current:
                plan.batch_norms.append(user)
                if user.target == aten.batch_norm.default:
                    frontier.append((user, block))
                    continue
                getitems = list(user.users)  # the legit variant returns (output, mean, invstd)
                if not all(len(g.args) > 1 and g.args[1] == 0 for g in getitems):
                    return None
                frontier.extend((g, block) for g in getitems)
            elif user.op == "call_function" and user.target in FLATTEN and user.args[0] is current:
                shape = current.meta.get("val").shape if current.meta.get("val") is not None else None
                if shape is None or len(shape) != 4 or tuple(user.args[1:]) not in ((1,), (1, -1), (1, 3)):
                    return None
                frontier.append((user, block * int(shape[2]) * int(shape[3])))
            else:
                return None
    return plan if plan.consumers else None


def _keep_count(channels: int, sparsity: float) -> int:
    return max(1, channels - int(math.floor(sparsity * channels)))


def _slice_attr(gm: GraphModule, node: Node, keep: torch.Tensor) -> None:
    if node is None or getattr(node, "op", None) != "get_attr":
        return
    owner_path, _, name = node.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = getattr(owner, name)
    sliced = value.detach()[keep].clone()
    if isinstance(value, nn.Parameter):
        setattr(owner, name, nn.Parameter(sliced, requires_grad=value.requires_grad))
    else:
        owner.register_buffer(name, sliced) if name in dict(owner.named_buffers(recurse=False)) \
            else setattr(owner, name, sliced)


def _apply(gm: GraphModule, plan: _Plan, keep: torch.Tensor) -> None:
    producer = gm.get_submodule(plan.producer)
    with torch.no_grad():
        producer.weight = nn.Parameter(producer.weight[keep].clone())
        if producer.bias is not None:
            producer.bias = nn.Parameter(producer.bias[keep].clone())
    if isinstance(producer, nn.Linear):
        producer.out_features = len(keep)
    else:
        producer.out_channels = len(keep)
    for bn in plan.batch_norms:
        for arg in bn.args[1:5]:
            _slice_attr(gm, arg, keep)
    for name, block in plan.consumers:
        consumer = gm.get_submodule(name)
        columns = (keep.unsqueeze(1) * block + torch.arange(block)).flatten() if block > 1 else keep
        with torch.no_grad():
            consumer.weight = nn.Parameter(consumer.weight[:, columns].clone())
        if isinstance(consumer, nn.Linear):
            consumer.in_features = len(columns)
        else:
            consumer.in_channels = len(columns)


def _channel_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().reshape(weight.shape[0], -1).norm(dim=1)


def prune_graph_channels(gm: GraphModule, *, sparsity: float, scope: str, exclude: list[str]) -> dict:
    patterns = compile_patterns(exclude)
    plans = []
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not any(rx.search(node.target) for rx in patterns):
            plan = _plan_for(gm, node)
            if plan is not None:
                plans.append(plan)
    if not plans:
        raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, "structured pruning found no layer whose channels can be removed "
                                                      "safely (each output must feed only Linear/Conv2d layers)")
    scores = {p.producer: _channel_scores(gm.get_submodule(p.producer).weight) for p in plans}
    keeps = _choose(scores, sparsity, scope)
    removed = {}
    for plan in plans:
        keep = keeps[plan.producer]
        removed[plan.producer] = int(scores[plan.producer].numel() - len(keep))
        _apply(gm, plan, keep)
    gm.recompile()
    return {"method": "structured", "pattern": "channel", "scope": scope, "sparsity_target": sparsity,
            "channels_removed": removed}


def _choose(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Indices to keep per layer: the same fraction per layer, or one global cut on normalised scores."""
    if scope == "global":
        normalised = {n: s / s.mean().clamp(min=1e-12) for n, s in scores.items()}
        everything = torch.cat(list(normalised.values()))
        k = int(sparsity * everything.numel())
        cut = everything.kthvalue(k).values if k else torch.tensor(-1.0)
        keeps = {}
        for name, s in normalised.items():
            keep = (s > cut).nonzero().flatten()
            keeps[name] = keep if len(keep) else s.topk(1).indices
        return {n: k.sort().values for n, k in keeps.items()}
    return {n: s.topk(_keep_count(len(s), sparsity)).indices.sort().values for n, s in scores.items()}


def ffn_pairs(model: nn.Module) -> list[tuple[list[nn.Linear], nn.Linear]]:
    """(layers producing the hidden neurons, layer consuming them) for each transformer block."""
    pairs = []
    for _, module in model.named_modules():
        intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
        if isinstance(getattr(intermediate, "dense", None), nn.Linear) and \
                isinstance(getattr(output, "dense", None), nn.Linear) and \
                output.dense.in_features == intermediate.dense.out_features:
            pairs.append(([intermediate.dense], output.dense))
        gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if all(isinstance(m, nn.Linear) for m in (gate, up, down)):
            pairs.append(([gate, up], down))
    return pairs


def prune_transformer_ffn(model: nn.Module, *, sparsity: float, scope: str, exclude: list[str],
                          neuron_scores: list[torch.Tensor] | None = None) -> dict:
    """Remove the same number of feed-forward neurons in every block (config.intermediate_size follows).

    Neurons are ranked by `neuron_scores` (one per block, in ffn_pairs order) when given, else by weight norms.
    `scope` and `exclude` are not used: every block must keep the same width for the config to stay valid."""
    pairs = ffn_pairs(model)
    if not pairs:
        raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, "structured pruning of this transformer is not supported: no "
                                                      "BERT-style or LLaMA-style feed-forward blocks found")
    width = pairs[0][1].in_features
    keep_count = _keep_count(width, sparsity)
    for index, (producers, consumer) in enumerate(pairs):
        score = neuron_scores[index] if neuron_scores is not None else \
            sum(_channel_scores(p.weight) for p in producers) + consumer.weight.detach().float().norm(dim=0)
        keep = score.topk(keep_count).indices.sort().values
        with torch.no_grad():
            for p in producers:
                p.weight = nn.Parameter(p.weight[keep].clone())
                if p.bias is not None:
                    p.bias = nn.Parameter(p.bias[keep].clone())
                p.out_features = keep_count
            consumer.weight = nn.Parameter(consumer.weight[:, keep].clone())
            consumer.in_features = keep_count
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = keep_count
    return {"method": "structured", "pattern": "channel", "unit": "feed-forward neurons",
            "blocks": len(pairs), "neurons_per_block": {"before": width, "after": keep_count}}
