"""Students to distill into: a smaller model derived from the teacher and initialised from its weights.

A student that starts from the teacher's own layers or channels (never from scratch) begins close to it, so
distillation (worker.compression.train) has less to win back and trains faster than a fresh model would.
"""

import copy

from torch import nn

from app.core.errors import ErrorCode
from worker.compression.structured import prune_graph_channels
from worker.errors import JobFailure


def shrink_student(teacher: nn.Module, depth: float, width: float, hf=None) -> tuple[nn.Module, dict]:
    """A smaller model to distill into, initialised from the teacher (never from scratch: it trains faster).

    Hugging Face transformers (`hf`, a worker.formats.hf.HFModel): fewer layers, taken evenly spaced from
    the teacher as DistilBERT did (every other layer at depth 0.5). torch.export graphs: narrower hidden
    layers, keeping the channels with the largest weight norms (structured pruning). The teacher is not
    changed. Returns (student module with the teacher's inputs and outputs, details).
    """
    if not (0 < depth <= 1 and 0 < width <= 1):
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"depth and width are fractions of the teacher in (0, 1], got depth "
                                                   f"{depth}, width {width}")
    if hf is not None:
        if width != 1:
            raise JobFailure(ErrorCode.INVALID_RECIPE,
                             "narrower transformers are not supported: use width 1.0 and depth "
                             "< 1 (fewer layers) for Hugging Face models")
        return _fewer_layers(hf, depth)
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


def _fewer_layers(hf, depth: float) -> tuple[nn.Module, dict]:
    """A transformers model of the same class with fewer layers; every weight copied from the teacher."""
    from worker.formats.hf import TextModelAdapter

    teacher = hf.model
    config = copy.deepcopy(teacher.config)
    layers = config.num_hidden_layers
    count = max(1, round(depth * layers))
    chosen = [i * layers // count for i in range(count)]
    stacks = [name for name, m in teacher.named_modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
    if len(stacks) != 1:
        raise JobFailure(ErrorCode.UNSUPPORTED_MODEL, f"cannot find the single list of {layers} layers in "
                                                      f"{type(teacher).__name__} to take the student's layers from")
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
    return module, {"layers": {"teacher": layers, "student": count}, "init": f"teacher layers {chosen}"}
