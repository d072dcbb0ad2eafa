"""Hugging Face model directories (a zip or tar.gz of what `save_pretrained` writes), in and out.

An upload is extracted with the archive safety rules, and nothing in it may run code: configs asking for
custom code (auto_map, trust_remote_code) are refused, the architecture must be one transformers ships,
weights come from safetensors, and a pytorch_model.bin is used only when `torch.load(weights_only=True)`
accepts it. The hub is never contacted. The rest of the pipeline sees `HFModel.module`: an adapter taking
positional tensors (int64 token ids for text models, float32 `pixel_values` for image models such as ViT or
ConvNeXt) and returning a tuple of tensors, like any other model. An encoder-decoder (T5 family) takes
input_ids, attention_mask and decoder_input_ids and returns the decoder's logits; its ONNX form is two graphs
(worker.formats.hf_seq2seq).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers imports huggingface_hub, which reads it once

import inspect
import json
import math
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import safetensors
import torch
import transformers

from app.core.config import Settings
from app.core.errors import ErrorCode
from app.core.model_limits import CAUSAL_LM_TASK, SEQ2SEQ_TASK
from app.core.vetting.archives import ArchiveError, extract_archive
from app.core.vetting.hf import MAX_CONFIG_BYTES, UNPACK_FACTOR, remote_code_reason
from worker.errors import JobFailure
from worker.formats import sparse_safetensors
from worker.runtime import ort_session, run_onnx

transformers.utils.logging.disable_progress_bar()

# Text inputs the adapter passes, in this order, when the model's forward takes them.
OPTIONAL_INPUTS = ("attention_mask", "token_type_ids")
# Which outputs the adapter returns: the first group the model produces.
OUTPUT_GROUPS = (("logits",), ("start_logits", "end_logits"), ("last_hidden_state",))
# Any of these means the directory holds a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
# The files of an uploaded directory that are extracted at all (weights: *.safetensors besides these).
USED_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin",
                        "special_tokens_map.json", "added_tokens.json", "merges.txt", "README.md", "LICENSE",
                        # a sentence-transformers archive: its modules (how it pools) and their settings
                        "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                        *TOKENIZER_FILES})
# Files of the uploaded directory that save_hf does not carry over: old weights and code.
NOT_CARRIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
                        ".index.json", ".py")
ARCHITECTURE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                       "vocab_size", "max_position_embeddings")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = "pytorch_model.bin"
# ONNX Runtime against torch: max abs difference allowed, relative to the largest output magnitude (>= 1).
ONNX_TOLERANCE = 1e-3
# A config may describe a few more parameters than the weights hold (a pooler the checkpoint lacks), not more.
SIZE_SLACK = 1.1
SIZE_SLACK_ELEMENTS = 4_000_000
SEQ2SEQ_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")


@dataclass
class HFModel:
    model: transformers.PreTrainedModel
    config: dict[str, Any]
    model_dir: Path
    tokenizer_dir: Path | None
    tokenizer: Any  # a transformers tokenizer, or None
    input_names: list[str]
    output_names: list[str]
    module: torch.nn.Module
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    task: str | None = None  # CAUSAL_LM_TASK, SEQ2SEQ_TASK, or None for other models
    pooling: str | None = None  # a sentence-transformers archive's pooling ("mean", "cls", "max"), else None

    def example_inputs(self, batch: int = 2, seq: int = 16, seed: int = 0,
                       decoder_seq: int | None = None) -> tuple[torch.Tensor, ...]:
        return _example_inputs(self.model, self.input_names, batch, seq, seed, decoder_seq)

    def decoder_inputs(self, input_ids: np.ndarray) -> np.ndarray:
        """An encoder-decoder's decoder inputs for texts: the input shifted right behind the decoder start token
        (what the model sees when it is trained to reproduce its input; pads stay pads)."""
        start = self.model.config.decoder_start_token_id
        start = self.model.config.pad_token_id if start is None else start
        shifted = np.full_like(input_ids, start or 0)
        shifted[:, 1:] = input_ids[:, :-1]
        return shifted


class TextModelAdapter(torch.nn.Module):
    """Positional tensors in `input_names` order in, a tuple of the chosen outputs out.

    `extra` holds fixed keyword arguments, e.g. use_cache=False so causal LMs return no cache.
    """

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_names: list[str],
                 extra: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.extra = dict(extra)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, tensors, strict=True)), **self.extra, return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


def load_hf(archive: Path, workdir: Path, max_unpacked_bytes: int | None = None) -> HFModel:
    """Extract and load an uploaded Hugging Face model archive in eval mode, fp32, on the CPU."""
    model_dir = _extract(archive, workdir, max_unpacked_bytes)
    sparse_safetensors.densify_hf_dir(model_dir, max_unpacked_bytes or _default_unpack_limit())
    config = _read_config(model_dir)
    model_class = _model_class(config)
    use_safetensors = _check_weights(model_dir)
    _check_size(model_class, model_dir, use_safetensors)
    model = _build(model_class, model_dir, use_safetensors)
    tokenizer_dir = model_dir if any((model_dir / name).is_file() for name in TOKENIZER_FILES) else None
    tokenizer = _load_tokenizer(model_dir) if tokenizer_dir else None

    forward_params = inspect.signature(model.forward).parameters
    task = _task(model, config, forward_params)
    if task == SEQ2SEQ_TASK:
        input_names = list(SEQ2SEQ_INPUTS)
        inputs = [{"name": name, "shape": ["batch", "decoder_sequence" if name.startswith("decoder") else "sequence"],
                   "dtype": "int64"} for name in input_names]
    elif "input_ids" in forward_params:
        wanted = tokenizer.model_input_names if tokenizer is not None else ["input_ids", "attention_mask"]
        input_names = ["input_ids", *(n for n in OPTIONAL_INPUTS if n in wanted and n in forward_params)]
        inputs = [{"name": name, "shape": ["batch", "sequence"], "dtype": "int64"} for name in input_names]
    elif "pixel_values" in forward_params:
        input_names = ["pixel_values"]
        inputs = [{"name": "pixel_values", "shape": ["batch", *image_shape(model)], "dtype": "float32"}]
    else:
        raise JobFailure(ErrorCode.UNSUPPORTED_ARCHITECTURE,
                         f"{type(model).__name__} takes neither input_ids nor pixel_values; text and image "
                         "models are supported for Hugging Face uploads")
    extra = {"use_cache": False} if "use_cache" in forward_params else {}
    output_names, outputs = _describe_outputs(model, input_names, extra)
    if task == SEQ2SEQ_TASK:  # the outputs follow the decoder's length
        for described in outputs:
            described["shape"] = ["decoder_sequence" if dim == "sequence" else dim for dim in described["shape"]]
    pooling = sentence_pooling(model_dir) if output_names[0] == "last_hidden_state" else None
    return HFModel(model=model, config=config, model_dir=model_dir, tokenizer_dir=tokenizer_dir,
                   tokenizer=tokenizer, input_names=input_names, output_names=output_names,
                   module=TextModelAdapter(model, input_names, output_names, extra).eval(),
                   inputs=inputs, outputs=outputs, task=task, pooling=pooling)


POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max"}
POOLING_MODULE = "sentence_transformers.models.Pooling"


def sentence_pooling(model_dir: Path) -> str | None:
    """How a sentence-transformers archive turns token states into the sentence embedding its users use: its
    modules.json names a Pooling module whose config.json turns on one mode we compute ("mean", "cls", "max").
    None when the archive is no such thing, names a path outside itself, or pools some other way."""
    try:
        modules = _read_json_document(model_dir / "modules.json")
    except (FileNotFoundError, JobFailure):
        return None
    entries = modules if isinstance(modules, list) else []
    folders = [e.get("path") for e in entries if isinstance(e, dict) and e.get("type") == POOLING_MODULE]
    if len(folders) != 1 or not isinstance(folders[0], str):
        return None
    config_path = (model_dir / folders[0] / "config.json").resolve()
    if not config_path.is_relative_to(model_dir.resolve()) or not config_path.is_file():
        return None
    try:
        config = _read_json(config_path)
    except JobFailure:
        return None
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key) is True]
    others = [key for key, value in config.items()
              if key.startswith("pooling_mode_") and key not in POOLING_MODES and value is True]
    return modes[0] if len(modes) == 1 and not others else None


def _task(model: transformers.PreTrainedModel, config: dict[str, Any], forward_params) -> str | None:
    """What kind of model this is where the pipeline treats it specially: a causal LM (perplexity on texts) or
    an encoder-decoder (two ONNX graphs). The encoder of an encoder-decoder alone (T5EncoderModel) is a plain
    text model."""
    if config.get("is_encoder_decoder") and "decoder_input_ids" in forward_params:
        if "input_ids" not in forward_params:
            raise JobFailure(ErrorCode.UNSUPPORTED_ARCHITECTURE,
                             f"{type(model).__name__} is an encoder-decoder that does not take input_ids; text "
                             "encoder-decoders (T5 family) are supported")
        return SEQ2SEQ_TASK
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    return CAUSAL_LM_TASK if type(model).__name__ in causal else None


def image_shape(model: transformers.PreTrainedModel) -> list[int]:
    """[channels, height, width] an image model takes, from its config (image_size an int or [h, w])."""
    config = model.config
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(config, "num_channels", 3)
    if not all(isinstance(v, int) and 0 < v <= 4096 for v in (height, width, channels)):
        raise JobFailure(ErrorCode.INVALID_CONFIG, f"image_size {size!r} / num_channels {channels!r} are not "
                                                   "positive sizes")
    return [channels, height, width]


def inspect_hf(archive: Path, workdir: Path, max_unpacked_bytes: int | None = None) -> dict[str, Any]:
    """What the model page shows for a Hugging Face upload. Raises JobFailure when it cannot be used."""
    return describe(load_hf(archive, workdir, max_unpacked_bytes))


def describe(hf: HFModel) -> dict[str, Any]:
    parameters = list(hf.model.parameters())  # tied weights are listed once
    architecture = {"model_type": hf.config["model_type"], "class": type(hf.model).__name__}
    for field in ARCHITECTURE_FIELDS:
        value = getattr(hf.model.config, field, None)
        if value is not None:
            architecture[field] = value
    if hf.task is not None:
        architecture["task"] = hf.task
    if hf.pooling is not None:
        architecture["sentence_pooling"] = hf.pooling
    return {"params": sum(p.numel() for p in parameters),
            "nonzero_params": sum(int(torch.count_nonzero(p)) for p in parameters),
            "inputs": hf.inputs, "outputs": hf.outputs, "architecture": architecture,
            "tokenizer": hf.tokenizer is not None}


def save_hf(hf: HFModel, model: torch.nn.Module, out_dir: Path,
            sparse: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """Write `model` (the possibly compressed transformers model) as a Hugging Face directory, zipped; with
    `sparse`, a sparse model's weights in compressed-tensors' bitmask layout (returns its config, else None).

    transformers 5 always saves safetensors. The tokenizer and the upload's other plain files (README,
    sentence-transformers pooling configs) go along; its old weights and any code do not.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise JobFailure(ErrorCode.EXPORT_FAILED,
                         f"the hf export needs a transformers model, got {type(model).__name__}")
    save_dir = out_dir / "model"
    model.save_pretrained(save_dir)
    config = sparse_safetensors.sparsify_hf_dir(save_dir) if sparse else None
    if hf.tokenizer is not None:
        hf.tokenizer.save_pretrained(save_dir)
    for source in sorted(hf.model_dir.rglob("*")):
        target = save_dir / source.relative_to(hf.model_dir)
        if source.is_file() and not target.exists() and not source.name.endswith(NOT_CARRIED_SUFFIXES):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    zip_path = out_dir / "model.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(save_dir.rglob("*")):
            if path.is_file():
                archive.write(path, f"model/{path.relative_to(save_dir).as_posix()}")
    return zip_path, config


def verify_hf_zip(zip_path: Path, workdir: Path) -> HFModel:
    """Load an exported archive back exactly as an upload and run it once; any failure is export_failed."""
    try:
        hf = load_hf(zip_path, workdir)
        with torch.inference_mode():
            hf.module(*hf.example_inputs())
    except JobFailure as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED,
                         f"the exported Hugging Face archive does not load back: {exc.message}") \
            from None
    return hf


def export_hf_onnx(hf: HFModel, path: Path, batch: int = 2, seq: int = 16,
                   module: torch.nn.Module | None = None) -> Path:
    """Export the adapter (`module`: the model as the steps left it, else the uploaded one) to a self-contained ONNX
    file with dynamic batch and sequence, checked in ONNX Runtime on another batch and length than it saw.

    The graph ONNX Runtime runs fastest, by measurement (bench/export_bench.py, all-MiniLM-L6-v2, batch 48, 2
    threads): the TorchScript exporter with eager attention - fp32 88.8 ms, int8 52.5 ms - against 100.2 / 61.1
    ms for the dynamo exporter and 56.4 ms int8 for ONNX Runtime's fused transformer graph.
    """
    module = module or hf.module
    inner = getattr(module, "model", hf.model)
    dims = {"batch": "batch", "sequence": "sequence"}
    axes = {spec["name"]: {axis: dims[dim] for axis, dim in enumerate(spec["shape"]) if dim in dims}
            for spec in hf.inputs}
    for described in hf.outputs:
        axes[described["name"]] = {axis: dims[dim] for axis, dim in enumerate(described["shape"]) if dim in dims}
    previous = inner.config._attn_implementation
    try:
        inner.set_attn_implementation("eager")  # plain MatMul/Softmax attention: what ONNX Runtime runs fastest
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(module, hf.example_inputs(batch, seq), f=str(path), dynamo=False, opset_version=17,
                              input_names=hf.input_names, output_names=hf.output_names, dynamic_axes=axes,
                              do_constant_folding=True)
    except Exception as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED, f"could not export the model to ONNX: {exc.__class__.__name__}: "
                                                  f"{str(exc)[:300]}") from None
    finally:
        inner.set_attn_implementation(previous)
    check = hf.example_inputs(batch + 1, seq + 3, seed=1)
    with torch.inference_mode():
        expected = [t.float().numpy() for t in module(*check)]
    try:
        got = run_onnx(ort_session(path, "cpu"), [t.numpy() for t in check])
    except Exception as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED,
                         f"ONNX Runtime cannot run the exported model: {exc.__class__.__name__}: "
                         f"{str(exc)[:300]}") from None
    check_agreement(hf.output_names, expected, got)
    return path


def check_agreement(names: list[str], expected: list[np.ndarray], got: list[np.ndarray]) -> None:
    """The ONNX export's outputs must match the torch model's within ONNX_TOLERANCE."""
    for name, want, have in zip(names, expected, got, strict=True):
        scale = max(1.0, float(np.abs(want).max()))
        diff = float(np.abs(want - have).max()) if want.shape == have.shape else float("inf")
        if not diff <= ONNX_TOLERANCE * scale:
            raise JobFailure(ErrorCode.EXPORT_FAILED,
                             f"the ONNX export disagrees with the model on output {name!r}: max "
                             f"abs difference {diff:.3g} (shapes {want.shape} vs {have.shape})")


def _used_file(name: str) -> bool:
    """What is extracted from an upload: the files transformers reads for a model and its tokenizer, and the
    model card; code, libraries and anything else stay in the archive, unread."""
    base = PurePosixPath(name).name
    return base in USED_FILES or base.endswith(".safetensors")


def _extract(archive: Path, workdir: Path, max_unpacked_bytes: int | None) -> Path:
    """`max_unpacked_bytes` defaults to what the default upload limit allows (UNPACK_FACTOR x the limit)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="hf-", dir=workdir))
    limit = max_unpacked_bytes or _default_unpack_limit()
    try:
        return extract_archive(archive, dest, max_total_bytes=limit, include=_used_file)
    except ArchiveError as exc:
        raise JobFailure(exc.code, f"model archive: {exc.message}") from None


def _default_unpack_limit() -> int:
    return UNPACK_FACTOR * Settings.model_fields["max_upload_bytes"].default


def _read_json_document(path: Path) -> Any:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise JobFailure(ErrorCode.INVALID_CONFIG, f"{path.name} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise JobFailure(ErrorCode.INVALID_CONFIG, f"{path.name} is not valid JSON ({exc})") from None


def _read_json(path: Path) -> dict[str, Any]:
    document = _read_json_document(path)
    if not isinstance(document, dict):
        raise JobFailure(ErrorCode.INVALID_CONFIG, f"{path.name} is not a JSON object")
    return document


def _read_config(model_dir: Path) -> dict[str, Any]:
    """config.json, after refusing everything that would run or fetch code or need another library."""
    if not (model_dir / "config.json").is_file():
        raise JobFailure(ErrorCode.MISSING_CONFIG, "the archive has no config.json at its top level (or in its single "
                                                   "top-level folder)")
    config = _read_json(model_dir / "config.json")
    for name in ("config.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            reason = remote_code_reason(config if name == "config.json" else _read_json(model_dir / name))
            if reason:
                raise JobFailure(ErrorCode.REMOTE_CODE_REFUSED,
                                 f"{name} {reason}, which means running code shipped with "
                                 "the model; that is never done here")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise JobFailure(ErrorCode.UNSUPPORTED_ARCHITECTURE, f"model_type {model_type!r} is not an architecture "
                                                             f"transformers {transformers.__version__} ships")
    if "quantization_config" in config:
        raise JobFailure(ErrorCode.UNSUPPORTED_MODEL,
                         "the checkpoint is already quantized (quantization_config); upload "
                         "the full-precision model")
    return config


def _model_class(config: dict[str, Any]) -> type:
    """The class named in config.architectures when transformers exports it, else AutoModel."""
    architectures = config.get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        return transformers.AutoModel
    config_class = transformers.CONFIG_MAPPING[config["model_type"]]
    if model_class.config_class is not None and not issubclass(config_class, model_class.config_class):
        raise JobFailure(ErrorCode.UNSUPPORTED_ARCHITECTURE, f"architecture {name} does not match model_type "
                                                             f"{config['model_type']!r}")
    return model_class


def _check_weights(model_dir: Path) -> bool:
    """Which weights to load: True for safetensors (single or sharded), False for a vetted pytorch_model.bin."""
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise JobFailure(ErrorCode.INVALID_CONFIG, f"{SAFETENSORS_INDEX} has no weight_map")
        for shard in set(weight_map.values()):
            if not (isinstance(shard, str) and "/" not in shard and "\\" not in shard
                    and shard.endswith(".safetensors") and (model_dir / shard).is_file()):
                raise JobFailure(ErrorCode.MISSING_WEIGHTS,
                                 f"{SAFETENSORS_INDEX} names shard {shard!r}, which is not a "
                                 ".safetensors file next to it")
        return True
    if (model_dir / SAFETENSORS).is_file():
        return True
    if (model_dir / PICKLED_WEIGHTS).is_file():
        _vet_pickled_weights(model_dir / PICKLED_WEIGHTS)
        return False
    raise JobFailure(ErrorCode.MISSING_WEIGHTS, f"no weights: expected {SAFETENSORS} (or shards listed in "
                                                f"{SAFETENSORS_INDEX}) next to config.json")


def _vet_pickled_weights(path: Path) -> None:
    """torch's weights-only unpickler builds tensors and containers and refuses anything that could run code."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as exc:
        raise JobFailure(ErrorCode.UNSAFE_WEIGHTS, f"{PICKLED_WEIGHTS} is not a plain state dict of tensors "
                                                   f"({exc.__class__.__name__}); re-save the model with safetensors") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise JobFailure(ErrorCode.UNSAFE_WEIGHTS, f"{PICKLED_WEIGHTS} is not a plain state dict of tensors")


def _weight_elements(model_dir: Path, use_safetensors: bool) -> int:
    """How many numbers the weight files hold, from their headers (nothing is loaded)."""
    if not use_safetensors:
        state = torch.load(model_dir / PICKLED_WEIGHTS, weights_only=True, map_location="cpu", mmap=True)
        return sum(tensor.numel() for tensor in state.values())
    index_path = model_dir / SAFETENSORS_INDEX
    files = sorted(set(_read_json(index_path)["weight_map"].values())) if index_path.is_file() else [SAFETENSORS]
    total = 0
    for name in files:
        with safetensors.safe_open(str(model_dir / name), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return total


def _check_size(model_class: type, model_dir: Path, use_safetensors: bool) -> None:
    """The model config.json describes, built on the meta device (no memory), may not be much bigger than the
    weights: a tiny archive whose config asks for a huge vocabulary would otherwise allocate it first."""
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            skeleton = (transformers.AutoModel.from_config(config) if model_class is transformers.AutoModel
                        else model_class(config))
    except Exception as exc:
        raise JobFailure(ErrorCode.INVALID_CONFIG, f"config.json does not describe a model transformers can build: "
                                                   f"{exc.__class__.__name__}: {str(exc)[:300]}") from None
    described = sum(parameter.numel() for parameter in skeleton.parameters())
    held = _weight_elements(model_dir, use_safetensors)
    if described > SIZE_SLACK * held + SIZE_SLACK_ELEMENTS:
        raise JobFailure(ErrorCode.WEIGHTS_MISMATCH, f"config.json describes a model of {described} parameters but "
                                                     f"the weights hold {held} numbers; it is refused before "
                                                     "anything is allocated")


def _build(model_class: type, model_dir: Path, use_safetensors: bool) -> transformers.PreTrainedModel:
    try:
        # Mismatched shapes are collected (not raised) so they are reported below like missing keys.
        model, loading = model_class.from_pretrained(model_dir, local_files_only=True,
                                                     use_safetensors=use_safetensors, dtype=torch.float32,
                                                     ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as exc:
        raise JobFailure(ErrorCode.INVALID_MODEL,
                         f"transformers could not build {model_class.__name__} from the archive: "
                         f"{exc.__class__.__name__}: {str(exc)[:300]}") from None
    problems = [f"{kind.replace('_', ' ')}: {', '.join(sorted(map(_key_text, loading[kind]))[:10])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if loading.get(kind)]
    if problems:
        raise JobFailure(ErrorCode.WEIGHTS_MISMATCH,
                         f"the weights do not fit {type(model).__name__}: {'; '.join(problems)}")
    return model.float().eval()


def _key_text(entry: object) -> str:
    """A loading-report entry: a key, or (key, shape in the weights, shape the config asks for)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, stored, expected = entry
        return f"{key} (weights {list(stored)}, config {list(expected)})"
    return str(entry)


def _load_tokenizer(model_dir: Path) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise JobFailure(ErrorCode.INVALID_TOKENIZER, f"the tokenizer files do not load: {exc.__class__.__name__}: "
                                                      f"{str(exc)[:300]}") from None


def _example_inputs(model: transformers.PreTrainedModel, input_names: list[str], batch: int, seq: int,
                    seed: int, decoder_seq: int | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded token ids within the vocabulary, a full attention mask, segment 0, decoder ids of `decoder_seq`
    (default `seq`); for an image model, seeded normal pixel values of its image size (`seq` does not apply)."""
    generator = torch.Generator().manual_seed(seed)
    if input_names == ["pixel_values"]:
        return (torch.randn((batch, *image_shape(model)), generator=generator),)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (batch, seq), generator=generator)
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    if "decoder_input_ids" in input_names:
        values["decoder_input_ids"] = torch.randint(0, model.get_input_embeddings().num_embeddings,
                                                    (batch, decoder_seq or seq), generator=generator)
    return tuple(values[name] for name in input_names)


def _describe_outputs(model: transformers.PreTrainedModel, input_names: list[str],
                      extra: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Pick the outputs to return and name their dims, from two probe runs of different batch and length."""
    with torch.inference_mode():
        try:
            small, large = (model(**dict(zip(input_names, _example_inputs(model, input_names, batch, seq, 0))),
                                  **extra, return_dict=True) for batch, seq in ((2, 5), (3, 7)))
        except Exception as exc:
            raise JobFailure(ErrorCode.INVALID_MODEL, f"a forward pass of the model failed: {exc.__class__.__name__}: "
                                                      f"{str(exc)[:300]}") from None
    available = {key for key, value in small.items() if isinstance(value, torch.Tensor)}
    names = next((list(group) for group in OUTPUT_GROUPS if set(group) <= available), None)
    if names is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_ARCHITECTURE,
                         f"the model returns {sorted(available)}; expected logits or "
                         "last_hidden_state")
    described = []
    for name in names:
        shape: list[int | str] = []
        for index, (a, b) in enumerate(zip(small[name].shape, large[name].shape, strict=True)):
            shape.append(a if a == b else {(2, 3): "batch", (5, 7): "sequence"}.get((a, b), f"dim_{index}"))
        described.append({"name": name, "shape": shape, "dtype": str(small[name].dtype).removeprefix("torch.")})
    return names, described
