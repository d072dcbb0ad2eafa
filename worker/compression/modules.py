"""Module-level building blocks shared by the compression methods.

`lift_layers` turns the functional `aten.linear` / `aten.conv2d` calls of a torch.export graph back into
`nn.Linear` / `nn.Conv2d` submodules, so that every method (pruning, quantization, distillation) works on
ordinary modules whatever the model came from. The quantized linear modules below keep their weights as
int8 (or packed int4) buffers, so an exported file really shrinks, and they stay exportable.
"""

import torch
from torch import nn
from torch.fx import GraphModule

LINEAR_OPS = {torch.ops.aten.linear.default}
CONV_OPS = {torch.ops.aten.conv2d.default}


def _attr_path(node) -> str | None:
    return node.target if node is not None and getattr(node, "op", None) == "get_attr" else None


def _get(module: nn.Module, path: str) -> torch.Tensor:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def lift_layers(gm: GraphModule) -> GraphModule:
    """Replace functional linear/conv2d calls on constant weights with nn.Linear / nn.Conv2d submodules.

    Each new submodule is named after its weight's path without the last segment (`fc1.weight` -> `fc1`),
    so layer names in reports and `exclude` patterns read like the original model's.
    """
    lifted: dict[str, str] = {}  # temporary name -> wanted name
    for index, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.target not in LINEAR_OPS | CONV_OPS:
            continue
        weight_path = _attr_path(node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias_path = _attr_path(bias_arg)
        if weight_path is None or (bias_arg is not None and bias_path is None):
            continue
        weight = _get(gm, weight_path)
        bias = _get(gm, bias_path) if bias_path else None
        if node.target in LINEAR_OPS:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):])
            if isinstance(padding, str):
                continue
            layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
        layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        temporary = f"_lifted_{index}"
        gm.add_submodule(temporary, layer)
        lifted[temporary] = weight_path.rsplit(".", 1)[0] if "." in weight_path else f"{weight_path}_layer"
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_module(temporary, (node.args[0],))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the containers that only held the weights
    taken = {name for name, _ in gm.named_modules()}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in lifted:
            path = lifted[node.target]
            wanted = path if _can_register(gm, path, taken) else path.replace(".", "_")
            while wanted in taken:
                wanted += "_"
            layer = gm.get_submodule(node.target)
            gm.add_submodule(wanted, layer)
            gm.delete_submodule(node.target)
            taken.add(wanted)
            node.target = wanted
    gm.recompile()
    return gm


def _can_register(gm: nn.Module, path: str, taken: set[str]) -> bool:
    """A dotted path is usable when it is free and each parent on it is free or a plain container."""
    if path in taken:
        return False
    parts = path.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if parent in taken and type(gm.get_submodule(parent)) is not nn.Module:
            return False
    return True


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None, per_channel: bool = True):
    """Symmetric integer quantization of a 2-D weight: per output channel, per group, or per tensor."""
    qmax = 2 ** (bits - 1) - 1
    out_features, in_features = weight.shape
    if group_size:
        groups = weight.reshape(out_features, in_features // group_size, group_size)
        scale = groups.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / qmax
        q = torch.clamp(torch.round(groups / scale), -qmax - 1, qmax).reshape(out_features, in_features)
        return q.to(torch.int8), scale.squeeze(2)
    if per_channel:
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
    else:
        scale = weight.abs().amax().clamp(min=1e-12).reshape(1, 1) / qmax
    return torch.clamp(torch.round(weight / scale), -qmax - 1, qmax).to(torch.int8), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte (low nibble first)."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


class WeightOnlyLinear(nn.Module):
    """int8 or int4 weights with fp32 scales (per channel or per group), dequantized at run time.

    Smaller on disk and in memory; on CPU it is not faster than fp32 (the report says so).
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None):
        super().__init__()
        weight = linear.weight.detach().float()
        in_features = weight.shape[1]
        if group_size and in_features % group_size:
            group_size = None  # a layer whose width the group size does not divide falls back to per channel
        self.bits, self.group_size = bits, group_size or 0
        self.in_features, self.out_features = in_features, weight.shape[0]
        q, scale = quantize_weight(weight, bits, group_size)
        if bits == 4:
            if in_features % 2:
                q = torch.nn.functional.pad(q, (0, 1))
            q = pack_int4(q)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float())

    def dequantized_weight(self) -> torch.Tensor:
        q = unpack_int4(self.qweight)[:, : self.in_features] if self.bits == 4 else self.qweight
        q = q.float()
        if self.group_size:
            q = q.reshape(self.out_features, -1, self.group_size) * self.scale.unsqueeze(2)
            return q.reshape(self.out_features, self.in_features)
        return q * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))


class DynamicInt8Linear(nn.Module):
    """int8 weights; activations quantized per row at run time and multiplied in int8 (torch._int_mm)."""

    def __init__(self, linear: nn.Linear, per_channel: bool):
        super().__init__()
        q, scale = quantize_weight(linear.weight.detach().float(), 8, None, per_channel)
        self.register_buffer("qweight_t", q.t().contiguous())
        self.register_buffer("scale", scale.reshape(1, -1).float() if per_channel else scale.reshape(1, 1).float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        x_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        x_q = torch.clamp(torch.round(rows / x_scale), -127, 127).to(torch.int8)
        out = torch._int_mm(x_q, self.qweight_t).float() * x_scale * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], out.shape[-1])


def replace_linears(model: nn.Module, make, skip) -> list[str]:
    """Swap every nn.Linear whose name `skip` does not reject for `make(linear)`; returns the names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not skip(name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, make(module))
            replaced.append(name)
    return replaced


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero params), counting quantized weights by their logical size."""
    total = nonzero = 0
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if isinstance(module, (WeightOnlyLinear, DynamicInt8Linear)) and name == "scale":
                continue
            if isinstance(module, WeightOnlyLinear) and name == "qweight":
                w = module.dequantized_weight()
                total += w.numel()
                nonzero += int(torch.count_nonzero(w))
                continue
            if name in ("running_mean", "running_var", "num_batches_tracked"):
                continue
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero
