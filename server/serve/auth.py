"""Who may read what: bearer tokens (optionally per dataset), TLS credentials, data roots that
confine every file a config may name (checked at start-up, then enforced at every open while
serving), and the bearer token of /metrics. Only the interceptor knows gRPC."""

from __future__ import annotations

import glob
import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from server.config import Config, ServerSettings
from server.errors import ConfigError
from server.stages.files import confine_reads, is_url

log = logging.getLogger(__name__)

#: A WSGI application (PEP 3333): ``app(environ, start_response)`` -> the body's chunks.
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Shortest token accepted: guessing one must be out of reach.
MIN_TOKEN_CHARS = 16
_GLOB_CHARS = frozenset("*?[")


# ---- tokens ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grant:
    """What one token may read: every dataset (``datasets is None``) or the named ones."""

    label: str  # where the token was configured (for logs; never the token itself)
    datasets: frozenset[str] | None

    def allows(self, dataset: str) -> bool:
        return self.datasets is None or dataset in self.datasets


class TokenTable:
    """The accepted tokens, kept only as SHA-256 digests and compared in constant time."""

    def __init__(self, entries: list[tuple[bytes, Grant]]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Grant | None:
        """The grant of ``token``, or ``None``. Every entry is compared, match or not, so the time
        taken says nothing about which token (or how much of it) matched."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Grant | None = None
        for known, grant in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = grant
        return found


def parse_tokens(text: str, origin: str, datasets: Collection[str]) -> list[tuple[bytes, Grant]]:
    """Entries from ``TOKEN [dataset1,dataset2]`` lines (``#`` comments and blank lines skipped;
    ``;`` also separates entries, for environment variables)."""
    entries: list[tuple[bytes, Grant]] = []
    for n, line in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{origin} entry {n}"
        token, *rest = line.split()
        if len(rest) > 1:
            raise ConfigError(f"{where}: expected `TOKEN [dataset1,dataset2]`, got {len(rest) + 1} words")
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters "
                              f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        allowed = None
        if rest:
            allowed = frozenset(d for d in rest[0].split(",") if d)
            unknown = sorted(allowed - set(datasets))
            if unknown or not allowed:
                raise ConfigError(f"{where}: unknown dataset(s) {unknown} (configured: {', '.join(sorted(datasets))})")
        entries.append((hashlib.sha256(token.encode()).digest(), Grant(where, allowed)))
    return entries


def load_tokens(settings: ServerSettings, datasets: Collection[str]) -> TokenTable | None:
    """The tokens of ``server.auth_tokens_file`` and ``server.auth_tokens_env``; ``None`` when
    neither is set (no authentication). A source that is set but holds no token is an error,
    not an open door."""
    entries: list[tuple[bytes, Grant]] = []
    if settings.auth_tokens_file is not None:
        path = os.path.expanduser(settings.auth_tokens_file)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"server.auth_tokens_file: cannot read {path}: {err}") from None
        found = parse_tokens(text, f"server.auth_tokens_file ({path})", datasets)
        if not found:
            raise ConfigError(f"server.auth_tokens_file: {path} holds no token")
        entries += found
    if settings.auth_tokens_env is not None:
        name = settings.auth_tokens_env
        found = parse_tokens(os.environ.get(name, ""), f"server.auth_tokens_env (${name})", datasets)
        if not found:
            raise ConfigError(f"server.auth_tokens_env: environment variable {name} is unset or holds no token")
        entries += found
    if not entries:
        return None
    if len({d for d, _ in entries}) < len(entries):
        raise ConfigError("server.auth_tokens_*: the same token is configured twice")
    return TokenTable(entries)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


# ---- the interceptor --------------------------------------------------------------------------------
class _Malformed:
    """Stands in for a request that could not be parsed, so the handler can refuse it by name."""

    def __init__(self, err: Exception) -> None:
        self.err = err


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Guards the methods of ``service``: a request that does not parse gets INVALID_ARGUMENT
    (not INTERNAL); with ``tokens``, a call without a valid bearer token gets UNAUTHENTICATED and
    a token restricted to other datasets PERMISSION_DENIED, before the handler runs, so not one
    byte of data flows. ``Describe`` of all datasets lists only the ones the token may read.
    Other services (health, reflection) pass through: probes need no token."""

    def __init__(self, service: str, tokens: TokenTable | None) -> None:
        self.prefix = f"/{service}/"
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        refusal: tuple[grpc.StatusCode, str] | None = None
        grant = Grant("open", None)
        if self.tokens is not None:
            token = bearer_token(details.invocation_metadata)
            if token is None:
                refusal = (grpc.StatusCode.UNAUTHENTICATED,
                           "this server requires a bearer token: pass StreamingDataset(token=...) or set "
                           "TOKENFEED_TOKEN")
            elif (found := self.tokens.authenticate(token)) is None:
                refusal = (grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted by this server")
            else:
                grant = found
        return _guarded(handler, refusal, grant)


def _deserializer(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data) if parse is not None else data
        except Exception as err:  # noqa: BLE001 - any parse failure is the caller's bad input
            return _Malformed(err)
    return deserialize


async def _admit(request: Any, context: grpc.aio.ServicerContext, refusal: tuple[grpc.StatusCode, str] | None,
                 grant: Grant, empty_means_all: bool) -> None:
    if refusal is not None:
        log.warning("refused %s: %s", context.peer(), refusal[1])
        await context.abort(*refusal)
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.err}")
    dataset = getattr(request, "dataset", "")
    if not (empty_means_all and not dataset) and not grant.allows(dataset):
        # Checked before the dataset is looked up: a restricted token learns nothing of others.
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token may not read dataset {dataset!r}")


def _guarded(handler: grpc.RpcMethodHandler, refusal: tuple[grpc.StatusCode, str] | None,
             grant: Grant) -> grpc.RpcMethodHandler:
    deserialize = _deserializer(handler.request_deserializer)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _admit(request, context, refusal, grant, empty_means_all=False)
            async for message in inner_stream(request, context):
                yield message
        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=deserialize,
                                                    response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        inner_call = handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _admit(request, context, refusal, grant, empty_means_all=True)
            reply = await inner_call(request, context)
            if grant.datasets is not None and hasattr(reply, "datasets"):  # Describe of all: only its own
                kept = [d for d in reply.datasets if grant.allows(d.name)]
                del reply.datasets[:]
                reply.datasets.extend(kept)
            return reply
        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=deserialize,
                                                   response_serializer=handler.response_serializer)
    raise TypeError("AccessInterceptor guards unary requests only; this service has no client streams")


# ---- TLS --------------------------------------------------------------------------------------------
def _read_pem(field: str, path: str, marker: str) -> bytes:
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"server.{field}: cannot read {path}: {err.strerror}") from None
    if b"-----BEGIN" not in data or marker.encode() not in data:
        raise ConfigError(f"server.{field}: {path} is not a PEM file holding a {marker}")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert``/``tls_key`` (mutual TLS with ``tls_client_ca``), or
    ``None`` for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read_pem("tls_cert", settings.tls_cert, "CERTIFICATE")
    key = _read_pem("tls_key", settings.tls_key, "PRIVATE KEY")
    ca = _read_pem("tls_client_ca", settings.tls_client_ca, "CERTIFICATE") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


# ---- data roots -------------------------------------------------------------------------------------
def _roots(settings: ServerSettings) -> list[str]:
    roots = []
    for i, root in enumerate(settings.data_roots or ()):
        real = os.path.realpath(os.path.expanduser(root))
        if not os.path.isdir(real):
            raise ConfigError(f"server.data_roots[{i}]: {root} is not a directory")
        roots.append(real)
    return roots


def _inside(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in roots)


def _config_paths(config: Config) -> Iterable[tuple[str, str, bool]]:
    """``(field, path or glob, is_glob)`` for every path a dataset's source or tokenizer names."""
    for name, ds in config.datasets.items():
        src, tok, field = ds.source, ds.tokenizer, f"datasets.{name}"
        for key in ("paths", "data_files"):
            for i, pattern in enumerate(getattr(src, key, None) or ()):
                yield f"{field}.source.{key}[{i}]", pattern, True
        for key in ("path", "cache_dir"):
            if (value := getattr(src, key, None)) is not None:
                yield f"{field}.source.{key}", value, False
        if (value := getattr(tok, "path", None)) is not None:
            yield f"{field}.tokenizer.path", value, False


def check_config_paths(config: Config) -> None:
    """With ``server.data_roots``, refuse (before anything is read) a path or glob that leaves
    the roots: by ``..``, by a symlink, or by a match. A glob's matches are only listed here."""
    roots = _roots(config.server)
    if not roots:
        return
    allowed = ", ".join(roots)
    for field, value, is_glob in _config_paths(config):
        if is_url(value):  # an object store: not the server's disk (its access is the store's credentials)
            continue
        path = os.path.expanduser(value)  # as the sources use it: globbed, never normalised
        parts = path.split(os.sep)
        if ".." in parts:  # '..' after a symlink or a wildcard is not what it looks like: refuse it
            raise ConfigError(f"{field}: {value!r}: '..' is not allowed in paths when server.data_roots is set")
        fixed = next((i for i, p in enumerate(parts) if _GLOB_CHARS & set(p)), len(parts))
        if not _inside(os.path.abspath(os.sep.join(parts[:fixed]) or os.sep), roots):
            raise ConfigError(f"{field}: {value!r} is outside server.data_roots ({allowed})")
        for match in glob.glob(path, recursive=True) if is_glob else ():
            if not _inside(match, roots):
                raise ConfigError(f"{field}: {match} (matched by {value!r}) resolves to {os.path.realpath(match)}, "
                                  f"outside server.data_roots ({allowed})")


def check_dataset_files(config: Config, files: dict[str, list[str]]) -> None:
    """With ``server.data_roots``, refuse a dataset whose resolved files (e.g. shards a manifest
    names, files in a directory) leave the roots; run after the sources listed them."""
    roots = _roots(config.server)
    for name, paths in files.items() if roots else ():
        for path in paths:
            if not is_url(path) and not _inside(path, roots):
                raise ConfigError(f"datasets.{name}.source: {path} resolves to {os.path.realpath(path)}, "
                                  f"outside server.data_roots ({', '.join(roots)})")


# ---- guards that act while serving ----------------------------------------------------------------
def install_guards(settings: ServerSettings) -> str | None:
    """Install the server process's run-time guard: every data file opened from now on is
    confined to ``server.data_roots`` (the start-up checks cannot see a file or directory swapped
    for a symlink later). Process-wide, because files are opened in worker threads that see no
    config. Call once, before the datasets are built. Returns the bearer token /metrics requires
    (``server.metrics_token_*``; None: open), read now so that a missing file stops the start."""
    confine_reads(_roots(settings))
    return load_metrics_token(settings)


def load_metrics_token(settings: ServerSettings) -> str | None:
    """The bearer token /metrics requires: the whole content of ``server.metrics_token_file`` (the
    file Prometheus reads as ``authorization.credentials_file``) or of the environment variable
    ``server.metrics_token_env``; ``None`` when neither is set (/metrics is open)."""
    if settings.metrics_token_file is not None and settings.metrics_token_env is not None:
        raise ConfigError("server.metrics_token_file, server.metrics_token_env: set one of them, not both")
    if settings.metrics_token_file is not None:
        path = os.path.expanduser(settings.metrics_token_file)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"server.metrics_token_file: cannot read {path}: {err}") from None
        return _single_token(text, f"server.metrics_token_file ({path})")
    if settings.metrics_token_env is not None:
        name = settings.metrics_token_env
        return _single_token(os.environ.get(name, ""), f"server.metrics_token_env (${name})")
    return None


def _single_token(text: str, origin: str) -> str:
    """``text`` as one token (surrounding whitespace dropped, as Prometheus does); configured but
    empty, several words or too short is an error, not an open endpoint."""
    words = text.split()
    if not words:
        raise ConfigError(f"{origin}: holds no token")
    if len(words) > 1:
        raise ConfigError(f"{origin}: expected one token (the whole content), found {len(words)} words")
    if len(words[0]) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{origin}: a token needs at least {MIN_TOKEN_CHARS} characters "
                          f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return words[0]


def require_bearer(app: WsgiApp, token: str, realm: str) -> WsgiApp:
    """``app`` behind ``Authorization: Bearer <token>``: a request without it, or with another
    token, gets 401 and nothing of ``app``. The token is compared as a digest in constant time."""
    table = TokenTable([(hashlib.sha256(token.encode()).digest(), Grant(realm, None))])

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = bearer_token([("authorization", environ.get("HTTP_AUTHORIZATION", ""))])
        if given is not None and table.authenticate(given) is not None:
            return app(environ, start_response)
        why = "no bearer token" if given is None else "a bearer token that is not accepted"
        log.warning("refused %s %s from %s: %s", realm, environ.get("PATH_INFO", "/"),
                    environ.get("REMOTE_ADDR", "?"), why)
        challenge = f'Bearer realm="{realm}"' + ("" if given is None else ', error="invalid_token"')
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", challenge)])
        return [f"401 Unauthorized: {realm} requires `Authorization: Bearer <token>`\n".encode()]
    return guarded
