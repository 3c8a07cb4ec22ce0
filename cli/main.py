"""The `freeference` command: serve, api, worker, keys, classify."""

import argparse
import asyncio
import gc
import importlib
import logging
import os
import sys
from pathlib import Path

from cli import keys_cmd
from cli.embedded_redis import answers, free_port, host_port, start_server
from cli.logging_setup import setup_logging
from cli.processes import Child, Supervisor, child_env, python_module

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
                timeout_keep_alive=settings.http_keepalive_s, server_header=False)
    return 0


def _run_worker(_: argparse.Namespace) -> int:
    import uvloop

    from workers.main import run_worker

    uvloop.install()
    _tune_gc()
    run_worker()
    return 0


def _demo_key(redis_url: str) -> str:
    from api.keys import create_key
    from settings.redis_url import redis_client

    async def go() -> str:
        async with redis_client(redis_url) as redis:
            key, _ = await create_key(redis, name="demo", tier="pro")
            return key

    return asyncio.run(go())


def _serve(args: argparse.Namespace) -> int:
    from settings import get_settings
    from settings.config import DEFAULT_REDIS_URL, DEMO_CATALOG

    settings = get_settings()
    supervisor = Supervisor()
    env: dict[str, str] = {}
    redis_url = settings.redis_url
    if redis_url is None:
        host, port = host_port(DEFAULT_REDIS_URL)
        if answers(host, port):
            log.info("using the embedded server already running at %s:%d", host, port)
        else:
            data_dir = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "freeference"
            server = start_server(port, data_dir=data_dir, host=host, own_session=True)
            supervisor.children.append(Child("embedded-redis", [], {}, restart=False, process=server,
                                             stop_last=True))
            log.info("started embedded Valkey at %s:%d (data in %s)", host, port, data_dir)
        redis_url = DEFAULT_REDIS_URL
    env["FREEFERENCE_REDIS_URL"] = redis_url
    if args.demo:
        upstream_port = free_port()
        supervisor.add(Child("simulated-provider",
                             python_module("bench.fake_upstream", "--port", str(upstream_port),
                                           "--token-interval-ms", "30"), child_env()))
        env["FREEFERENCE_DEMO_UPSTREAM_URL"] = f"http://127.0.0.1:{upstream_port}/v1"
        env["FREEFERENCE_CATALOG"] = str(DEMO_CATALOG)
    for i in range(args.workers):
        supervisor.add(Child(f"worker-{i}", python_module("cli.main", "worker"), child_env(**env)))
    supervisor.add(Child("api", python_module("cli.main", "api", "--host", args.host, "--port", str(args.port)),
                         child_env(**env)))
    print(f"Freeference listening on http://{args.host}:{args.port}/v1 with {args.workers} worker(s)", flush=True)
    if args.demo:
        print("DEMO MODE: every model is served by the SIMULATED provider (canned answers, not an LLM).")
        print(f"Demo API key (pro tier):\n{_demo_key(redis_url)}", flush=True)
    return supervisor.run_forever()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="API + N workers (+ embedded Redis when none is configured)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--demo", action="store_true", help="serve from the labelled simulated provider")
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


def main(argv: list[str] | None = None) -> None:
    from settings import get_settings

    # Read from the environment, not Settings: logging must work before settings validate.
    setup_logging(os.environ.get("FREEFERENCE_LOG_LEVEL", "INFO"), os.environ.get("FREEFERENCE_LOG_FORMAT", "json"))
    args = build_parser().parse_args(argv)
    if args.command not in ("classify",):
        get_settings()  # refuse unsafe settings before starting anything
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
