"""The worker's torch path on a CUDA device, ready to run on a lent GPU machine as it is.

Needs only torch and numpy (and onnxruntime for the provider check): no database, broker or settings - it imports
the compression functions alone, which take plain arguments. On each variant of an MLP it measures latency on
the device (p50 of 50 runs after warm-up, synchronised) and the output cosine against the fp32 model on the CPU;
then a short distillation on the device; then whether ONNX Runtime has a CUDA provider. Without CUDA it runs the
same on the CPU and says so, so the script itself is tested here.

    python3 bench/gpu_check.py [--json OUT.json]        # on the device machine: plain python3, from the repo root
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.compression.quantize import quantize_module  # noqa: E402
from worker.compression.train import TrainConfig, TrainData, distill  # noqa: E402

VARIANTS = {
    "fp32": None,
    "fp16 cast": {"method": "dynamic", "dtype": "fp16"},
    "bf16 cast": {"method": "dynamic", "dtype": "bf16"},
    "int8 dynamic": {"method": "dynamic", "dtype": "int8"},
    "int8 weight-only": {"method": "weight_only", "dtype": "int8"},
    "int4 weight-only g128": {"method": "weight_only", "dtype": "int4", "granularity": "group", "group_size": 128},
}


def mlp(*sizes: int, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def latency_ms(module: torch.nn.Module, x: torch.Tensor, device: str, runs: int = 50) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(5):
            module(x)
        sync()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            module(x)
            sync()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "no CUDA device: the CPU stands in"
    report: dict = {"device": device, "device_name": name, "torch": torch.__version__, "variants": {}}
    print(f"torch {torch.__version__} on {device} ({name})")

    base = mlp(1024, 4096, 4096, 1024)
    x = torch.randn(256, 1024)
    with torch.no_grad():
        reference = base(x)
    print("| variant | p50 ms | cosine vs fp32 on CPU |")
    print("| --- | --- | --- |")
    for label, options in VARIANTS.items():
        try:
            model = copy.deepcopy(base)
            if options is not None:
                model, _ = quantize_module(model, method=options["method"], dtype=options["dtype"],
                                           granularity=options.get("granularity", "per_channel"),
                                           group_size=options.get("group_size"), exclude=[])
            model = model.to(device)
            on_device = x.to(device)
            with torch.no_grad():
                result = {"p50_ms": round(latency_ms(model, on_device, device), 4),
                          "cosine": round(cosine(model(on_device), reference), 6)}
        except Exception as exc:  # a variant the device cannot run is reported, not fatal
            result = {"error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
        report["variants"][label] = result
        print(f"| {label} | {result.get('p50_ms', '-')} | {result.get('cosine', result.get('error'))} |")

    teacher, student = mlp(64, 512, 10, seed=1), mlp(64, 64, 10, seed=2)
    inputs = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
    started = time.perf_counter()
    try:
        result = distill(teacher.to(device), student.to(device), TrainData([inputs], None), None,
                         TrainConfig(epochs=2, lr=1e-3, batch_size=256, alpha=1.0), device=device)
        report["distillation"] = {"seconds": round(time.perf_counter() - started, 3),
                                  "train_loss": [round(e["train_loss"], 5) for e in result.history]}
    except Exception as exc:
        report["distillation"] = {"error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
    print(f"distillation (2 epochs, 4096 samples) on {device}: {report['distillation']}")

    try:
        import onnxruntime as ort

        report["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        report["onnxruntime_providers"] = None
    print(f"ONNX Runtime providers: {report['onnxruntime_providers']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
