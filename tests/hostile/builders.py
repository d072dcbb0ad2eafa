"""Hostile files made inside the tests: payload pickles, archives, a minimal Hugging Face directory."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_bytes

TINY_CONFIG = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 100, "hidden_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


class WritesMarker:
    """Unpickling this calls open(path, "w"), which creates the marker file: proof that the payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def hf_files(config: dict | None = None) -> dict[str, bytes]:
    """What save_pretrained writes, at its smallest: the worker refuses every attack before it needs real weights."""
    return {"config.json": json.dumps(TINY_CONFIG if config is None else config).encode(),
            "model.safetensors": safetensors_bytes({"embeddings.weight": np.zeros((4, 4), np.float32)})}


def zip_bytes(entries: list[tuple[str | zipfile.ZipInfo, bytes]],
              compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(entries: list[tuple[str | tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in entries:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def hf_zip(files: dict[str, bytes], top: str = "model") -> bytes:
    return zip_bytes([(f"{top}/{name}", data) for name, data in files.items()])


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` with its content, to compare before and after an attack."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            entries[name] = f"link -> {path.readlink()}"
        elif path.is_dir():
            entries[name] = "folder"
        else:
            entries[name] = path.read_bytes()
    return entries
