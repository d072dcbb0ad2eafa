"""The `modelpress` command. The client's commands (compress, models, datasets, jobs, report) are here and need only
the base install; the server's (serve, api, worker, migrate, keys) are handed to app.cli, imported only then.

Exit codes: 0 done; 1 the work failed (a job failed or was cancelled, a model was found invalid, a wait timed out);
2 a usage error or a request the service refused; 3 the service could not be reached or is unavailable; 130
interrupted."""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from modelpress import config
from modelpress.client import Client
from modelpress.display import JobFollower, error_console, human_size, print_table, report_rows, report_summary
from modelpress.errors import ApiError
from modelpress.resources import Job

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_PRESET = "int8-cpu"  # the service's safe default (app/core/presets.py)
DATASET_ROLES = ("calibration", "train", "eval")
SERVER_COMMANDS = {
    "serve": "migrate, then run the API and an embedded worker together (needs the worker extra)",
    "api": "run the API only",
    "worker": "run a Celery worker (needs the worker extra)",
    "migrate": "apply database migrations",
    "keys": "manage API keys: create, list, revoke",
}


class UsageError(Exception):
    pass


class Io:
    """Results to stdout; progress, status and errors to stderr."""

    def __init__(self) -> None:
        self.out = Console(soft_wrap=True, highlight=False)
        self.err = error_console()

    def json(self, value: Any) -> None:
        print(json.dumps(value, indent=2, default=str))


# --- compress -------------------------------------------------------------------------------------------------

def _job_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job body's recipe part: --preset, or --recipe (a recipe `{"steps": [...]}`, or job fields such as
    `{"recipe": ..., "target": ..., "min_fidelity": ...}`), else the default preset."""
    if args.recipe is None:
        return {"preset": args.preset or DEFAULT_PRESET}
    try:
        spec = json.loads(Path(args.recipe).read_text())
    except OSError as exc:
        raise UsageError(f"--recipe: cannot read {args.recipe}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--recipe: {args.recipe} is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"--recipe: {args.recipe} must hold a JSON object")
    if "steps" in spec:
        return {"recipe": spec}
    if not {"recipe", "preset", "tune"} & spec.keys():
        raise UsageError(f"--recipe: {args.recipe} holds neither a recipe ({{\"steps\": [...]}}) nor job fields "
                         "with \"recipe\", \"preset\" or \"tune\"")
    return spec


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{value}: no such file")
    return path


def cmd_compress(args: argparse.Namespace, client: Client, io: Io) -> int:
    model_path = _existing_file(args.file)
    fields = _job_fields(args)
    dataset_paths = {role: _existing_file(getattr(args, role)) for role in DATASET_ROLES if getattr(args, role)}
    out_dir = Path(args.out) if args.out else Path(f"{model_path.name.split('.')[0]}-compressed")

    model = client.upload_model(model_path, progress=True)
    io.err.print(f"model {model.id}: uploaded, waiting for inspection", markup=False)
    model = client.wait_for_model(model, timeout=args.timeout)
    if model.status != "ready":
        io.err.print(f"error: model {model.id} is {model.status}: {model.error}", markup=False)
        return EXIT_FAILED
    io.err.print(f"model {model.id}: ready", markup=False)

    uploaded: dict[Path, str] = {}
    for role, path in dataset_paths.items():
        if path not in uploaded:
            uploaded[path] = client.upload_dataset(path, progress=True).id
        io.err.print(f"dataset {uploaded[path]}: {role}", markup=False)
    datasets = {role: uploaded[path] for role, path in dataset_paths.items()}
    if datasets:
        fields["datasets"] = {**fields.get("datasets", {}), **datasets}

    job = client.submit(model, **fields)
    what = f"preset {fields['preset']}" if "preset" in fields else "recipe" if "recipe" in fields else "tune"
    io.err.print(f"job {job.id}: submitted ({what})", markup=False)
    return _follow(client, io, job, args.timeout, out_dir)


def _follow(client: Client, io: Io, job: Job, timeout: float | None, out_dir: Path | None) -> int:
    """Follows a job to its end, then the report, its artifacts (into out_dir) and the exit code."""
    with JobFollower(job.id, io.err) as follower:
        job = client.wait(job, on_progress=follower, timeout=timeout)
    if job.metrics:
        _print_report(io, job.metrics)
    if out_dir is not None and job.artifacts:
        for path in client.download(job, out_dir, progress=True):
            io.out.print(f"saved {path}", markup=False)
    if job.status != "succeeded":
        error = f"{job.error.code}: {job.error.message}" if job.error else "no error recorded"
        io.err.print(f"error: job {job.id} {job.status}: {error}", markup=False)
        return EXIT_FAILED
    return EXIT_OK


def _print_report(io: Io, metrics: dict[str, Any]) -> None:
    print_table(io.out, ("", "before", "after", "change"), report_rows(metrics), right=(1, 2, 3))
    for line in report_summary(metrics):
        io.out.print(line, markup=False)


# --- models, datasets, jobs, report ---------------------------------------------------------------------------

def _time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cmd_models_list(args: argparse.Namespace, client: Client, io: Io) -> int:
    models = client.list_models(status=args.status, limit=args.limit)
    if args.json:
        io.json([m.raw for m in models])
        return EXIT_OK
    print_table(io.out, ("ID", "STATUS", "FORMAT", "SIZE", "CREATED", "NAME"),
                [(m.id, m.status, m.format, human_size(m.size_bytes), _time(m.created_at), m.name) for m in models],
                right=(3,))
    return EXIT_OK


def cmd_datasets_list(args: argparse.Namespace, client: Client, io: Io) -> int:
    datasets = client.list_datasets(limit=args.limit)
    if args.json:
        io.json([d.raw for d in datasets])
        return EXIT_OK
    print_table(io.out, ("ID", "FORMAT", "SAMPLES", "LABELS", "SIZE", "CREATED", "NAME"),
                [(d.id, d.format, f"{d.num_samples:,}", "yes" if d.has_labels else "no", human_size(d.size_bytes),
                  _time(d.created_at), d.name) for d in datasets], right=(2, 4))
    return EXIT_OK


def cmd_jobs_list(args: argparse.Namespace, client: Client, io: Io) -> int:
    jobs = client.list_jobs(status=args.status, model=args.model, limit=args.limit)
    if args.json:
        io.json([j.raw for j in jobs])
        return EXIT_OK

    def state(job: Job) -> str:
        if job.error:
            return f"{job.error.code}: {job.error.message}"[:80]
        return f"{(job.progress.fraction or 0) * 100:.0f}% {job.progress.stage or ''}".strip()

    print_table(io.out, ("ID", "STATUS", "MODEL", "CREATED", "PROGRESS / ERROR"),
                [(j.id, j.status, j.model_id, _time(j.created_at), state(j)) for j in jobs])
    return EXIT_OK


def _show(get: Callable[[str], Any]) -> Callable[[argparse.Namespace, Client, Io], int]:
    def show(args: argparse.Namespace, client: Client, io: Io) -> int:
        io.json(get(client)(args.id).raw)
        return EXIT_OK
    return show


def cmd_jobs_watch(args: argparse.Namespace, client: Client, io: Io) -> int:
    return _follow(client, io, client.get_job(args.id), args.timeout, Path(args.out) if args.out else None)


def cmd_jobs_cancel(args: argparse.Namespace, client: Client, io: Io) -> int:
    job = client.cancel(args.id)
    io.out.print(f"job {job.id}: {job.status}" + (" (cancel requested)" if job.cancel_requested else ""),
                 markup=False)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, client: Client, io: Io) -> int:
    metrics = client.report(args.id)
    if args.json:
        io.json(metrics)
    else:
        _print_report(io, metrics)
    return EXIT_OK


# --- the parser -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelpress", description="Model compression as a service: the client and the server.",
        epilog="URL and key: --url/--key, else MODELPRESS_URL / MODELPRESS_API_KEY, else the key `modelpress "
               f"serve` saved in $MODELPRESS_HOME/api_key and {config.DEFAULT_URL}. Exit codes: 0 done, 1 the job "
               "failed, 2 usage error or request refused, 3 service unreachable or unavailable.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", help=f"the service (default: MODELPRESS_URL, else {config.DEFAULT_URL})")
    connection.add_argument("--key", help="the API key (default: MODELPRESS_API_KEY, else $MODELPRESS_HOME/api_key)")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 1)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON")
    listing = argparse.ArgumentParser(add_help=False, parents=[connection, as_json])
    listing.add_argument("--limit", type=int, help="at most this many, newest last")

    compress = sub.add_parser(
        "compress", parents=[connection, waiting], help="upload a model, compress it, print the report, download",
        description="Upload FILE, wait for it to be inspected, upload the datasets, run the job while showing its "
                    "progress, print the report and download the artifacts into --out.")
    compress.add_argument("file", metavar="FILE", help="a .pt2, .onnx or Hugging Face archive (.zip, .tar.gz)")
    recipe = compress.add_mutually_exclusive_group()
    recipe.add_argument("--preset", help=f"a named recipe (GET /v1/presets; default {DEFAULT_PRESET})")
    recipe.add_argument("--recipe", metavar="FILE", help='a JSON recipe {"steps": [...]}, or job fields '
                                                         '{"recipe" | "tune", "target", "min_fidelity", ...}')
    for role in DATASET_ROLES:
        compress.add_argument(f"--{role}", metavar="DATA", help=f"{role} dataset (.npz, .safetensors, .jsonl)")
    compress.add_argument("--out", metavar="DIR", help="where the artifacts go (default: FILE's stem + -compressed)")
    compress.set_defaults(func=cmd_compress)

    for name, listed, shown, help_text in (("models", cmd_models_list, "get_model", "uploaded models"),
                                           ("datasets", cmd_datasets_list, "get_dataset", "uploaded datasets")):
        group = sub.add_parser(name, help=help_text).add_subparsers(dest="action", required=True, metavar="ACTION")
        list_ = group.add_parser("list", parents=[listing], help=f"list {help_text}")
        if name == "models":
            list_.add_argument("--status", help="uploaded, ready or invalid")
        list_.set_defaults(func=listed)
        group.add_parser("show", parents=[connection], help="one, as JSON").add_argument("id", metavar="ID")
        group.choices["show"].set_defaults(func=_show(lambda c, m=shown: getattr(c, m)))

    jobs = sub.add_parser("jobs", help="compression jobs").add_subparsers(dest="action", required=True,
                                                                          metavar="ACTION")
    list_ = jobs.add_parser("list", parents=[listing], help="list jobs")
    list_.add_argument("--status", help="queued, running, succeeded, failed or cancelled")
    list_.add_argument("--model", help="only this model's jobs")
    list_.set_defaults(func=cmd_jobs_list)
    jobs.add_parser("show", parents=[connection], help="one job, as JSON").add_argument("id", metavar="JOB")
    jobs.choices["show"].set_defaults(func=_show(lambda c: c.get_job))
    watch = jobs.add_parser("watch", parents=[connection, waiting],
                            help="follow a job to its end, then print its report")
    watch.add_argument("id", metavar="JOB")
    watch.add_argument("--out", metavar="DIR", help="also download its artifacts here")
    watch.set_defaults(func=cmd_jobs_watch)
    cancel = jobs.add_parser("cancel", parents=[connection], help="cancel a queued or running job")
    cancel.add_argument("id", metavar="JOB")
    cancel.set_defaults(func=cmd_jobs_cancel)

    report = sub.add_parser("report", parents=[connection, as_json], help="a finished job's report")
    report.add_argument("id", metavar="JOB")
    report.set_defaults(func=cmd_report)

    for name, help_text in SERVER_COMMANDS.items():  # listed here, parsed by app.cli
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def run(args: argparse.Namespace, io: Io) -> int:
    api_key = config.resolve_api_key(args.key)
    if not api_key:
        io.err.print(f"error: no API key: pass --key, set MODELPRESS_API_KEY, or run `modelpress serve` here (it "
                     f"saves one in {config.key_file()})", markup=False)
        return EXIT_REFUSED
    try:
        with Client(args.url, api_key) as client:
            return args.func(args, client, io)
    except UsageError as exc:
        io.err.print(f"error: {exc}", markup=False)
        return EXIT_REFUSED
    except ApiError as exc:
        status = f" (HTTP {exc.status})" if exc.status else ""
        io.err.print(f"error: {exc.code}: {exc.message}{status}", markup=False)
        return EXIT_UNREACHABLE if exc.is_connection_error else EXIT_REFUSED
    except TimeoutError as exc:
        io.err.print(f"error: timed out: {exc}", markup=False)
        return EXIT_FAILED
    except KeyboardInterrupt:
        io.err.print("interrupted (a submitted job keeps running: `modelpress jobs cancel JOB` stops it)",
                     markup=False)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVER_COMMANDS:
        from app.cli import main as server_main

        return server_main(argv)
    args = build_parser().parse_args(argv)
    return run(args, Io())


if __name__ == "__main__":
    sys.exit(main())
