"""The server's commands: serve (embedded all-in-one), api, worker, migrate, keys create / list / revoke.

`modelpress.cli` is the `modelpress` command and hands these to `main` here; the client's commands live there."""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys

from app.core.config import Settings, get_settings
from app.core.queue import Queue


def _migrate(settings: Settings) -> None:
    from app.core.migrate import upgrade

    settings.resolved_home().mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url())


def _create_key(settings: Settings, tenant_name: str, name: str | None = None) -> str:
    from app.core.auth import create_api_key
    from app.core.db import make_engine, make_session_factory, session_scope

    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        _, key = create_api_key(session, tenant_name, name)
    engine.dispose()
    return key


def _ensure_first_key(settings: Settings) -> None:
    """Embedded mode: the first start creates a key for tenant 'default' and saves it under MODELPRESS_HOME."""
    from sqlalchemy import func, select

    from app.core.db import make_engine
    from app.core.tables import ApiKey

    engine = make_engine(settings.resolved_database_url())
    with engine.connect() as conn:
        count = conn.scalar(select(func.count()).select_from(ApiKey))
    engine.dispose()
    key_file = settings.resolved_home() / "api_key"
    if count:
        if key_file.exists():
            print(f"API key: see {key_file}")
        return
    key = _create_key(settings, "default")
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    print(f"Created the first API key (tenant 'default'), saved to {key_file}:\n{key}", flush=True)


# What the worker imports beyond the base install: the `worker` extra (pyproject.toml).
WORKER_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime", "transformers", "safetensors")


def missing_worker_packages() -> list[str]:
    """Found without importing them: this process never imports torch."""
    return [name for name in WORKER_PACKAGES if importlib.util.find_spec(name) is None]


def _refuse_without_worker_extra(command: str) -> bool:
    missing = missing_worker_packages()
    if missing:
        print(f"error: `modelpress {command}` runs a worker, which needs the worker extra ({', '.join(missing)} "
              "not installed): pip install 'modelpress[worker]' (or, in a checkout, pip install -e '.[worker]')",
              file=sys.stderr)
    return bool(missing)


def _worker_command(queues: str, concurrency: int) -> list[str]:
    """The worker runs as `python -m worker`: this module never imports the worker (or torch)."""
    return [sys.executable, "-m", "worker", "--queues", queues, "--concurrency", str(concurrency)]


def cmd_serve(args: argparse.Namespace) -> int:
    if _refuse_without_worker_extra("serve"):
        return 2
    # Pin MODELPRESS_HOME to an absolute path so the API and the embedded worker agree on it.
    os.environ["MODELPRESS_HOME"] = str(get_settings().resolved_home())
    get_settings.cache_clear()
    settings = get_settings()
    _migrate(settings)
    _ensure_first_key(settings)
    worker = subprocess.Popen(_worker_command(Queue.CPU, args.concurrency))
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so the worker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print(f"modelpress serving on http://{args.host}:{args.port} (docs at /docs), data in {settings.home}",
              flush=True)
        _run_api(args.host, args.port, args.workers)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    _run_api(args.host, args.port, args.workers)
    return 0


def _run_api(host: str, port: int, workers: int) -> None:
    """uvicorn with `workers` API processes, each building the app from the MODELPRESS_* environment (so the
    processes share one configuration); rate buckets and stream slots are shared by them (app.api.limits)."""
    import uvicorn

    uvicorn.run("app.api.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info")


def default_api_workers() -> int:
    """One API process per CPU, at most 4: polls are cheap and a process serves thousands a second."""
    return max(1, min(4, os.cpu_count() or 1))


def cmd_worker(args: argparse.Namespace) -> int:
    if _refuse_without_worker_extra("worker"):
        return 2
    try:
        queues = ",".join(Queue.parse_list(args.queues))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = _worker_command(queues, args.concurrency)
    os.execv(command[0], command)  # the same process becomes the worker: signals reach Celery directly


def cmd_migrate(_: argparse.Namespace) -> int:
    _migrate(get_settings())
    print("database is at the latest migration")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = get_settings()
    _migrate(settings)
    key = _create_key(settings, args.tenant, args.name)
    print(f"Created an API key for tenant {args.tenant!r}. Store it now; it is not shown again.")
    print(key)
    return 0


def _format_time(value) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


def cmd_keys_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.core.db import make_engine, make_session_factory, utcnow
    from app.core.tables import ApiKey, Tenant

    settings = get_settings()
    _migrate(settings)
    engine = make_engine(settings.resolved_database_url())
    with make_session_factory(engine)() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == args.tenant))
        rows = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.id)).all() \
            if tenant else []
    engine.dispose()
    if tenant is None:
        print(f"error: no tenant named {args.tenant!r}", file=sys.stderr)
        return 1
    now = utcnow()
    print(f"{'ID':<34} {'PREFIX':<13} {'STATUS':<8} {'CREATED':<21} {'LAST USED':<21} {'EXPIRES':<21} NAME")
    for row in rows:
        status = "active" if row.is_active(now) else "revoked" if row.revoked_at else "expired"
        print(f"{row.id:<34} {row.prefix:<13} {status:<8} {_format_time(row.created_at):<21} "
              f"{_format_time(row.last_used_at):<21} {_format_time(row.expires_at):<21} {row.name or '-'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from app.core.auth import revoke
    from app.core.db import make_engine, make_session_factory, session_scope
    from app.core.tables import ApiKey

    settings = get_settings()
    _migrate(settings)
    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        row = session.get(ApiKey, args.key_id)
        if row is not None:
            revoke(row)
    engine.dispose()
    if row is None:
        print(f"error: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"Revoked key {args.key_id} (tenant {row.tenant.name!r}); it is refused from now on.")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description="Model compression as a service: the server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="migrate, then run the API and an embedded worker together")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--concurrency", type=int, default=1, help="jobs the embedded worker runs at once")
    serve.add_argument("--workers", type=positive_int, default=default_api_workers(),
                       help="API processes (default: one per CPU, at most 4)")
    serve.set_defaults(func=cmd_serve)

    api = sub.add_parser("api", help="run the API only")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=positive_int, default=1, help="API processes (default 1)")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="cpu", help="comma-separated: cpu, gpu")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a tenant if needed and an API key for it")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="a label for the key, shown by keys list")
    create.set_defaults(func=cmd_keys_create)
    list_ = keys_sub.add_parser("list", help="list a tenant's keys (never the secrets)")
    list_.add_argument("--tenant", required=True)
    list_.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key: it is refused from the next request on")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(func=cmd_keys_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
