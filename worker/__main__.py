"""`python -m worker --queues cpu,gpu --concurrency N`: a Celery worker process (`modelpress worker` and
`modelpress serve` start this, so the command-line module never imports the worker or torch)."""

import argparse
import ctypes
import os
import sys

from app.core.queue import Queue

PR_SET_DUMPABLE = 4


def celery_argv(queues: list[str], concurrency: int) -> list[str]:
    names = ",".join(queues)
    return ["worker", "-Q", names, "--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", "INFO",
            "-n", f"{names.replace(',', '-')}-{os.getpid()}@%h"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--queues", default=Queue.CPU.value)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    queues = Queue.parse_list(args.queues)
    if Queue.GPU in queues:
        import torch

        if not torch.cuda.is_available():
            print("error: --queues gpu needs a CUDA device, and torch sees none on this machine; "
                  "GPU jobs must never run on CPU, so this worker will not start", file=sys.stderr)
            return 2
    # The job slots share the sandbox's memory (Settings.worker_concurrency); and the worker's memory and
    # environment, which hold the service's credentials, cannot be read by other processes of its user.
    os.environ["MODELPRESS_WORKER_CONCURRENCY"] = str(args.concurrency)
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0)
    from worker.celery_app import celery

    celery.worker_main(celery_argv(queues, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
