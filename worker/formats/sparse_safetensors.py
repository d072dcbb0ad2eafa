"""Sparse weights stored sparse: compressed-tensors' `sparse-bitmask` layout in safetensors files.

Zeros in a dense file cost as much as any other number; this layout stores only the nonzeros, so a 50%
sparse model's file is really about half the size, with no transport encoding. Each sparse 2-D weight
`<module>.weight` becomes four tensors, as compressed-tensors' BitmaskCompressor writes and reads them:

- `<module>.shape`: int64 [rows, columns], the dense shape;
- `<module>.compressed`: the nonzero values, row-major, in the weight's dtype (1-D);
- `<module>.bitmask`: uint8 [rows, ceil(columns / 8)], bit j of byte k in a row set when column 8k + j is
  nonzero (numpy.packbits, bitorder "little");
- `<module>.row_offsets`: int64 [rows], where each row's values start in `compressed`.

Other tensors stay as they are. The compression config (the `quantization_config` of a Hugging Face
config.json, with `quant_method` "compressed-tensors" and a `sparsity_config`) says which layout it is; it is
also written into the safetensors `__metadata__` under `quantization_config`, so a lone file says it too.
2:4 sparse models use the same layout (sparsity_structure "2:4"). The layout is written here rather than by
the library: compressed-tensors dropped its sparse compressors after 0.12 and its releases pull in a torch
and transformers of their own choosing; the tests load our files with compressed-tensors 0.12.2.
"""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.errors import ErrorCode
from worker.errors import JobFailure

FORMAT = "sparse-bitmask"
QUANT_METHOD = "compressed-tensors"
# The compressed-tensors release whose BitmaskCompressor reads this layout (the tests load files with it).
LIBRARY_VERSION = "0.12.2"
METADATA_KEY = "quantization_config"
# A weight is stored sparse from this fraction of zeros up: below it the bitmask and offsets save little.
MIN_SPARSITY = 0.25
PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def sparse_weight_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The 2-D floating-point `.weight` tensors with at least MIN_SPARSITY zeros: those stored sparse."""
    return [name for name, tensor in tensors.items()
            if name.endswith(".weight") and tensor.dim() == 2 and tensor.is_floating_point() and tensor.numel()
            and int((tensor == 0).sum()) >= MIN_SPARSITY * tensor.numel()]


def _is_two_four(tensor: torch.Tensor) -> bool:
    if tensor.shape[-1] % 4:
        return False
    return bool(((tensor != 0).reshape(-1, 4).sum(dim=1) <= 2).all())


def compression_config(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, Any]:
    """A config.json `quantization_config` for weights `names` stored sparse (compressed-tensors' keys)."""
    zeros = sum(int((tensors[name] == 0).sum()) for name in names)
    total = sum(tensors[name].numel() for name in names)
    structure = "2:4" if all(_is_two_four(tensors[name]) for name in names) else "unstructured"
    return {"quant_method": QUANT_METHOD, "version": LIBRARY_VERSION,
            "sparsity_config": {"format": FORMAT, "sparsity_structure": structure,
                                "global_sparsity": round(zeros / total, 4),
                                "targets": sorted(name.removesuffix(".weight") for name in names), "ignore": []}}


def compress(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors with the weights `names` in the bitmask layout."""
    names = set(names)
    clashes = [key for name in names for key in _part_keys(name.removesuffix(".weight")) if key in tensors]
    if clashes:
        raise JobFailure(ErrorCode.EXPORT_FAILED, f"tensor names clash with the sparse layout: {clashes[:5]}")
    stored = {}
    for name, tensor in tensors.items():
        if name not in names:
            stored[name] = tensor
            continue
        prefix = name.removesuffix(".weight")
        nonzero = tensor != 0
        counts = nonzero.sum(dim=1)
        stored[f"{prefix}.shape"] = torch.tensor(list(tensor.shape), dtype=torch.int64)
        stored[f"{prefix}.compressed"] = tensor[nonzero].contiguous()
        stored[f"{prefix}.bitmask"] = torch.from_numpy(np.packbits(nonzero.numpy(), axis=-1, bitorder="little"))
        stored[f"{prefix}.row_offsets"] = torch.cumsum(counts, 0) - counts
    return stored


def decompress(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense tensors back from the bitmask layout; checks that every part agrees before allocating."""
    prefixes = sorted(key.removesuffix(".bitmask") for key in stored if key.endswith(".bitmask"))
    parts = {key for prefix in prefixes for key in _part_keys(prefix)}
    dense = {key: value for key, value in stored.items() if key not in parts}
    for prefix in prefixes:
        missing = [part for part in PARTS if f"{prefix}.{part}" not in stored]
        if missing:
            raise ValueError(f"sparse weight {prefix!r} lacks {missing}")
        shape, values, bitmask = (stored[f"{prefix}.{part}"] for part in PARTS[:3])
        rows, columns = (int(v) for v in shape.flatten().tolist()) if shape.numel() == 2 else (-1, -1)
        if rows < 0 or columns < 0 or list(bitmask.shape) != [rows, math.ceil(columns / 8)] \
                or bitmask.dtype != torch.uint8:
            raise ValueError(f"sparse weight {prefix!r}: shape {shape.tolist()} does not fit its bitmask "
                             f"{list(bitmask.shape)}")
        mask = np.unpackbits(bitmask.numpy(), axis=-1, count=columns, bitorder="little").astype(bool)
        if values.dim() != 1 or values.numel() != int(mask.sum()):
            raise ValueError(f"sparse weight {prefix!r}: {values.numel()} values for {int(mask.sum())} set bits")
        weight = torch.zeros((rows, columns), dtype=values.dtype)
        weight[torch.from_numpy(mask)] = values
        dense[f"{prefix}.weight"] = weight
    return dense


def _part_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{part}" for part in PARTS]


def config_of(path: Path) -> dict[str, Any] | None:
    """The compression config a safetensors file's metadata carries, or None for a plain file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(METADATA_KEY)
    return json.loads(text) if text else None


def save(tensors: dict[str, torch.Tensor], path: Path, sparse: bool = True) -> dict[str, Any] | None:
    """Write a safetensors file, in the bitmask layout when `sparse` and some weight is sparse enough; returns its
    compression config (None: plain layout)."""
    names = sparse_weight_names(tensors) if sparse else []
    config = compression_config(tensors, names) if names else None
    _write(tensors, names, config, path)
    return config


def _write(tensors: dict[str, torch.Tensor], names: list[str], config: dict[str, Any] | None, path: Path) -> None:
    """Write `tensors` with `names` stored sparse, then load the file back: it must give `tensors` exactly."""
    from safetensors.torch import load_file, save_file

    stored = compress(tensors, names) if names else tensors
    metadata = {"format": "pt", **({METADATA_KEY: json.dumps(config)} if config else {})}
    save_file({key: value.contiguous() for key, value in stored.items()}, str(path), metadata=metadata)
    loaded = load_file(str(path))
    back = decompress(loaded) if names else loaded
    if set(back) != set(tensors) or any(not torch.equal(back[key], tensors[key]) for key in tensors):
        raise JobFailure(ErrorCode.EXPORT_FAILED, f"{path.name} did not load back to identical weights")


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not names or not all(isinstance(name, str) and "/" not in name and "\\" not in name
                                and name.endswith(".safetensors") and (model_dir / name).is_file() for name in names):
            raise JobFailure(ErrorCode.MISSING_WEIGHTS, "model.safetensors.index.json must name .safetensors files "
                                                        "next to it")
        return [model_dir / name for name in names]
    return [model_dir / "model.safetensors"] if (model_dir / "model.safetensors").is_file() else []


def _rewrite_index(model_dir: Path, files: list[Path]) -> None:
    """A sharded directory's index names every stored tensor: the sparse parts replace the weights."""
    from safetensors import safe_open

    index_path = model_dir / "model.safetensors.index.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    weight_map = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            weight_map.update(dict.fromkeys(handle.keys(), path.name))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def sparsify_hf_dir(model_dir: Path) -> dict[str, Any] | None:
    """Rewrite a save_pretrained directory's weights in the bitmask layout when the model is sparse, and say so in
    config.json's `quantization_config` (where transformers and compressed-tensors look); None: left dense."""
    from safetensors.torch import load_file

    files = _weight_files(model_dir)
    shards = {path: load_file(str(path)) for path in files}
    everything = {key: value for tensors in shards.values() for key, value in tensors.items()}
    names = sparse_weight_names(everything)
    if not names:
        return None
    config = compression_config(everything, names)
    for path, tensors in shards.items():  # each shard's metadata carries the whole model's config
        _write(tensors, [name for name in names if name in tensors], config, path)
    _rewrite_index(model_dir, files)
    config_path = model_dir / "config.json"
    document = json.loads(config_path.read_text())
    document[METADATA_KEY] = config
    config_path.write_text(json.dumps(document, indent=2, sort_keys=True))
    return config


def _item_bytes(handle, key: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(handle.get_slice(key).get_dtype(), 4)


def densify_hf_dir(model_dir: Path, max_bytes: int) -> bool:
    """Turn a directory in the bitmask layout (a modelpress `hf` export) back into plain weights and drop its
    `quantization_config`, so it loads like any upload; False when it is not in that layout. The dense size is
    bounded from the headers (`max_bytes`) before anything is allocated."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config_path = model_dir / "config.json"
    try:
        document = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except ValueError:
        return False  # the loader reports bad JSON
    config = document.get(METADATA_KEY) if isinstance(document, dict) else None
    sparsity = config.get("sparsity_config") if isinstance(config, dict) else None
    if not (isinstance(sparsity, dict) and config.get("quant_method") == QUANT_METHOD
            and sparsity.get("format") == FORMAT and not config.get("config_groups")):
        return False
    files = _weight_files(model_dir)
    dense_bytes = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            for key in keys:
                shape = handle.get_slice(key).get_shape()
                values = f"{key.removesuffix('.bitmask')}.compressed"
                if key.endswith(".bitmask") and len(shape) == 2 and values in keys:  # up to 8 columns a byte
                    dense_bytes += shape[0] * shape[1] * 8 * _item_bytes(handle, values)
                elif not key.endswith(".compressed"):
                    dense_bytes += math.prod(shape) * _item_bytes(handle, key)
    if dense_bytes > max_bytes:
        raise JobFailure(ErrorCode.ARCHIVE_TOO_LARGE, f"the sparse weights could unpack to {dense_bytes} bytes, "
                                                      f"over the limit of {max_bytes}")
    for path in files:
        try:
            dense = decompress(load_file(str(path)))
        except ValueError as exc:
            raise JobFailure(ErrorCode.INVALID_MODEL, f"{path.name}: {exc}") from None
        save_file(dense, str(path), metadata={"format": "pt"})
    _rewrite_index(model_dir, files)
    del document[METADATA_KEY]
    config_path.write_text(json.dumps(document, indent=2, sort_keys=True))
    return True
