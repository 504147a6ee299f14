"""The ``data-server`` command line: ``serve`` a config (or the embedded stdlib corpus), ``prepare``
a dataset into token shards, ``tokenizer train`` a BPE or SentencePiece model on a dataset."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from server.config import Config, default_config, format_validation_error, load_config
from server.errors import ConfigError, TokenfeedError


#: After shutdown, how long loads still running in the executor's threads get to finish before the
#: process exits without them (see ``_leave_stuck_loads``).
LOAD_EXIT_WAIT_S = 2.0


def _leave_stuck_loads(prefix: str, wait_s: float = LOAD_EXIT_WAIT_S) -> None:
    """Exit now if a load thread (its name begins with ``prefix``) is still busy ``wait_s`` after the
    server stopped. A read from a store that stopped answering (each try waits out the store
    client's own retries, then ours retries it) held the process 18 s past "stopped"; a container's
    grace period (Docker's 10 s) ends that in SIGKILL. Such a read only fills the cache, whose files
    are written under a temporary name and renamed (an unfinished one is swept at the next start)."""
    deadline = time.monotonic() + wait_s
    busy = [t for t in threading.enumerate() if t.name.startswith(prefix)]
    for thread in busy:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in busy if t.is_alive()]
    if not stuck:
        return
    logging.getLogger("server").warning(
        "exiting with %d load thread(s) still reading after %.0f s (a source slow to answer or being retried); "
        "they only filled the cache", len(stuck), wait_s)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data-server", description="tokenfeed data server")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve datasets over gRPC")
    serve.add_argument("--config", help="YAML config; default: the embedded `stdlib` dataset")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    security = serve.add_argument_group("security and limits (override the config's `server:` keys)")
    security.add_argument("--auth-tokens-file", metavar="FILE",
                          help="require bearer tokens: one per line, `TOKEN` or `TOKEN dataset1,dataset2`")
    security.add_argument("--auth-tokens-env", metavar="VAR", help="also take tokens from this environment variable")
    security.add_argument("--tls-cert", metavar="FILE", help="PEM server certificate (with --tls-key): serve TLS")
    security.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    security.add_argument("--tls-client-ca", metavar="FILE", help="PEM CA: require client certificates (mTLS)")
    security.add_argument("--data-root", dest="data_roots", action="append", metavar="DIR",
                          help="datasets may read only files under DIR (repeatable)")
    security.add_argument("--metrics-token-file", metavar="FILE",
                          help="/metrics requires `Authorization: Bearer <the token in FILE>`")
    security.add_argument("--metrics-token-env", metavar="VAR", help="/metrics requires the token in this variable")
    security.add_argument("--max-streams", type=int, metavar="N", help="concurrent streams (default 256)")
    health = sub.add_parser("health", help="exit 0 if a server reports SERVING (gRPC health service)")
    health.add_argument("--address", default="127.0.0.1:50051", help="host:port of the server")
    health.add_argument("--service", default="", help="service to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    health.add_argument("--tls-ca", help="CA bundle: check a TLS server (else plaintext)")
    health.add_argument("--tls-cert", help="client certificate, for a server that requires mTLS")
    health.add_argument("--tls-key", help="client key, for a server that requires mTLS")
    _add_offline_parsers(sub)
    return parser


def _add_offline_parsers(sub: argparse._SubParsersAction) -> None:
    prep = sub.add_parser("prepare", help="tokenize a dataset once into token shards (type: tokens)")
    prep.add_argument("--config", help="YAML config; default: the embedded `stdlib` dataset")
    prep.add_argument("--dataset", required=True, help="name of the dataset in the config")
    prep.add_argument("--out", required=True,
                      help="directory or object-store URL (s3://bucket/prefix) to write (resumes an unfinished one)")
    prep.add_argument("--storage-options", metavar="JSON",
                      help="fsspec options for a URL --out, as a JSON object (default: the source's storage_options)")
    prep.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    prep.add_argument("--max-shards", type=int, help="stop after this many shards (run again to go on)")
    prep.add_argument("--level", type=int, default=3, help="zstd level of the shards (default 3)")
    prep.add_argument("--ray", metavar="auto|ADDRESS",
                      help="make the shards as tasks on a Ray cluster (`auto`: the one `ray start` began here; "
                           "else the head's HOST:PORT); --out must be shared by its nodes (needs tokenfeed[ray])")
    prep.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command",
                                                                            required=True)
    train = tok.add_parser("train", help="train a tokenizer on a dataset (offline): a byte-level BPE "
                           "tokenizer.json, or a SentencePiece model")
    train.add_argument("--type", choices=("bpe", "sentencepiece"), default="bpe",
                       help="bpe: a tokenizer.json (tokenizer type hf); sentencepiece: a .model (type sentencepiece)")
    train.add_argument("--config", help="YAML config; default: the embedded `stdlib` dataset")
    train.add_argument("--dataset", required=True, help="name of the dataset in the config")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, specials included")
    train.add_argument("--out", required=True, help="file to write: tokenizer.json (bpe) or NAME.model (sentencepiece)")
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (bpe)")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                       help="SentencePiece's algorithm (sentencepiece)")
    train.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")


def _json_object(text: str | None, flag: str) -> dict | None:
    """A flag's JSON object (None when the flag is absent); a ConfigError naming the flag otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{flag}: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: a JSON object is needed, got {type(value).__name__}")
    return value


def _run_offline(args: argparse.Namespace, config: Config) -> int:
    """``prepare`` and ``tokenizer train``: no gRPC involved."""
    from server.prepare import prepare, train_sentencepiece, train_tokenizer

    if args.command == "prepare":
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
        if args.max_shards is not None and args.max_shards < 0:
            raise ConfigError(f"--max-shards: must be at least 0, got {args.max_shards}")
        if args.ray is not None:
            from server.prepare_ray import prepare_on_ray

            if args.workers is not None:
                raise ConfigError("--workers: not used with --ray (each node runs one task per CPU it offers)")
            if args.storage_options is not None:
                raise ConfigError("--storage-options: not used with --ray (its tasks reach --out with the "
                                  "source's storage_options)")
            result = prepare_on_ray(config, args.dataset, args.out, args.ray, max_shards=args.max_shards,
                                    level=args.level)
        else:
            result = prepare(config, args.dataset, args.out, workers=args.workers, max_shards=args.max_shards,
                             level=args.level, storage_options=_json_object(args.storage_options, "--storage-options"))
        if not result.complete:
            print(f"data-server: prepared {result.shards_done} shard(s) of {result.shards_total}; "
                  "run the same command again to continue", file=sys.stderr)
        return 0
    if args.type == "sentencepiece":
        train_sentencepiece(config, args.dataset, args.vocab_size, args.out, model_type=args.model_type)
    else:
        train_tokenizer(config, args.dataset, args.vocab_size, args.out, min_frequency=args.min_frequency)
    return 0


def _health(args: argparse.Namespace) -> int:
    """One gRPC health check, for container HEALTHCHECKs: 0 when SERVING, 1 otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        channel = grpc.secure_channel(args.address, creds)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"data-server health: {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


_SECURITY_FLAGS = ("auth_tokens_file", "auth_tokens_env", "tls_cert", "tls_key", "tls_client_ca", "data_roots",
                   "metrics_token_file", "metrics_token_env", "max_streams")


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                  "metrics_port": args.metrics_port}.items() if v is not None}
    overrides.update({k: getattr(args, k) for k in _SECURITY_FLAGS if getattr(args, k) is not None})
    if not overrides:
        return config
    try:
        server = config.server.model_validate({**config.server.model_dump(), **overrides})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "(command-line flags)").replace("\n  ", "\n  server.")) from None
    return config.model_copy(update={"server": server})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        argv = ["serve", *argv]
    args = _parser().parse_args(argv)
    if args.command == "health":
        return _health(args)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command != "serve":
        try:
            return _run_offline(args, load_config(args.config) if args.config else default_config())
        except ConfigError as err:
            print(f"data-server: {err}", file=sys.stderr)
            return 2
        except TokenfeedError as err:  # e.g. a source that stayed unreadable through its retries
            print(f"data-server: {err}; finished shards are kept: run the same command again to continue",
                  file=sys.stderr)
            return 1
    from server.app import LOAD_THREAD_PREFIX, serve  # grpc imports after logging is set up

    try:
        config = load_config(args.config) if args.config else default_config()
        config = _apply_overrides(config, args)
        asyncio.run(serve(config))
        _leave_stuck_loads(LOAD_THREAD_PREFIX)
    except ConfigError as err:
        print(f"data-server: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
