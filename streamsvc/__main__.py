"""`python -m streamsvc server [--config FILE] [--host H] [--port P]` serves; the other commands
(`run`, `watch`, `jobs`, `tools`, `projects`, `upload`, `cancel`) are clients of a service (cli.py)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
from aiohttp import web

from . import cli, logs
from .app import create_app, server_options
from .config import Config, ConfigError
from .store import DataFolderInUse


def load_config(path: str | None, host: str | None, port: int | None) -> Config:
    path = path or os.environ.get("STREAMSVC_CONFIG")
    config = Config.from_toml(Path(path)) if path else Config.embedded_default()
    server = config.server
    if host is not None:
        server = attrs.evolve(server, host=host)
    if port is not None:
        server = attrs.evolve(server, port=port)
    return attrs.evolve(config, server=server)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.main
    return command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streamsvc", description="Run tools on code, stream their output.")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server", help="run the service")
    server.add_argument("--config", help="TOML file (default: $STREAMSVC_CONFIG, else the embedded demo)")
    server.add_argument("--host")
    server.add_argument("--port", type=int)
    server.add_argument("--log-level", default="INFO", choices=logs.LEVELS, type=str.upper)
    server.add_argument("--log-format", default="text", choices=logs.FORMATS, help="text lines or JSON lines")
    server.set_defaults(main=serve)
    cli.add_commands(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    try:
        config = load_config(args.config, args.host, args.port)
    except (ConfigError, ValueError) as exc:
        print(f"streamsvc: config error: {exc}", file=sys.stderr)
        return 2
    try:
        (config.server.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"streamsvc: server.data_dir {config.server.data_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    if not config.projects.root.is_dir():
        print(f"streamsvc: warning: projects.root {config.projects.root} is not a folder", file=sys.stderr)
    url = f"http://{config.server.host}:{config.server.port}"
    app = create_app(config)
    app.on_startup.append(_freeze_heap)
    try:
        web.run_app(
            app,
            host=config.server.host,
            port=config.server.port,
            print=lambda _: print(f"streamsvc: serving on {url} (tools: {', '.join(config.tools)})", flush=True),
            handler_cancellation=True,  # a client's disconnect ends its handler at once
            **server_options(),
            shutdown_timeout=5,
        )
    except OSError as exc:
        print(f"streamsvc: cannot serve on {url}: {exc.strerror}", file=sys.stderr)
        return 1
    except DataFolderInUse as exc:
        print(f"streamsvc: server.data_dir {exc}; stop it, or give this one a data_dir of its own", file=sys.stderr)
        return 1
    return 0


async def _freeze_heap(app: web.Application) -> None:
    """Once the service is up, move what start-up made (modules, classes, config) out of
    the cyclic GC's view: a full collection then walks only what requests and jobs made,
    and no longer stalls every stream for milliseconds (measured: 14-18 ms over ~45,000
    start-up objects, in the middle of a latency run)."""
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
