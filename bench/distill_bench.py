"""Teacher vs distilled student vs student from scratch, through the service's HTTP API.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download). A teacher MLP
is trained here, uploaded as a torch.export archive with train and eval datasets, and then the service:
  1. distils it into a narrower student derived from the teacher (`shrink.width`),
  2. distils it into an uploaded randomly initialised student (soft + hard targets),
  3. trains that same student from the same init on hard labels only (`alpha: 0`): the from-scratch control,
  4. prunes the teacher 50% and fine-tunes it (masks kept), then quantizes to int8,
  5. tunes a recipe for the smallest model within 1% accuracy loss.
It prints accuracy, size and latency for each, all measured by the service's own reports.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/distill_bench.py                 # starts `modelpress serve` in a temp folder
    .venv/bin/python bench/distill_bench.py --url http://127.0.0.1:8000 --key mp_...   # an existing service
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

HIDDEN, STUDENT_HIDDEN = 256, 32


def mlp(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:300], y[:300]), (x[300:1300], y[300:1300]), (x[1300:], y[1300:])  # small labelled train set


def train_teacher(x, y) -> torch.nn.Module:
    model = mlp(HIDDEN, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    return model.eval()


def export(model: torch.nn.Module, path: Path) -> Path:
    torch.export.save(torch.export.export(model, (torch.zeros(16, 64),)), str(path))
    return path


def start_service(home: Path) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "100"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env,
                            stdout=open(home.parent / "serve.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, (home / "api_key").read_text().strip()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"the service did not start; see {home.parent / 'serve.log'}")


def upload(client: httpx.Client, route: str, path: Path) -> str:
    with open(path, "rb") as fh:
        response = client.post(route, files={"file": (path.name, fh)})
    response.raise_for_status()
    return response.json()["id"]


def run_job(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 201:
        sys.exit(f"job refused: {response.text}")
    job_id = response.json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    if job["status"] != "succeeded":
        sys.exit(f"job {job_id} {job['status']}: {job['error']}")
    return job["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--key")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelpress-distill-"))
    (train_x, train_y), (unlabelled_x, _), (test_x, test_y) = digits()
    teacher = train_teacher(train_x, train_y)
    proc = None
    if args.url:
        url, key = args.url, args.key
    else:
        proc, url, key = start_service(work / "home")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    try:
        teacher_id = upload(client, "/v1/models", export(teacher, work / "teacher.pt2"))
        student_id = upload(client, "/v1/models", export(mlp(STUDENT_HIDDEN, seed=1), work / "student.pt2"))
        np.savez(work / "train.npz", x=train_x, labels=train_y)
        np.savez(work / "eval.npz", x=test_x, labels=test_y)
        # Distillation may also use unlabelled data: soft targets need no labels (alpha = 1 on this set).
        np.savez(work / "transfer.npz", x=np.concatenate([train_x, unlabelled_x]))
        train_id, eval_id = upload(client, "/v1/datasets", work / "train.npz"), upload(client, "/v1/datasets",
                                                                                       work / "eval.npz")
        transfer_id = upload(client, "/v1/datasets", work / "transfer.npz")
        labelled = {"train": train_id, "eval": eval_id}
        training = {"epochs": args.epochs, "lr": 3e-3, "batch_size": 32}
        runs = {
            "teacher (fp32, 2x256 hidden)": ({"steps": [{"op": "analyze"}]}, labelled),
            "student from scratch: hard labels only": (
                {"steps": [{"op": "distill", "student": {"model_id": student_id}, "alpha": 0.0, **training}]},
                labelled),
            "student distilled: soft + hard (alpha 0.5, T 4)": (
                {"steps": [{"op": "distill", "student": {"model_id": student_id}, "alpha": 0.5, "temperature": 4.0,
                            **training}]}, labelled),
            "student distilled: soft only, + unlabelled data": (
                {"steps": [{"op": "distill", "student": {"model_id": student_id}, "alpha": 1.0, "temperature": 4.0,
                            **training}]}, {"train": transfer_id, "eval": eval_id}),
            "student from teacher (width 1/8), distilled + int8": (
                {"steps": [{"op": "distill", "student": {"shrink": {"width": 0.125}}, "alpha": 1.0,
                            "temperature": 4.0, **training}, {"op": "quantize"}]},
                {"train": transfer_id, "eval": eval_id}),
            "teacher pruned 50% + fine-tuned + int8": (
                {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5},
                           {"op": "finetune", "epochs": 10, "lr": 1e-3}, {"op": "quantize"}]}, labelled),
        }
        rows = []
        for name, (recipe, datasets) in runs.items():
            metrics = run_job(client, {"model_id": teacher_id, "recipe": recipe, "datasets": datasets})
            figures = metrics["baseline"] if name.startswith("teacher (") else metrics["compressed"]
            rows.append((name, figures))
            print(f"done: {name}", file=sys.stderr, flush=True)
        tuned = run_job(client, {"model_id": teacher_id, "datasets": labelled,
                                 "tune": {"metric": "accuracy", "max_loss": 0.01, "objective": "size",
                                          "max_trials": 6}})
        rows.append((f"tuned: smallest within 1% ({len(tuned['tuning']['trials'])} trials)", tuned["compressed"]))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"\ndigits (scikit-learn), {len(train_y)} labelled training samples, {len(test_y)} test samples; "
          "accuracy, size and latency (batch 16, ONNX Runtime, 1 thread) from the service's reports")
    print(f"| {'model':52} | accuracy | size KB | params | p50 ms |")
    print(f"|{'-' * 54}|----------|---------|--------|--------|")
    for name, f in rows:
        print(f"| {name:52} | {f['accuracy']:8.4f} | {f['size_bytes'] / 1e3:7.1f} | {f['params']:6d} | "
              f"{f['latency_ms']['p50']:6.3f} |")
    print(f"\ntuning: {tuned['tuning']['message']}; chosen recipe: {tuned['recipe']}")


if __name__ == "__main__":
    main()
