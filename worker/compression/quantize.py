"""Quantization, for both targets.

onnxruntime target (ONNX in, ONNX out, ONNX Runtime's own tools):
  dynamic int8 (per-channel weights by default: far more faithful than per-tensor at the same size),
  static int8 (activations calibrated on a dataset, QDQ format), weight-only int8/int4 (MatMulNBits with
  `group_size` blocks; int4 rounded to nearest, by HQQ, or by GPTQ on calibration data), fp16 cast.
pytorch target (torch module in and out; saved as .pt2): dynamic int8 and weight-only int8/int4 linear
layers that keep int8/packed-int4 buffers, fp16/bf16 casts.
`exclude` regexes keep matching layers in full precision on both targets.
`smoothing` (onnxruntime int8, dynamic or static) first moves activation outliers into the weights
(worker.compression.smoothing), with alpha given or chosen on the calibration data.
"""

import logging
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from app.core.errors import ErrorCode
from worker.compression import gptq
from worker.compression import smoothing as smoothing_pass
from worker.compression.modules import DynamicInt8Linear, WeightOnlyLinear, replace_linears
from worker.compression.normalize import drop_initializer_shapes
from worker.errors import JobFailure, without_server_paths

log = logging.getLogger(__name__)

# Static quantization touches only weight-bearing ops (quantizing every Add/Mul in QDQ costs fidelity); dynamic
# quantization uses ONNX Runtime's full list, which includes Gather so embedding tables shrink too.
STATIC_OPS = ["MatMul", "Gemm", "Conv", "Gather", "Attention", "LSTM", "GRU"]
# Conv nets: the ops between convolutions are quantized too, so that ONNX Runtime runs Conv chains as QLinearConv
# (Relu/Clip fused, residual Add as QLinearAdd, pooling on uint8) without a float round trip per layer.
CONV_STATIC_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "Add", "MaxPool", "AveragePool",
                   "GlobalAveragePool", "Concat"]
# Layers with fewer weights than this stay in float in conv nets (measured gain below the quantize/dequantize cost).
TINY_LAYER_WEIGHTS = 1024
CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
# Tried by smoothing "auto" (all-MiniLM-L6-v2 dynamic int8 picked 0.7; below 0.6 it only got worse).
SMOOTHING_ALPHAS = (0.6, 0.7, 0.8, 0.9, 1.0)
# GPTQ with a zero point per block: all-MiniLM-L6-v2 int4 g32 embedding cosine 0.99772, symmetric 0.99670, for
# 0.3% more bytes.
GPTQ_SYMMETRIC = False
# Dynamic int8 with some products in float (onnx_dynamic_int8_partial): the weight MatMuls are scanned in this many
# runs, and at most this many runs are left in float (a quarter: past that, the speed int8 buys is mostly gone).
PARTIAL_GROUPS = 12
PARTIAL_MOST_GROUPS = 3
CASTS = ("fp16", "bf16")  # dtypes reached by casting the weights, not by quantizing them


def compile_patterns(patterns: list[str]) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in patterns]
    except re.error as exc:
        raise JobFailure(ErrorCode.INVALID_RECIPE, f"exclude: invalid regular expression: {exc}") from None


def excluded_nodes(model_path: Path, patterns: list[str]) -> list[str]:
    """ONNX node names matching any `exclude` regex, by node name or by the name of one of its inputs."""
    compiled = compile_patterns(patterns)
    if not compiled:
        return []
    model = onnx.load(str(model_path), load_external_data=False)
    return [node.name for node in model.graph.node
            if any(rx.search(n) for rx in compiled for n in [node.name, *node.input] if n)]


@contextmanager
def _prepared(source: Path, destination: Path) -> Iterator[Path]:
    """ONNX Runtime's pre-processing (shape inference, graph optimisation) before quantizing, on the graph without
    weight shapes; the graph as it is when that fails, since it only helps. Intermediate files are removed."""
    cleaned = destination.with_suffix(".clean.onnx")
    model = onnx.load(str(source))
    drop_initializer_shapes(model)
    onnx.save(model, str(cleaned))
    prepared = destination.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(cleaned), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:
        log.info("quantization pre-processing skipped: %s", exc)
        prepared = cleaned
    try:
        yield prepared
    finally:
        prepared.unlink(missing_ok=True)
        cleaned.unlink(missing_ok=True)


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels can saturate on this CPU: x86 without VNNI multiplies with
    VPMADDUBSW, whose int16 sums overflow. ONNX Runtime's advice is 7-bit weights (`reduce_range`); on this
    2-core AMD EPYC (AVX2, no VNNI) a 256-512-512-16 MLP's int8 output cosine went 0.980 -> 0.9997 with it,
    at the same speed (MiniLM: 0.99172 either way)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _reduce_range() -> dict:
    saturates = u8s8_saturates()
    return {"reduce_range": saturates, "reduce_range_reason": "7-bit weights: this CPU has no VNNI, and its "
            "uint8 x int8 kernel can saturate" if saturates else "8-bit weights: this CPU has VNNI"}


def _failure(what: str, exc: Exception) -> JobFailure:
    return JobFailure(ErrorCode.QUANTIZATION_FAILED,
                      f"{what} failed: {exc.__class__.__name__}: {without_server_paths(str(exc))[:300]}")


def onnx_dynamic_int8(source: Path, destination: Path, *, granularity: str, exclude: list[str]) -> dict:
    with _prepared(source, destination) as prepared:
        excluded = excluded_nodes(prepared, exclude)
        weights = _dynamic_int8(prepared, destination, granularity, excluded)
    return {"method": "dynamic", "dtype": "int8", "granularity": granularity, "excluded_nodes": excluded,
            **weights, "tool": "onnxruntime.quantization.quantize_dynamic"}


def _dynamic_int8(prepared: Path, destination: Path, granularity: str, excluded: list[str]) -> dict:
    weights = _reduce_range()
    # ONNX Runtime rewrites Gemm as MatMul + Add before quantizing, naming the MatMul "<gemm name>_MatMul".
    try:
        quantize_dynamic(str(prepared), str(destination), weight_type=QuantType.QInt8,
                         per_channel=granularity == "per_channel", reduce_range=weights["reduce_range"],
                         nodes_to_exclude=excluded + [f"{n}_MatMul" for n in excluded],
                         extra_options={"MatMulConstBOnly": True})
    except Exception as exc:
        raise _failure("ONNX Runtime dynamic quantization", exc) from None
    return weights


def onnx_dynamic_int8_partial(source: Path, destination: Path, *, granularity: str, exclude: list[str],
                              score: Callable[[Path, bool], float], line: float, groups: int = PARTIAL_GROUPS,
                              most: int = PARTIAL_MOST_GROUPS) -> dict:
    """Dynamic int8 with the weight products whose int8 costs the output most left in float. The weight MatMuls,
    in graph order, are cut into `groups` runs; each run is left in float in turn and the model scored
    (`score(path, False)`: output cosine on a few batches); then the runs that helped most are left in float one
    more at a time (`score(path, True)`: on every batch) until the cosine reaches `line`, `most` runs at most.
    Why: int8 error made early in a transformer travels through every later layer, so which products matter is a
    property of the whole graph, not of one layer's error (on all-MiniLM-L6-v2 the first layer's feed-forward
    output is the one; its own product error is below the median)."""
    with _prepared(source, destination) as prepared:
        excluded = excluded_nodes(prepared, exclude)
        candidates = [n for n in weight_matmuls(prepared) if n not in excluded]
        size = max(1, -(-len(candidates) // groups))
        runs = [candidates[i:i + size] for i in range(0, len(candidates), size)]
        trial = destination.with_suffix(".trial.onnx")
        scanned = []
        try:
            for run in runs:
                _dynamic_int8(prepared, trial, granularity, excluded + run)
                scanned.append({"first": run[0], "last": run[-1], "nodes": len(run), "cosine": score(trial, False)})
        finally:
            trial.unlink(missing_ok=True)
        in_float: list[str] = []
        cosine = None
        for index in sorted(range(len(runs)), key=lambda i: -scanned[i]["cosine"])[:most]:
            in_float += runs[index]
            weights = _dynamic_int8(prepared, destination, granularity, excluded + in_float)
            cosine = score(destination, True)
            if cosine >= line:
                break
    return {"method": "dynamic", "dtype": "int8", "granularity": granularity, "excluded_nodes": excluded,
            "kept_in_float": in_float, "weight_matmuls": len(candidates), "cosine": cosine,
            "sensitivity": sorted(scanned, key=lambda r: -r["cosine"]), **weights,
            "tool": "onnxruntime.quantization.quantize_dynamic"}


class _Batches(CalibrationDataReader):
    def __init__(self, names: list[str], batches: Iterable[list[np.ndarray]]):
        self._items = iter([dict(zip(names, batch)) for batch in batches])

    def get_next(self):
        return next(self._items, None)


def activation_matmuls(model_path: Path) -> list[str]:
    """MatMuls of two activations (attention's Q.K^T and weights.V): no weight to shrink, and static int8 on
    them costs fidelity and time. Dynamic int8 leaves them in float too."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in constants]


def weight_matmuls(model_path: Path) -> list[str]:
    """MatMuls and Gemms with a constant weight, in graph order: the products dynamic int8 quantizes."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in constants]


def fuse_static_matmuls(model: onnx.ModelProto) -> int:
    """DequantizeLinear(x_q), DequantizeLinear(w_q) -> MatMul [-> Add(bias)] become one MatMulIntegerToFloat (ONNX
    Runtime's own kernel for an int8 product with a float result, the one dynamic int8 runs). ONNX Runtime fuses
    the MatMul itself but leaves the bias Add as a separate pass over the output."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def dequantized(name: str, constant: bool) -> onnx.NodeProto | None:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) != 3:
            return None
        if (node.input[0] in initializers) != constant or not all(i in initializers for i in node.input[1:]):
            return None
        return node

    replaced: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.output[0] in outputs:
            continue
        x, w = dequantized(node.input[0], False), dequantized(node.input[1], True)
        if x is None or w is None or len(initializers[w.input[0]].dims) != 2:
            continue
        n_out = initializers[w.input[0]].dims[1]
        after = consumers.get(node.output[0], [])
        bias, end = None, node
        if len(after) == 1 and after[0].op_type == "Add":
            other = [i for i in after[0].input if i != node.output[0]]
            if len(other) == 1 and other[0] in initializers and list(initializers[other[0]].dims) == [n_out]:
                bias, end = other[0], after[0]
        inputs = [x.input[0], w.input[0], x.input[1], w.input[1], x.input[2], w.input[2]] + ([bias] if bias else [])
        fused = helper.make_node("MatMulIntegerToFloat", inputs, [end.output[0]], name=f"{node.name}_int8",
                                 domain="com.microsoft")
        replaced[id(end)] = fused
        removed.add(id(node))
    if not replaced:
        return 0
    kept = []
    for node in graph.node:
        if id(node) in replaced:
            kept.append(replaced[id(node)])
        elif id(node) not in removed:
            kept.append(node)
    used = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if n.op_type != "DequantizeLinear" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in kept for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def float_consumers_read_float(model: onnx.ModelProto) -> int:
    """Where an activation x is quantized for the int8 ops, QDQ also hands DequantizeLinear(QuantizeLinear(x)) to
    every other consumer of x: the residual Add, Shape, LayerNorm. Those get x itself back (exact, and one pass
    less each). x produced by a quantized op (a Conv or Gemm feeding a residual) is left as it is: ONNX Runtime
    fuses that op with its output's QuantizeLinear only while the QuantizeLinear is its sole consumer."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rewired = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in initializers]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or dq.output[0] in outputs:
            continue
        source = producer.get(q.input[0])
        if source is not None and source.op_type in STATIC_OPS:
            continue
        for node in graph.node:
            if node.op_type in STATIC_OPS:
                continue
            for position, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[position] = q.input[0]
                    rewired += 1
    _drop_dead_nodes(model)
    return rewired


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """QuantizeLinear / DequantizeLinear nodes nothing reads any more."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def float_convolutions(model_path: Path) -> dict[str, list[str]]:
    """The layers of a convolutional net that static int8 leaves in float: depthwise convolutions (one input
    channel per group: little arithmetic per weight, so quantizing their input and output can cost more than
    int8 saves), tiny layers (fewer than TINY_LAYER_WEIGHTS weights, e.g. squeeze-excitation 1x1s) and Adds of a
    constant (on the OCR recognizer of issue 11, leaving them in float took static int8 from 1.11x fp32 at
    cosine 0.990 to 1.41x at 0.998)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    depthwise, tiny = [], []
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        shape = weights.get(node.input[1])
        if shape is None:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and len(shape) > 1 and shape[1] == 1:
            depthwise.append(node.name)
        elif int(np.prod(shape)) < TINY_LAYER_WEIGHTS:
            tiny.append(node.name)
    # An Add of a constant (hard-swish's x + 3, a bias left over by the exporter) gains nothing as QLinearAdd
    # and costs a requantization; residual Adds (two activations) are what keeps a Conv chain in int8.
    constant_adds = [n.name for n in graph.node if n.op_type == "Add" and any(i in weights for i in n.input)]
    return {"depthwise_convolutions": depthwise, "tiny_layers": tiny, "adds_of_constants": constant_adds}


def onnx_static_int8(source: Path, destination: Path, *, granularity: str, exclude: list[str],
                     calibration_method: str, calibration: list[list[np.ndarray]],
                     convolutional: bool = False, depthwise_in_float: bool = True) -> dict:
    """Static int8 as QDQ, with the MatMuls' outputs left in float (quantizing them to uint8 before the bias and
    residual cost all-MiniLM-L6-v2 embedding cosine 0.940 against 0.988) and each int8 MatMul fused with its bias
    into MatMulIntegerToFloat.

    `convolutional` quantizes a conv net the way ONNX Runtime runs it fastest on CPU: the activations around the
    convolutions (Relu/Clip, residual Add, pooling) are quantized too, so every Conv sits between a
    DequantizeLinear and a QuantizeLinear and becomes a QLinearConv with its activation fused, int8 from layer to
    layer; tiny layers stay in float, and depthwise convolutions too unless `depthwise_in_float` is False
    (float_convolutions: which is faster depends on the net and the CPU, so int8_auto measures both). The weights
    of the layers left in float are stored in int8 all the same (store_weights_int8: float compute, folded at load)."""
    with _prepared(source, destination) as prepared:
        excluded = excluded_nodes(prepared, exclude)
        activations = [name for name in activation_matmuls(prepared) if name not in excluded]
        conv_float = float_convolutions(prepared) if convolutional else {}
        if not depthwise_in_float:
            conv_float.pop("depthwise_convolutions", None)
        in_float = activations + [name for names in conv_float.values() for name in names if name not in excluded]
        graph = onnx.load(str(prepared), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        names = [i.name for i in graph.input if i.name not in weights]
        reduce = _reduce_range()
        quantized = destination.with_suffix(".qdq.onnx")
        op_types = CONV_STATIC_OPS if convolutional else STATIC_OPS
        try:
            quantize_static(str(prepared), str(quantized), _Batches(names, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=granularity == "per_channel",
                            reduce_range=reduce["reduce_range"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded + in_float, calibrate_method=CALIBRATION[calibration_method],
                            op_types_to_quantize=op_types,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
            model = onnx.load(str(quantized))
            fused = fuse_static_matmuls(model)
            rewired = 0 if convolutional else float_consumers_read_float(model)
            stored = store_weights_int8(model, excluded) if convolutional else 0
            onnx.save(model, str(destination))
        except Exception as exc:
            raise _failure("ONNX Runtime static quantization", exc) from None
        finally:
            quantized.unlink(missing_ok=True)
    kept_in_float = {"activation_matmuls": len(activations),
                     "matmul_outputs": "float (not re-quantized)",
                     "other_ops": "everything but " + ", ".join(op_types)}
    if convolutional:
        kept_in_float.update(conv_float)
        kept_in_float["their_weights"] = f"int8 storage, float compute ({stored} weights; store_weights_int8)"
    else:
        kept_in_float["float_consumers_reading_exact_inputs"] = rewired
    return {"method": "static", "dtype": "int8", "granularity": granularity, "excluded_nodes": excluded,
            "calibration_method": calibration_method, "calibration_batches": len(calibration), **reduce,
            "calibration_samples": int(sum(b[0].shape[0] for b in calibration)) if calibration else 0,
            "kept_in_float": kept_in_float, "fused_int8_matmuls": fused,
            "format": "QDQ (uint8 activations, int8 weights)", "tool": "onnxruntime.quantization.quantize_static"}


def _weight_scale_shape(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, ...] | None:
    """The shape of the per-output-channel scale of `node`'s weight (input 1), or None for layers left alone."""
    if node.op_type == "Conv" and weight.ndim >= 3:
        return (weight.shape[0],) + (1,) * (weight.ndim - 1)
    if node.op_type == "Gemm" and weight.ndim == 2:
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        return (weight.shape[0], 1) if transposed else (1, weight.shape[1])
    if node.op_type == "MatMul" and weight.ndim == 2:
        return (1, weight.shape[1])
    return None


def store_weights_int8(model: onnx.ModelProto, skip: Iterable[str] = ()) -> int:
    """Conv / Gemm / MatMul float weights stored as int8 per output channel (symmetric), decoded in the graph by
    Cast + Mul. ONNX Runtime folds constant Cast and Mul at session load, so these layers run the fp32 kernels at
    fp32 speed from a file about 4x smaller for them; DequantizeLinear on a weight is not folded (it is kept for QDQ
    fusion) and made the OCR angle classifier of issue 11 2.1x slower. Layers named in `skip`, weights read by
    anything else or by layers wanting another scale layout stay float. Returns how many weights were stored."""
    graph = model.graph
    skipped = set(skip)
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, position))
    for name in {o.name for o in graph.output} | {n for node in graph.node for a in node.attribute
                                                  if a.type == onnx.AttributeProto.GRAPH
                                                  for n in _names_read(a.g)}:
        readers.setdefault(name, []).append((None, -1))
    decoders, stored = [], 0
    for name, tensor in initializers.items():
        if tensor.data_type != onnx.TensorProto.FLOAT or name not in readers:
            continue
        weight = numpy_helper.to_array(tensor)
        shapes = {_weight_scale_shape(node, weight) if node is not None and position == 1
                  and node.name not in skipped else None for node, position in readers[name]}
        if len(shapes) != 1 or None in shapes or weight.size < 2:
            continue
        scale = np.abs(weight).max(axis=tuple(i for i, n in enumerate(shapes.pop()) if n == 1), keepdims=True) / 127
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(tensor)
        graph.initializer.extend([numpy_helper.from_array(codes, f"{name}_int8"),
                                  numpy_helper.from_array(scale, f"{name}_scale")])
        decoders += [helper.make_node("Cast", [f"{name}_int8"], [f"{name}_codes"], to=onnx.TensorProto.FLOAT,
                                      name=f"{name}_cast"),
                     helper.make_node("Mul", [f"{name}_codes", f"{name}_scale"], [name], name=f"{name}_decode")]
        stored += 1
    for position, node in enumerate(decoders):
        graph.node.insert(position, node)
    return stored


def _names_read(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield from node.input
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _names_read(attribute.g)


def onnx_weights_int8(source: Path, destination: Path, *, exclude: list[str]) -> dict:
    """Int8 weight storage, float compute (store_weights_int8) on the graph with BatchNormalization folded into
    the convolutions first (ONNX Runtime's pre-processing): as fast as fp32, smaller, and the fallback of
    `method: auto` when no int8 computation beats fp32."""
    with _prepared(source, destination) as prepared:
        excluded = excluded_nodes(prepared, exclude)
        try:
            model = onnx.load(str(prepared))
            stored = store_weights_int8(model, excluded)
            onnx.save(model, str(destination))
        except Exception as exc:
            raise _failure("int8 weight storage", exc) from None
    return {"method": "weights_int8", "dtype": "int8", "compute": "float", "granularity": "per_channel",
            "weights_stored_int8": stored, "excluded_nodes": excluded,
            "decoding": "Cast + Mul per weight, folded by ONNX Runtime when the session loads"}


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, const B, C) as MatMul + Add, which the weight-only quantizer understands."""
    initializers = {t.name: t for t in model.graph.initializer}
    rewritten = 0
    for node in list(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        weight_name = f"{node.input[1]}_kn"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        index = list(model.graph.node).index(node)
        has_bias = len(node.input) > 2 and node.input[2]
        matmul_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes = [helper.make_node("MatMul", [node.input[0], weight_name], [matmul_out], name=f"{node.name}")]
        if has_bias:
            new_nodes.append(helper.make_node("Add", [matmul_out, node.input[2]], [node.output[0]],
                                              name=f"{node.name}_bias"))
        model.graph.node.remove(node)
        for offset, new in enumerate(new_nodes):
            model.graph.node.insert(index + offset, new)
        rewritten += 1
    used = {i for n in model.graph.node for i in n.input}
    for tensor in list(model.graph.initializer):
        if tensor.name not in used:
            model.graph.initializer.remove(tensor)
    return rewritten


def onnx_weight_only(source: Path, destination: Path, *, dtype: str, granularity: str, group_size: int | None,
                     exclude: list[str], algorithm: str = "rtn",
                     calibration: list[list[np.ndarray]] | None = None) -> dict:
    """MatMulNBits weights (int8 or int4 blocks) computed with int8 activations (accuracy_level 4, ONNX
    Runtime's fast path on x86), and int8 embedding tables (Gather), so the whole file shrinks. `algorithm`
    picks how the weights are rounded: `rtn` to nearest, `hqq` (ONNX Runtime's half-quadratic solver for scales
    and zero points, no data), `gptq` (worker.compression.gptq, on the calibration data)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    bits = 4 if dtype == "int4" else 8
    block = group_size or 128
    model = onnx.load(str(source))
    drop_initializer_shapes(model)
    rewritten = gemm_to_matmul(model)
    matmuls = destination.with_suffix(".matmul.onnx")
    onnx.save(model, str(matmuls))
    excluded = excluded_nodes(matmuls, exclude)
    details = {"method": "weight_only", "dtype": dtype, "bits": bits, "algorithm": algorithm,
               "granularity": granularity, "group_size": None if granularity == "per_channel" else block,
               "gemm_rewritten_as_matmul": rewritten, "excluded_nodes": excluded}
    weights = {t.name for t in model.graph.initializer}
    if any(n.op_type == "Gather" and n.input[0] in weights for n in model.graph.node):
        details["embeddings"] = "int8 (Gather)"
    try:
        if algorithm == "gptq":
            if not calibration:
                raise JobFailure(ErrorCode.INVALID_DATASET, "algorithm 'gptq' needs a calibration dataset")
            details["gptq"] = gptq.quantize_model(matmuls, matmuls, calibration, bits=bits, group_size=block,
                                                  symmetric=GPTQ_SYMMETRIC, excluded=excluded,
                                                  mask_position=smoothing_pass.mask_position(matmuls))
            details["gptq"]["calibration_samples"] = int(sum(b[0].shape[0] for b in calibration))
            details["tool"] = "worker.compression.gptq (MatMulNBits, accuracy_level 4)"
        else:
            config = HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=("MatMul",)) \
                if algorithm == "hqq" else None
            quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                             accuracy_level=4, nodes_to_exclude=excluded,
                                             op_types_to_quantize=("MatMul",), algo_config=config,
                                             channel_wised_quantize=granularity == "per_channel")
            quantizer.process()
            quantizer.model.save_model_to_file(str(matmuls))
            details["tool"] = ("onnxruntime.quantization.matmul_nbits_quantizer (MatMulNBits"
                               f"{', HQQ' if algorithm == 'hqq' else ''}, accuracy_level 4)")
        quantize_dynamic(str(matmuls), str(destination), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["Gather"], nodes_to_exclude=excluded)
    except JobFailure:
        raise
    except Exception as exc:
        raise _failure("ONNX Runtime weight-only quantization", exc) from None
    finally:
        matmuls.unlink(missing_ok=True)
    details["quantized_matmuls"] = sum(n.op_type == "MatMulNBits"
                                       for n in onnx.load(str(destination), load_external_data=False).graph.node)
    if not details["quantized_matmuls"]:
        details["warning"] = ("weight-only quantization found no MatMul or Gemm weights to quantize in this model "
                              "(convolution weights are not weight-only quantized): nothing was compressed; int8 "
                              "(method 'auto' or 'static') quantizes convolutional nets")
    return details


def onnx_fp16(source: Path, destination: Path, *, exclude: list[str]) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    excluded = excluded_nodes(source, exclude)
    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, node_block_list=excluded)
        onnx.save(model, str(destination))
    except Exception as exc:
        raise _failure("fp16 conversion", exc) from None
    return {"method": "cast", "dtype": "fp16", "excluded_nodes": excluded, "io_types": "float32 (kept)",
            "tool": "onnxruntime.transformers.float16"}


def quantize_onnx(source: Path, destination: Path, *, method: str, dtype: str, granularity: str,
                  group_size: int | None, exclude: list[str], calibration_method: str,
                  calibration: list[list[np.ndarray]] | None, smoothing: float | str | None = None,
                  algorithm: str = "rtn") -> dict:
    if dtype == "fp16":
        return onnx_fp16(source, destination, exclude=exclude)
    if method == "weight_only":
        return onnx_weight_only(source, destination, dtype=dtype, granularity=granularity, group_size=group_size,
                                exclude=exclude, algorithm=algorithm, calibration=calibration)

    def int8(src: Path, dst: Path) -> dict:
        if method == "static":
            return onnx_static_int8(src, dst, granularity=granularity, exclude=exclude,
                                    calibration_method=calibration_method, calibration=calibration or [])
        return onnx_dynamic_int8(src, dst, granularity=granularity, exclude=exclude)

    if smoothing is None:
        return int8(source, destination)
    if not calibration:
        raise JobFailure(ErrorCode.INVALID_DATASET, "smoothing needs a calibration dataset")
    return smoothed_int8(source, destination, int8, smoothing, calibration)


def smoothed_int8(source: Path, destination: Path, int8, smoothing: float | str,
                  calibration: list[list[np.ndarray]]) -> dict:
    """Smooth, then quantize with `int8`; with "auto", each alpha of SMOOTHING_ALPHAS is tried and the one whose
    int8 output agrees best with the fp32 model on the calibration data is kept."""
    try:
        channel_max = smoothing_pass.activation_channel_max(source, calibration)
    except Exception as exc:
        raise _failure("measuring activations for smoothing", exc) from None
    alphas = SMOOTHING_ALPHAS if smoothing == "auto" else (float(smoothing),)
    reference = smoothing_pass.run_all(source, calibration) if len(alphas) > 1 else None
    position = smoothing_pass.mask_position(source)
    masks = [None if position is None else feeds[position] for feeds in calibration]
    scores: dict[str, float] = {}
    best: tuple[float, float, Path, dict, int] | None = None
    for alpha in alphas:
        smoothed = destination.with_suffix(f".smooth-{alpha}.onnx")
        candidate = destination.with_suffix(f".int8-{alpha}.onnx")
        try:
            count = smoothing_pass.smooth(source, smoothed, channel_max, alpha)
            details = int8(smoothed, candidate)
        finally:
            smoothed.unlink(missing_ok=True)
        score = smoothing_pass.output_cosine(reference, smoothing_pass.run_all(candidate, calibration), masks) \
            if reference is not None else float("nan")
        scores[str(alpha)] = round(score, 6) if reference is not None else None
        if best is None or score > best[1]:
            if best is not None:
                best[2].unlink(missing_ok=True)
            best = (alpha, score, candidate, details, count)
        else:
            candidate.unlink(missing_ok=True)
    alpha, _, chosen, details, count = best
    shutil.move(chosen, destination)
    details["smoothing"] = {"alpha": alpha, "smoothed_inputs": count, "calibration_batches": len(calibration),
                            "calibration_samples": int(sum(b[0].shape[0] for b in calibration)),
                            "kept_in_float": "a Mul per smoothed MatMul input (1/s per channel)"}
    if reference is not None:
        details["smoothing"]["calibration_cosine_by_alpha"] = scores
    if not count:
        details["warning"] = ("smoothing found no MatMul input to smooth (it helps transformers; this model's "
                              "weights are elsewhere, e.g. in convolutions): it quantized as plain "
                              f"{details['method']} int8; the default int8 (method 'auto') suits this model better")
    return details


class CastIO(torch.nn.Module):
    """Runs a half-precision module behind float32 inputs and outputs, so callers see the same interface."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *args):
        args = tuple(a.to(self.dtype) if a.is_floating_point() else a for a in args)
        result = self.module(*args)
        if isinstance(result, (tuple, list)):
            return tuple(r.float() if r.is_floating_point() else r for r in result)
        return result.float() if result.is_floating_point() else result


def quantize_module(module: torch.nn.Module, *, method: str, dtype: str, granularity: str, group_size: int | None,
                    exclude: list[str]) -> tuple[torch.nn.Module, dict]:
    """pytorch target: swap linear layers for quantized ones (or cast); returns the new module."""
    patterns = compile_patterns(exclude)

    def skip(name: str) -> bool:
        return any(rx.search(name) for rx in patterns)

    if dtype in CASTS:
        torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
        return CastIO(module, torch_dtype), {"method": "cast", "dtype": dtype, "io_types": "float32 (kept)"}
    if method == "weight_only":
        bits = 4 if dtype == "int4" else 8
        group = group_size if granularity == "group" else None
        names = replace_linears(module, lambda layer: WeightOnlyLinear(layer, bits, group), skip)
        return module, {"method": "weight_only", "dtype": dtype, "group_size": group,
                        "granularity": granularity, "quantized_layers": len(names),
                        "note": "weights are stored as int8/int4 and dequantized at run time: smaller, "
                                "not faster on CPU"}
    names = replace_linears(module, lambda layer: DynamicInt8Linear(layer, granularity == "per_channel"), skip)
    return module, {"method": "dynamic", "dtype": "int8", "granularity": granularity,
                    "quantized_layers": len(names),
                    "note": "int8 weights; activations quantized per row at run time (torch._int_mm)"}
