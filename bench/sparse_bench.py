"""Sparse files and recovery after pruning on all-MiniLM-L6-v2, through the worker's own pipeline.

Sizes: the `safetensors` export of a pruned model (compressed-tensors' sparse-bitmask layout) against
`safetensors-dense` (the plain layout), at 50% unstructured and 2:4 activation-aware pruning, with the gzip
size of each for reference (what a transport encoding would add). The `hf` export's zip is listed too.

Recovery (`--recovery`): activation-aware 50% pruning, then `distill` with `student: {current: true}` on
unlabelled sentences (the upload as teacher, masks kept), then int8; the embedding cosine (mean-pooled over
real tokens, against the fp32 original on held-out sentences) after each step. Kept short for a shared
2-core machine: the conditions are printed with the table.

    .venv/bin/python bench/sparse_bench.py [--recovery] [--train 300] [--epochs 1] [--lr 1e-4]
"""

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression_bench import MASK, Quiet, embedding_fidelity, model_archive, sentences  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.core.recipe import Recipe, Target  # noqa: E402
from worker.evaluation import data as job_data  # noqa: E402
from worker.formats import load  # noqa: E402
from worker.pipeline.files import StagedJob  # noqa: E402
from worker.pipeline.runner import run_pipeline  # noqa: E402
from worker.runtime import open_runner  # noqa: E402

EXPORTS = {"op": "export", "formats": ["safetensors", "safetensors-dense", "hf"]}
PRUNINGS = {"50% unstructured": {"op": "prune", "method": "activation_aware", "sparsity": 0.5},
            "2:4": {"op": "prune", "method": "activation_aware", "pattern": "2:4"}}


def gzipped_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=6))


def pruned_weights_ratio(sparse: Path) -> float:
    """Stored bytes of the weights kept in the bitmask layout over their dense fp32 bytes (the rest of the file,
    embeddings and LayerNorms, is not pruned and stays dense)."""
    from safetensors import safe_open

    stored = dense = 0
    with safe_open(str(sparse), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith((".compressed", ".bitmask", ".row_offsets", ".shape")):
                tensor = handle.get_tensor(key)
                stored += tensor.numel() * tensor.element_size()
                if key.endswith(".shape"):
                    dense += int(tensor.prod()) * 4
    return stored / dense


def job(name: str, steps: list[dict], archive: Path, files: dict, work: Path, settings: Settings):
    jobdir = work / name.replace(" ", "-").replace("%", "").replace(":", "-")
    jobdir.mkdir()
    staged = StagedJob(recipe=Recipe.model_validate({"steps": steps}), tune=None, target=Target(),
                       model_path=archive, model_format="hf", model_name="all-MiniLM-L6-v2", dataset_files=files)
    started = time.perf_counter()
    result = run_pipeline(staged, jobdir, settings, Quiet())
    return result, jobdir, time.perf_counter() - started


def sizes(archive: Path, files: dict, work: Path, settings: Settings) -> None:
    print("\n| pruning | dense safetensors MB | bitmask safetensors MB | ratio | pruned weights ratio | gzip dense MB "
          "| gzip bitmask MB | hf zip MB | layout |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, prune in PRUNINGS.items():
        result, _, _ = job(name, [prune, EXPORTS], archive, files, work, settings)
        paths = {output.format: output.path for output in result.outputs}
        dense, sparse = paths["safetensors-dense"], paths["safetensors"]
        layout = result.metrics["exports"]["safetensors"]
        print(f"| {name} | {dense.stat().st_size / 1e6:.2f} | {sparse.stat().st_size / 1e6:.2f} | "
              f"{sparse.stat().st_size / dense.stat().st_size:.3f} | {pruned_weights_ratio(sparse):.3f} | "
              f"{gzipped_size(dense) / 1e6:.2f} | "
              f"{gzipped_size(sparse) / 1e6:.2f} | {paths['hf'].stat().st_size / 1e6:.2f} | "
              f"{layout['layout']} {layout['sparsity_structure']}, {layout['sparse_weights']} weights |")


def recovery(archive: Path, files: dict, work: Path, settings: Settings, args) -> None:
    steps = [PRUNINGS["50% unstructured"],
             {"op": "distill", "student": {"current": True}, "alpha": 1.0, "epochs": args.epochs, "lr": args.lr,
              "batch_size": 16},
             {"op": "quantize"}]
    result, jobdir, seconds = job("recovery", steps, archive, files, work, settings)
    loaded = load(archive, "hf", work / "loaded")
    assert [i["name"] for i in loaded.inputs][MASK] == "attention_mask"
    batches = job_data.prepare(loaded, files).eval_batches
    reference = [loaded.reference(b, "cpu")[0] for b in batches]
    print(f"\nrecovery: {args.train} unlabelled train sentences, {args.epochs} epoch(s), lr {args.lr}, batch 16, "
          f"{settings.eval_threads} thread(s); embedding cosine on 64 held-out sentences; job {seconds:.0f}s")
    print("| after step | hidden cos (job) | emb cos mean | emb cos min | seconds |")
    print("|---|---|---|---|---|")
    for index, record in enumerate(result.metrics["steps"]):
        if "fidelity" not in record:
            continue
        run = open_runner(jobdir / f"after-step{index}.onnx", "onnxruntime", "cpu", settings.eval_threads)
        mean, low = embedding_fidelity(reference, [run(b) for b in batches], batches)
        label = f"{index}: {record['op']}" + (" (current)" if record["op"] == "distill" else "")
        print(f"| {label} | {record['fidelity']['cosine_mean']:.4f} | {mean:.4f} | {low:.4f} | "
              f"{record['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recovery", action="store_true", help="also prune 50%%, recover and quantize")
    parser.add_argument("--train", type=int, default=300, help="unlabelled train sentences for recovery")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="modelpress-sparse-bench-"))
    settings = Settings(home=work / "home", latency_runs=3, latency_warmup=1, eval_threads=args.threads)
    archive = model_archive(work)
    for role, seed, count in (("eval", 0, 64), ("calibration", 1, 128), ("train", 2, args.train)):
        with open(work / f"{role}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in sentences(count, seed))
    files = {role: (work / f"{role}.jsonl", "jsonl") for role in ("eval", "calibration")}
    print("all-MiniLM-L6-v2 (22.7M params, fp32); activation-aware pruning calibrated on 128 sentences")
    sizes(archive, files, work, settings)
    if args.recovery:
        recovery(archive, {**files, "train": (work / "train.jsonl", "jsonl")}, work, settings, args)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
