"""Faster students of all-MiniLM-L6-v2 trained on unlabelled sentences, through the worker's own pipeline, against
ONNX Runtime's own int8 of the original model.

Rows: ONNX Runtime's `quantize_dynamic` (per-channel int8) of the job's fp32 ONNX export (the reference), the
preset `fast-encoder` (4 of the 6 layers and half the feed-forward neurons, ranked by activations on the train
sentences, distilled with early stopping, then int8), the same student with every layer, and activation-aware
50% pruning recovered by `distill` current, then int8. Latency (one batch of 16 held-out sentences, padded to
the longest) and the embedding cosine (mean-pooled over real tokens, against the fp32 original) are measured
here on the same held-out sentences for every row; `speed` is the reference's p50 over the row's. The sentences are
built from templates (bench/compression_bench.py), so train and held-out sentences are alike: a best case for recovery.

    .venv/bin/python bench/student_bench.py [--train 2000] [--epochs 8] [--threads 2] [--only fast]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression_bench import MASK, Quiet, delivered_file, embedding_fidelity, model_archive, sentences  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.core.presets import preset_recipe  # noqa: E402
from app.core.recipe import Recipe, Target  # noqa: E402
from worker.evaluation import data as job_data  # noqa: E402
from worker.evaluation import measure  # noqa: E402
from worker.formats import load  # noqa: E402
from worker.pipeline.files import StagedJob  # noqa: E402
from worker.pipeline.runner import run_pipeline  # noqa: E402


def pipelines(epochs: int) -> dict[str, list[dict]]:
    fast = preset_recipe("fast-encoder").model_dump(mode="json", exclude_unset=True)["steps"]
    fast[0]["epochs"] = epochs
    wide = json.loads(json.dumps(fast))
    del wide[0]["student"]["shrink"]["depth"]
    recovered = [{"op": "prune", "method": "activation_aware", "sparsity": 0.5},
                 {"op": "distill", "student": {"current": True}, "alpha": 1.0, "lr": 3e-4, "epochs": epochs,
                  "early_stopping": 2},
                 {"op": "quantize"}]
    return {"fast-encoder (depth 0.67, width 0.5)": fast, "student width 0.5, every layer": wide,
            "activation-aware 50% + recovery + int8": recovered}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=2000, help="unlabelled train sentences")
    parser.add_argument("--eval", type=int, default=300, help="held-out sentences for cosine and latency")
    parser.add_argument("--epochs", type=int, default=8, help="at most; early stopping may end sooner")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds over all rows")
    parser.add_argument("--only", default=None, help="run only the pipelines whose name contains this")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="modelpress-student-bench-"))
    settings = Settings(home=work / "home", latency_runs=20, latency_warmup=2, eval_threads=args.threads)
    archive = model_archive(work)
    for role, seed, count in (("eval", 0, args.eval), ("calibration", 1, 128), ("train", 2, args.train)):
        with open(work / f"{role}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in sentences(count, seed))
    files = {role: (work / f"{role}.jsonl", "jsonl") for role in ("eval", "calibration", "train")}
    loaded = load(archive, "hf", work / "loaded")
    assert [i["name"] for i in loaded.inputs][MASK] == "attention_mask"
    batches = job_data.prepare(loaded, files).eval_batches
    reference = [loaded.reference(b, "cpu")[0] for b in batches]

    from onnxruntime.quantization import QuantType, quantize_dynamic

    files_to_measure = []  # (name, model file, stopped epoch, job seconds)
    for name, steps in pipelines(args.epochs).items():
        if args.only and args.only not in name:
            continue
        jobdir = work / f"job{len(files_to_measure)}"
        jobdir.mkdir()
        staged = StagedJob(recipe=Recipe.model_validate({"steps": steps}), tune=None, target=Target(),
                           model_path=archive, model_format="hf", model_name="all-MiniLM-L6-v2", dataset_files=files)
        started = time.perf_counter()
        result = run_pipeline(staged, jobdir, settings, Quiet())
        seconds = time.perf_counter() - started
        if not files_to_measure:
            ort_int8 = work / "ort-int8.onnx"
            quantize_dynamic(str(jobdir / "baseline.onnx"), str(ort_int8), per_channel=True,
                             weight_type=QuantType.QInt8)
            files_to_measure.append(("ref: onnxruntime quantize_dynamic of the original", ort_int8, "", ""))
        distill = next(s for s in result.metrics["steps"] if s["op"] == "distill")["details"]
        stopped = f"{distill.get('early_stopping', {}).get('stopped_epoch')} (best {distill['best_epoch']})"
        files_to_measure.append((name, delivered_file(result.outputs[0].path, jobdir), stopped, f"{seconds:.0f}"))
        print(f"done: {name}", file=sys.stderr, flush=True)

    # Measured together after the jobs, in alternating rounds, so that load from elsewhere on the machine falls
    # on every row alike; the p50 is the median of the rounds' p50s.
    p50s = {name: [] for name, *_ in files_to_measure}
    cosines = {}
    for _ in range(args.rounds):
        for name, path, *_ in files_to_measure:
            latency, outputs = measure.measure_file(path, "onnxruntime", "cpu", args.threads, batches,
                                                    settings.latency_warmup, settings.latency_runs, lambda: None)
            p50s[name].append(latency["p50"])
            cosines[name] = embedding_fidelity(reference, outputs, batches)
    rows = [(name, path.stat().st_size, float(np.median(p50s[name])), *cosines[name], stopped, seconds)
            for name, path, stopped, seconds in files_to_measure]
    reference_p50 = rows[0][2]
    print(f"\nall-MiniLM-L6-v2; {args.train} unlabelled train sentences (a tenth held out for early stopping), at "
          f"most {args.epochs} epochs, {args.eval} held-out eval sentences, latency of one batch of 16 at "
          f"{args.threads} thread(s), median of {args.rounds} rounds")
    print("| pipeline | size MB | p50 ms | speed vs ORT int8 | emb cos mean | emb cos min | stopped epoch | job s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, p50, mean, low, stopped, seconds in rows:
        print(f"| {name} | {size / 1e6:.2f} | {p50:.2f} | {reference_p50 / p50:.2f}x | {mean:.4f} | {low:.4f} | "
              f"{stopped} | {seconds} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
