"""Default int8 (`quantize.method: auto`) on convolutional nets against fp32 and against dynamic int8 (the
default before `auto`), through the worker's own code path: normalize, then auto_int8 on generated batches, as the
quantize step runs them. Prints a markdown table (docs/benchmarks.md).

Nets: a ResNet-style CNN (3x3 conv blocks 64-128-256 with BN+ReLU and residual adds) and a MobileNet-style one
(depthwise separable blocks with BN+ReLU6), built here in torch and exported to ONNX; with --ocr, the three
PaddleOCR models shipped inside the rapidocr-onnxruntime wheel (`pip download --no-deps rapidocr-onnxruntime`;
opset 11/12, Constant-node weights), read from the wheel file.

The final figures are timed in one process, fp32 / auto int8 / dynamic int8 interleaved round after round, and
reported as medians (the machine is shared: interleaving makes a busy spell slow all three alike).

    .venv/bin/python bench/cnn_int8_bench.py [--size 112] [--batches 1 8] [--rounds 15] [--ocr rapidocr.whl]
"""

import argparse
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from worker.compression import int8_auto, normalize
from worker.compression.quantize import onnx_dynamic_int8
from worker.evaluation.measure import fidelity
from worker.runtime import open_runner

OCR_MODELS = {"ch_ppocr_mobile_v2.0_cls_infer.onnx": ("OCR angle classifier", (3, 48, 192)),
              "ch_PP-OCRv4_rec_infer.onnx": ("OCR recognizer", (3, 48, 320)),
              "ch_PP-OCRv4_det_infer.onnx": ("OCR detector", (3, 320, 320))}


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         Residual(64, 64, 1), Residual(64, 64, 1), Residual(64, 128, 2), Residual(128, 128, 1),
                         Residual(128, 256, 2), Residual(256, 256, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 100))


def separable(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


def mobilenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                         separable(32, 64, 1), separable(64, 128, 2), separable(128, 128, 1),
                         separable(128, 256, 2), separable(256, 256, 1), separable(256, 512, 2),
                         separable(512, 512, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 100))


def export(module: nn.Module, size: int, path: Path) -> Path:
    """As a user's exporter would (BatchNorm statistics made non-trivial first, so folding them matters)."""
    torch.manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.1, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
            layer.weight.data.uniform_(0.5, 1.5)
    torch.onnx.export(module.eval(), (torch.randn(1, 3, size, size),), str(path), opset_version=13, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


def interleaved(paths: list[Path], feeds: list[np.ndarray], threads: int, rounds: int) -> list[float]:
    """Median ms per model over `rounds` rounds of 3 runs each, the models taking turns."""
    runners = [open_runner(p, "onnxruntime", "cpu", threads) for p in paths]
    for run in runners:
        run(feeds)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for run, bucket in zip(runners, times):
            for _ in range(3):
                start = time.perf_counter()
                run(feeds)
                bucket.append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


def bench(name: str, source: Path, shape: tuple[int, ...], batch: int, args, folder: Path, low: float) -> list[str]:
    rng = np.random.default_rng(0)
    batches = [[rng.uniform(low, 1.0, (batch, *shape)).astype(np.float32)] for _ in range(4)]
    work = folder / f"{source.stem}-b{batch}"
    work.mkdir()
    normalized, normalization = normalize.normalize(source, work / "normalized.onnx", batches)
    auto = work / "auto.onnx"
    started = time.perf_counter()
    details = int8_auto.auto_int8(normalized, auto, granularity="per_channel", exclude=[],
                                  calibration_method="minmax", calibration=None, eval_batches=batches,
                                  eval_inputs="generated", threads=args.threads, warmup=3, runs=30)
    seconds = time.perf_counter() - started
    dynamic = work / "dynamic.onnx"
    onnx_dynamic_int8(normalized, dynamic, granularity="per_channel", exclude=[])
    fp32_ms, auto_ms, dynamic_ms = interleaved([normalized, auto, dynamic], batches[0], args.threads,
                                               args.rounds)
    reference = int8_auto.outputs_of(normalized, batches, 1)
    cosine = [fidelity(reference, int8_auto.outputs_of(p, batches, 1))["cosine_mean"] for p in (auto, dynamic)]
    size = source.stat().st_size
    kept = details["chosen"].get("kept_in_float", {})
    in_float = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in kept.items() if isinstance(v, list) and v)
    tried = " / ".join(f"{c['name']} {c['speedup']:.2f}x {c['cosine']:.4f}" if "speedup" in c else
                       f"{c['name']} failed" for c in details["candidates"])
    normalized_what = "opset {from}->{to}".format(**normalization["opset"]) + (
        f", {normalization['constants_to_initializers']} Constants" if normalization["constants_to_initializers"]
        else "")
    return [f"| {name} | {batch} | {fp32_ms:.2f} | {auto_ms:.2f} | **{fp32_ms / auto_ms:.2f}x** | {cosine[0]:.4f} "
            f"| {auto.stat().st_size / size:.2f} | {details['kept']} | {in_float or '-'} | {fp32_ms / dynamic_ms:.2f}x "
            f"| {cosine[1]:.4f} | {tried} | {normalized_what} | {seconds:.0f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112, help="image side of the built nets")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ocr", type=Path, help="the rapidocr-onnxruntime wheel")
    args = parser.parse_args()
    rows = ["| model | batch | fp32 ms | int8 auto ms | speedup | cosine | size | kept | left in float "
            "| dynamic int8 speedup | dynamic cosine | candidates tried (speedup, cosine) | normalized | auto s |",
            "|" + " --- |" * 14]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        nets = [(f"ResNet-style {args.size}x{args.size}", export(resnet(), args.size, folder / "resnet.onnx")),
                (f"MobileNet-style {args.size}x{args.size}", export(mobilenet(), args.size, folder / "mobilenet.onnx"))]
        for name, path in nets:
            for batch in args.batches:
                rows += bench(name, path, (3, args.size, args.size), batch, args, folder, 0.0)
                print(rows[-1], flush=True)
        if args.ocr:
            with zipfile.ZipFile(args.ocr) as wheel:
                for member in wheel.namelist():
                    filename = Path(member).name
                    if filename in OCR_MODELS:
                        label, shape = OCR_MODELS[filename]
                        path = folder / filename
                        path.write_bytes(wheel.read(member))
                        rows += bench(label, path, shape, 1, args, folder, -1.0)
                        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
