"""Checks of Hugging Face model archives (a zip or tar(.gz) of a save_pretrained directory) without extracting
them: layout, config.json, weights, and no custom code (auto_map, trust_remote_code), which would run.

Pure stdlib (the API process imports it, and the worker shares remote_code_reason and the size limits); it
never imports torch, onnx or numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.core.errors import ErrorCode
from app.core.vetting import archives
from app.core.vetting.refusals import UnsupportedModelFile

# config.json and tokenizer_config.json are read whole at upload; real ones are a few kilobytes.
MAX_CONFIG_BYTES = 1024 * 1024
# A Hugging Face archive may unpack to this many times the upload limit (safetensors hardly compress). The API
# checks the declared sizes against it at upload, the worker the bytes it really writes.
UNPACK_FACTOR = 4

# Weights a Hugging Face directory may hold; the worker loads a pytorch_model.bin only if it is a plain
# state dict (torch.load with weights_only=True).
_SAFETENSORS_SUFFIX = ".safetensors"
_PICKLED_WEIGHTS = "pytorch_model.bin"


def vet_hf(
    path: Path, subject: str = "the archive", *, max_unpacked_bytes: int = archives.DEFAULT_MAX_TOTAL_BYTES
) -> None:
    """Check a Hugging Face model archive without extracting it.

    The listing must pass the archive safety rules, config.json must sit at the model root and parse, weights
    must be there, and nothing may ask for custom code (auto_map, trust_remote_code): that code would run.
    """
    try:
        listing = archives.list_archive(path, max_total_bytes=max_unpacked_bytes)
    except archives.ArchiveError as exc:
        raise UnsupportedModelFile(exc.code, f"{subject}: {exc.message}") from None
    if "config.json" not in listing.files:
        raise UnsupportedModelFile(
            ErrorCode.MISSING_CONFIG,
            f"{subject} has no config.json at its top level (or in its single top-level folder); a Hugging "
            "Face model archive holds the model directory written by save_pretrained",
        )
    top_level = [name for name in listing.files if "/" not in name]
    if not any(name.endswith(_SAFETENSORS_SUFFIX) for name in top_level) and _PICKLED_WEIGHTS not in top_level:
        raise UnsupportedModelFile(
            ErrorCode.MISSING_WEIGHTS,
            f"{subject} has no weights next to config.json: expected model.safetensors (or sharded "
            "*.safetensors with model.safetensors.index.json)",
        )
    for name in ("config.json", "tokenizer_config.json"):
        if name in listing.files:
            reason = remote_code_reason(_read_json_member(path, listing, name, subject))
            if reason:
                raise UnsupportedModelFile(
                    ErrorCode.REMOTE_CODE_REFUSED,
                    f"{subject}: {name} {reason}, which means running code shipped with the model; that is "
                    "never done here. Upload a model whose architecture is built into transformers",
                )


def remote_code_reason(document: object) -> str | None:
    """Why a config would make transformers import code from the model directory, or None.

    Nested configs (text_config, ...) count too; walked with a list, not recursion, so depth cannot crash it.
    Shared with the worker, which checks the extracted files again before loading anything.
    """
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "auto_map" in item:
                return "sets auto_map (custom model classes)"
            if item.get("trust_remote_code") is True:
                return "sets trust_remote_code"
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def _read_json_member(path: Path, listing: archives.ArchiveListing, name: str, subject: str) -> dict[str, object]:
    try:
        data = archives.read_member(path, listing.member(name), max_bytes=MAX_CONFIG_BYTES)
    except archives.ArchiveError as exc:
        raise UnsupportedModelFile(exc.code, f"{subject}: {exc.message}") from None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UnsupportedModelFile(ErrorCode.INVALID_CONFIG, f"{subject}: {name} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise UnsupportedModelFile(ErrorCode.INVALID_CONFIG, f"{subject}: {name} is not a JSON object")
    return document
