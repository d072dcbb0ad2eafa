"""What the sandbox costs: a request run in a fresh sandboxed child (forked from the worker's fork server)
against the same work done in the worker process itself, on a small ONNX model. Prints a table.

    .venv/bin/python bench/sandbox_bench.py [--runs 20]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.config import Settings  # noqa: E402
from tests.helpers import save_onnx  # noqa: E402
from worker import formats, sandbox  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp())
    workdir = home / "work" / "bench"
    workdir.mkdir(parents=True)
    model = save_onnx(workdir / "m.onnx", 256, 1024, 10)
    settings = Settings(home=home)

    started = time.perf_counter()
    outcome = sandbox.run(sandbox.request(settings, "inspect", workdir, model=(model, "onnx")), wall_seconds=120)
    cold = time.perf_counter() - started
    assert outcome.code is None, outcome
    warm, direct = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        sandbox.run(sandbox.request(settings, "inspect", workdir, model=(model, "onnx")), wall_seconds=120)
        warm.append(time.perf_counter() - started)
        started = time.perf_counter()
        formats.inspect(model, "onnx", workdir)
        direct.append(time.perf_counter() - started)
    print("| inspection of a 1 MB ONNX model | median | p95 |")
    print("| --- | --- | --- |")
    print(f"| first request of a worker process (starts the fork server) | {cold * 1000:.0f} ms | |")
    for name, times in (("sandboxed child, fork server warm", warm), ("in the worker process itself", direct)):
        ordered = sorted(times)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        print(f"| {name} | {statistics.median(times) * 1000:.0f} ms | {p95 * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
