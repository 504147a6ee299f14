"""The ``data-server`` command line: ``serve`` a config (or the embedded stdlib corpus)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from server.config import Config, default_config, load_config
from server.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data-server", description="tokenfeed data server")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve datasets over gRPC")
    serve.add_argument("--config", help="YAML config; default: the embedded `stdlib` dataset")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return parser


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                  "metrics_port": args.metrics_port}.items() if v is not None}
    if not overrides:
        return config
    server = config.server.model_validate({**config.server.model_dump(), **overrides})
    return config.model_copy(update={"server": server})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        argv = ["serve", *argv]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import serve  # grpc imports after logging is set up

    try:
        config = load_config(args.config) if args.config else default_config()
        config = _apply_overrides(config, args)
        asyncio.run(serve(config))
    except ConfigError as err:
        print(f"data-server: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
