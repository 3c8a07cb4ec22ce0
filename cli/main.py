"""The `freeference` command: serve, api, worker, keys, classify."""

import argparse
import gc
import importlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cli import keys_cmd
from cli.demo import ensure_demo_key, running_store_dir
from cli.embedded_redis import answers, free_port, host_port, start_server
from cli.logging_setup import setup_logging
from cli.processes import Child, Supervisor, child_env, python_module
from cli.startup import StartupError, check_catalog, check_redis, fail, load_settings, safe_url

log = logging.getLogger("freeference.serve")


def _tune_gc() -> None:
    """Fewer and shorter garbage-collector pauses in a long-running API or worker process.

    A request allocates thousands of short-lived objects, so with CPython's default (a young
    collection every 700 net allocations) collections ran several times per request, and every
    tenth of those also walked the objects of the long-lived generations. Whatever exists at
    start-up (modules, pydantic models, the app) is moved out of the collector's view, and young
    collections run every 20,000 net allocations. Cycles are still collected; memory stays flat
    (bench/soak.py).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.http_protocol import bounded_protocol
    from settings import get_settings

    _tune_gc()
    settings = get_settings()
    # httptools, with bounds on the request head that uvicorn does not have for it (api/http_protocol.py).
    http = bounded_protocol(settings.http_max_header_bytes, settings.http_max_headers, settings.http_header_timeout_s)
    # log_config=None: uvicorn's loggers go through our JSON handler instead of its own format.
    # No `server: uvicorn` header: it tells callers nothing they need, names our stack, and every
    # header costs a client ~20 µs to parse on this machine (docs/performance.md).
    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, log_level="warning",
                access_log=False, http=http, loop="uvloop", timeout_graceful_shutdown=30, log_config=None,
                timeout_keep_alive=settings.http_keepalive_s, server_header=False, backlog=settings.http_backlog)
    return 0


def _run_worker(_: argparse.Namespace) -> int:
    import uvloop

    from workers.main import run_worker

    uvloop.install()
    _tune_gc()
    run_worker()
    return 0


def _embedded_store(args: argparse.Namespace, supervisor: Supervisor, data_dir: Path) -> Path:
    """Start (or reuse) the embedded store at the default address; returns its data directory."""
    from settings.config import DEFAULT_REDIS_URL

    host, port = host_port(DEFAULT_REDIS_URL)
    if answers(host, port):
        if args.ephemeral:
            raise StartupError(f"a store already answers at {host}:{port} (another `freeference serve`?), so "
                               "--ephemeral cannot start its throwaway one there; stop that one first")
        log.info("using the embedded server already running at %s:%d", host, port)
        return running_store_dir(host, port) or data_dir
    if args.ephemeral:
        data_dir = Path(tempfile.mkdtemp(prefix="freeference-ephemeral-"))
    try:
        server = start_server(port, data_dir=data_dir, host=host, own_session=True, persist=not args.ephemeral)
    except (RuntimeError, OSError) as exc:
        raise StartupError(f"cannot start the embedded store at {host}:{port} ({exc}); free the port, or set "
                           "FREEFERENCE_REDIS_URL to a running Redis 7+ or Valkey") from None
    supervisor.children.append(Child("embedded-redis", [], {}, restart=False, process=server, stop_last=True))
    log.info("started embedded Valkey at %s:%d (data in %s)", host, port, data_dir)
    return data_dir


def _serve(args: argparse.Namespace) -> int:
    from settings import get_settings
    from settings.config import DEFAULT_REDIS_URL, DEMO_CATALOG

    settings = get_settings()
    check_catalog(DEMO_CATALOG if args.demo else settings.catalog)
    data_dir = args.data_dir or settings.effective_data_dir
    supervisor = Supervisor()
    env: dict[str, str] = {}
    redis_url = settings.redis_url
    if redis_url is None:
        data_dir = _embedded_store(args, supervisor, data_dir)
        redis_url = DEFAULT_REDIS_URL
        where = (f"Data: nothing kept (--ephemeral: a throwaway store in {data_dir}, deleted when this stops)"
                 if args.ephemeral else
                 f"Data: {data_dir} (the store's files{' and the demo key' if args.demo else ''}: keys, limit "
                 "counters, usage, files and batches survive restarts; `--ephemeral` for a throwaway run)")
    else:
        if args.ephemeral:
            raise StartupError("--ephemeral starts a throwaway embedded store; unset FREEFERENCE_REDIS_URL to use it")
        check_redis(redis_url, wait_s=5.0)
        where = f"Data: in the Redis at {safe_url(redis_url)} (FREEFERENCE_REDIS_URL); demo key file in {data_dir}"
    try:
        env["FREEFERENCE_REDIS_URL"] = redis_url
        if args.demo:
            upstream_port = free_port()
            supervisor.add(Child("simulated-provider",
                                 python_module("bench.fake_upstream", "--port", str(upstream_port),
                                               "--token-interval-ms", "30", "--demo"), child_env()))
            env["FREEFERENCE_DEMO_UPSTREAM_URL"] = f"http://127.0.0.1:{upstream_port}/v1"
            env["FREEFERENCE_CATALOG"] = str(DEMO_CATALOG)
        for i in range(args.workers):
            supervisor.add(Child(f"worker-{i}", python_module("cli.main", "worker"), child_env(**env)))
        supervisor.add(Child("api", python_module("cli.main", "api", "--host", args.host, "--port", str(args.port)),
                             child_env(**env)))
        print(f"Freeference listening on http://{args.host}:{args.port}/v1 with {args.workers} worker(s)")
        print(where, flush=True)
        if args.demo:
            print("DEMO MODE: every model is served by the SIMULATED provider (canned answers, not an LLM).")
            print("Demo API key (pro tier; the same at every start with this data directory; "
                  "`freeference keys demo` prints it again):")
            print(ensure_demo_key(redis_url, data_dir), flush=True)
        return supervisor.run_forever()
    finally:
        supervisor.stop()
        if args.ephemeral and redis_url == DEFAULT_REDIS_URL:
            shutil.rmtree(data_dir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="API + N workers (+ embedded Redis when none is configured)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--demo", action="store_true", help="serve from the labelled simulated provider")
    serve.add_argument("--ephemeral", action="store_true",
                       help="a throwaway embedded store: keys, counters and files are gone when serve stops")
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="where the embedded store and the demo key live (env FREEFERENCE_DATA_DIR; "
                            "default $XDG_DATA_HOME/freeference)")
    serve.set_defaults(func=_serve)

    api = sub.add_parser("api", help="one API process (scale out by running more)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(func=_run_api)

    worker = sub.add_parser("worker", help="one worker process (scale out by running more)")
    worker.set_defaults(func=_run_worker)

    keys_cmd.register(sub)
    # Optional command modules: each exposes register(subparsers).
    for module_name in ("cli.classify", "cli.batch_cmd", "cli.providers_cmd"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


# Commands that need no settings: they must work with any environment (batch talks HTTP).
_NO_SETTINGS = ("classify", "batch")


def _preflight(args: argparse.Namespace) -> None:
    """Check what the command needs before it starts anything (cli/startup.py)."""
    settings = load_settings()
    if args.command in ("api", "worker"):
        check_catalog(settings.catalog)
        check_redis(settings.effective_redis_url, wait_s=5.0)
    elif args.command == "keys":
        check_redis(settings.effective_redis_url, wait_s=1.0)


def main(argv: list[str] | None = None) -> None:
    """The `freeference` console script."""
    # Read from the environment, not Settings: logging must work before settings validate.
    setup_logging(os.environ.get("FREEFERENCE_LOG_LEVEL", "INFO"), os.environ.get("FREEFERENCE_LOG_FORMAT", "json"))
    args = build_parser().parse_args(argv)
    try:
        if args.command not in _NO_SETTINGS:
            _preflight(args)  # refuse unsafe or unusable settings before starting anything
        code = args.func(args)
    except StartupError as error:
        fail(error)
    sys.exit(code)


if __name__ == "__main__":
    main()
