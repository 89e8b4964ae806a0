"""Running the server: the `serve` command's flags, one process or several uvicorn workers (each
building its own engine from the same arguments), and a server on a background thread.

After SIGTERM the engine drains for --shutdown-timeout seconds; uvicorn cancels what is still
running SHUTDOWN_GRACE_S later.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from engram_serve.config import ServerConfig
from engram_serve.engine.engine import Engine
from engram_serve.kernels.cpu_threads import WorkerThread
from engram_serve.server.api import build_app
from engram_serve.server.metrics import MULTIPROC_ENV, is_multiprocess

API_KEY_ENV = "ENGRAM_SERVE_API_KEY"
WORKER_ARGS_ENV = "ENGRAM_SERVE_WORKER_ARGS"  # the CLI arguments, for worker processes
DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
SHUTDOWN_GRACE_S = 5.0  # after the drain deadline, uvicorn's own cancel of stuck tasks


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=ServerConfig.host)
    group.add_argument("--port", type=int, default=ServerConfig.port)
    group.add_argument(
        "--api-key", default=None, help=f"require this bearer key on /v1 routes (env {API_KEY_ENV})"
    )
    group.add_argument("--served-model-name", default=None, help="the model id clients use")
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=ServerConfig.shutdown_timeout_s,
        help="seconds in-flight requests get to finish after SIGTERM before they are aborted",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=ServerConfig.max_request_bytes,
        help="larger request bodies are refused (HTTP 413)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=ServerConfig.workers,
        help=f"server processes, each with its own engine (metrics merged via {MULTIPROC_ENV})",
    )
    group.add_argument(
        "--stats-interval",
        type=float,
        default=ServerConfig.stats_interval_s,
        help="seconds between stats log lines (0: off)",
    )
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    name = args.served_model_name or args.model or DEFAULT_SERVED_MODEL_NAME
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=name,
        shutdown_timeout_s=args.shutdown_timeout,
        max_request_bytes=args.max_request_bytes,
        workers=args.workers,
        stats_interval_s=args.stats_interval,
    )


def run_server(args: argparse.Namespace) -> None:
    """`engram-serve serve`: build the engine, then serve until SIGTERM/SIGINT."""
    _setup_logging(args.log_level)
    config = server_config_from_args(args)
    options = dict(
        host=config.host,
        port=config.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(config.shutdown_timeout_s + SHUTDOWN_GRACE_S),
    )
    if config.workers == 1:
        uvicorn.run(_app_on_engine_thread(args, config), **options)
        return
    _run_workers(args, config, options)


def _app_on_engine_thread(args: argparse.Namespace, config: ServerConfig) -> FastAPI:
    """The app, its engine built, warmed up and later stepped on one thread (WorkerThread's
    docstring says why)."""
    from engram_serve.engine_args import engine_from_args

    def build() -> Engine:
        engine = engine_from_args(args)
        engine.warm_up()
        return engine

    thread = WorkerThread("engine")
    return build_app(thread.submit(build).result(), config, engine_thread=thread)


def _run_workers(args: argparse.Namespace, config: ServerConfig, options: dict) -> None:
    """Several processes on one socket, each building its own engine from the same arguments."""
    own_dir = None
    if not is_multiprocess():
        own_dir = tempfile.mkdtemp(prefix="engram-serve-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    os.environ[WORKER_ARGS_ENV] = json.dumps({k: v for k, v in vars(args).items() if k != "run"})
    try:
        uvicorn.run(
            f"{__name__}:create_worker_app", factory=True, workers=config.workers, **options
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def create_worker_app() -> FastAPI:
    """The app of one worker process (an app factory for uvicorn)."""
    args = argparse.Namespace(**json.loads(os.environ[WORKER_ARGS_ENV]))
    _setup_logging(args.log_level)
    return _app_on_engine_thread(args, server_config_from_args(args))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s"
    )


class BackgroundServer:
    """Serves an app from a daemon thread on loopback (tests, notebooks). `port=0` picks a free
    port; `url` says which."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, **options: Any):
        options.setdefault("log_level", "warning")
        options.setdefault("timeout_graceful_shutdown", 5)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start; see the log")
            time.sleep(0.01)
        self.host, self.port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BackgroundServer",
    "add_server_args",
    "create_worker_app",
    "run_server",
    "server_config_from_args",
]
