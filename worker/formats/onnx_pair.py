"""An encoder-decoder model as ONNX: one zip holding two graphs and how to run them.

    encoder.onnx  input_ids, attention_mask -> last_hidden_state
    decoder.onnx  decoder_input_ids, encoder_hidden_states, encoder_attention_mask -> logits
    model.json    the graphs' inputs and outputs, the decoder start token, and the steps below
    README.md     the same, for a person

The decoder has no KV cache: each generation step runs it on the whole decoder sequence so far. The pipeline
measures and delivers the zip as one model file: its size is the two graphs' (stored, not deflated), a forward pass
is the encoder then the decoder, and its output is the decoder's logits.
"""

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from app.core.errors import ErrorCode
from worker.errors import JobFailure
from worker.formats.onnx_format import count_params
from worker.runtime import ort_session, run_onnx

ENCODER, DECODER, MANIFEST, README = "encoder.onnx", "decoder.onnx", "model.json", "README.md"
ENCODER_INPUTS = ["input_ids", "attention_mask"]
DECODER_INPUTS = ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"]
HOW_TO_RUN = [
    "hidden = encoder.run(None, {'input_ids': ids, 'attention_mask': mask})[0]",
    ("logits = decoder.run(None, {'decoder_input_ids': decoder_ids, 'encoder_hidden_states': hidden, "
     "'encoder_attention_mask': mask})[0]"),
    ("greedy generation: decoder_ids starts as [[tokens.decoder_start_token_id]]; append argmax(logits[:, -1]) "
     "and run the decoder again (no KV cache: the whole decoder sequence each step) until tokens.eos_token_id"),
]


def is_pair(path: Path | None) -> bool:
    return path is not None and path.suffix == ".zip"


def write_pair(encoder: Path, decoder: Path, path: Path, tokens: dict[str, Any], output: str = "logits") -> Path:
    """`tokens`: decoder_start_token_id and eos_token_id, for generation."""
    document = {"format": "onnx-encoder-decoder", "encoder": {"file": ENCODER, "inputs": ENCODER_INPUTS,
                                                              "outputs": ["last_hidden_state"]},
                "decoder": {"file": DECODER, "inputs": DECODER_INPUTS, "outputs": [output]}, "kv_cache": False,
                "tokens": tokens, "how_to_run": HOW_TO_RUN}
    readme = "\n".join(["# Encoder-decoder model as two ONNX graphs", "",
                        "Run with ONNX Runtime (`sess = onnxruntime.InferenceSession(path)`):", "",
                        *(f"    {line}" for line in HOW_TO_RUN), "", "Details: model.json.", ""])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.write(encoder, ENCODER)
        archive.write(decoder, DECODER)
        archive.writestr(MANIFEST, json.dumps(document, indent=2))
        archive.writestr(README, readme)
    return path


def unpack(path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The graphs extracted beside the zip (a folder named after it) and the manifest."""
    folder = path.with_name(f"{path.stem}-graphs")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    with zipfile.ZipFile(path) as archive:
        for name in (ENCODER, DECODER):
            with archive.open(name) as source, open(folder / name, "wb") as target:
                shutil.copyfileobj(source, target)
        manifest = json.loads(archive.read(MANIFEST))
    return folder / ENCODER, folder / DECODER, manifest


def map_graphs(source: Path, output: Path, transform: Callable[[Path, Path], dict]) -> dict[str, Any]:
    """Apply `transform(graph, new_graph) -> details` to the encoder and the decoder; the result is a new pair.
    Details come back per graph."""
    encoder, decoder, manifest = unpack(source)
    details = {}
    new = {}
    for role, graph in (("encoder", encoder), ("decoder", decoder)):
        new[role] = graph.with_name(f"{graph.stem}-new.onnx")
        details[role] = transform(graph, new[role])
    write_pair(new["encoder"], new["decoder"], output, manifest["tokens"], manifest["decoder"]["outputs"][0])
    return details


def count_pair_params(path: Path) -> tuple[int, int]:
    totals = [0, 0]
    with zipfile.ZipFile(path) as archive:
        for name in (ENCODER, DECODER):
            params, nonzero = count_params(onnx.load_from_string(archive.read(name)))
            totals[0] += params
            totals[1] += nonzero
    return totals[0], totals[1]


def open_pair(path: Path, device: str, threads: int) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """feeds [input_ids, attention_mask, decoder_input_ids] -> [logits]: the encoder, then the decoder."""
    encoder_path, decoder_path, _ = unpack(path)
    try:
        encoder = ort_session(encoder_path, device, threads)
        decoder = ort_session(decoder_path, device, threads)
    except Exception as exc:
        raise JobFailure(ErrorCode.EXPORT_FAILED, f"ONNX Runtime cannot open the encoder-decoder graphs: "
                                                  f"{exc.__class__.__name__}: {str(exc)[:300]}") from None

    def run(feeds: list[np.ndarray]) -> list[np.ndarray]:
        input_ids, attention_mask, decoder_input_ids = feeds
        (hidden,) = run_onnx(encoder, [input_ids, attention_mask])
        return run_onnx(decoder, [decoder_input_ids, hidden, attention_mask])

    return run
