"""Security (issue 8): bearer tokens (per dataset), TLS and mutual TLS, data roots that confine
every file a config names, and requests that can only name configured datasets."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import RequestError, ServerUnavailable, StreamingDataset
from server.serve.auth import check_config_paths, load_tokens
from server.config import ServerSettings, parse_config
from server.errors import ConfigError
from tests.certs import write_pki
from tests.conftest import ROOT, jsonl_config, make_documents, write_jsonl
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

ALPHA, BETA, GAMMA = "alpha-0123456789abcdef", "beta-0123456789abcdef", "gamma-0123456789abcdef"
NAMES = ["../etc/passwd", "/etc/passwd", "docs/../docs", "docs/", "..", "%2e%2e%2fetc", "docs\x00", " docs"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data"
    write_jsonl(path, make_documents(60, seed=6), files=2)
    return path


def two_datasets(data, **server) -> dict:
    config = jsonl_config(data, **server)
    config["datasets"]["other"] = config["datasets"]["docs"]
    return config


def write_tokens(tmp_path, text: str):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    return path


def first(address: str, *, deadline: float = 0.5, **kw) -> str:
    """What the first batch of a fresh StreamingDataset comes to: ``ok`` or the error."""
    try:
        next(iter(StreamingDataset(address, "docs", seq_len=32, batch_size=2, reconnect_deadline_s=deadline, **kw)))
        return "ok"
    except ServerUnavailable as err:
        return f"unavailable: {err.details}"
    except RequestError as err:
        return err.code.name


# ---- TLS, mutual TLS and tokens -------------------------------------------------------------------
@pytest.mark.integration
def test_only_the_right_ca_certificate_and_token_together_get_data(start_server, data, tmp_path, pki):
    tokens = write_tokens(tmp_path, f"# who may read\n{ALPHA}\n")
    server = start_server(jsonl_config(data, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                                       tls_client_ca=str(pki["ca"]), auth_tokens_file=str(tokens)))
    cert = {"tls_cert": str(pki["client_cert"]), "tls_key": str(pki["client_key"])}
    matrix = {
        "plaintext client": first(server.address, token=ALPHA),
        "TLS client trusting another CA": first(server.address, tls_ca=str(pki["other_ca"]), **cert, token=ALPHA),
        "mTLS without a client certificate": first(server.address, tls_ca=str(pki["ca"]), token=ALPHA),
        "client certificate from another CA": first(server.address, tls_ca=str(pki["ca"]), token=ALPHA,
                                                    tls_cert=str(pki["other_client_cert"]),
                                                    tls_key=str(pki["other_client_key"])),
        "no token": first(server.address, tls_ca=str(pki["ca"]), **cert),
        "wrong token": first(server.address, tls_ca=str(pki["ca"]), **cert, token=BETA),
        "right token": first(server.address, tls_ca=str(pki["ca"]), **cert, token=ALPHA),
    }
    print(matrix)
    assert matrix.pop("right token") == "ok"
    assert matrix.pop("no token") == matrix.pop("wrong token") == "UNAUTHENTICATED"
    for case, outcome in matrix.items():  # the handshake fails: retried until the deadline, then raised
        assert outcome.startswith("unavailable"), (case, outcome)
    assert "CERTIFICATE_VERIFY_FAILED" in matrix["TLS client trusting another CA"]
    assert "mutual TLS" in server.log() and "Traceback" not in server.log()
    # the health probe (the container HEALTHCHECK) speaks TLS too, and needs no token
    probe = [sys.executable, "-m", "server", "health", "--address", server.address, "--timeout", "5"]
    with_tls = probe + ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]),
                        "--tls-key", str(pki["client_key"])]
    assert subprocess.run(with_tls, cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(probe, cwd=ROOT, capture_output=True, timeout=60).returncode == 1


@pytest.mark.integration
def test_tls_without_client_certificates_and_the_token_from_the_environment(start_server, data, tmp_path, pki,
                                                                            monkeypatch):
    monkeypatch.setenv("SERVER_TOKENS", f"{ALPHA}; {BETA} other")
    server = start_server(two_datasets(data, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                                       auth_tokens_env="SERVER_TOKENS"))
    assert first(server.address, tls_ca=str(pki["ca"])) == "UNAUTHENTICATED"
    monkeypatch.setenv("TOKENFEED_TOKEN", ALPHA)
    assert first(server.address, tls_ca=str(pki["ca"])) == "ok"
    assert first(server.address).startswith("unavailable")  # plaintext to a TLS port


def raw_call(address: str, method: str, request, token: str | None = None):
    """One call on a plaintext channel: the reply, the first message, or the error."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        feed = pb_grpc.TokenFeedStub(channel)
        try:
            if method == "stream":
                return next(iter(feed.StreamBatches(request, metadata=metadata, timeout=20)))
            return feed.Describe(request, metadata=metadata, timeout=20)
        except grpc.RpcError as err:
            return err


def stream_request(dataset: str = "docs") -> pb.StreamRequest:
    return pb.StreamRequest(dataset=dataset, seq_len=32, batch_size=2, world_size=1)


@pytest.mark.integration
def test_tokens_restricted_to_datasets_and_what_stays_open(start_server, data, tmp_path):
    tokens = write_tokens(tmp_path, f"{ALPHA}\n{BETA} other   # only `other`\n")
    server = start_server(two_datasets(data), extra_args=["--auth-tokens-file", str(tokens)])
    code = lambda reply: reply.code() if isinstance(reply, grpc.RpcError) else "ok"
    assert code(raw_call(server.address, "stream", stream_request("other"), BETA)) == "ok"
    assert code(raw_call(server.address, "stream", stream_request("docs"), BETA)) == grpc.StatusCode.PERMISSION_DENIED
    assert code(raw_call(server.address, "stream", stream_request("docs"), ALPHA)) == "ok"
    assert code(raw_call(server.address, "stream", stream_request("docs"))) == grpc.StatusCode.UNAUTHENTICATED
    # Describe needs a token too, and lists only what the token may read.
    assert code(raw_call(server.address, "describe", pb.DescribeRequest())) == grpc.StatusCode.UNAUTHENTICATED
    assert [d.name for d in raw_call(server.address, "describe", pb.DescribeRequest(), BETA).datasets] == ["other"]
    assert [d.name for d in raw_call(server.address, "describe", pb.DescribeRequest(), ALPHA).datasets] == [
        "docs", "other"]
    assert code(raw_call(server.address, "describe", pb.DescribeRequest(dataset="docs"), BETA)) == \
        grpc.StatusCode.PERMISSION_DENIED
    # A restricted token learns nothing of other datasets, not even whether a name exists.
    err = raw_call(server.address, "stream", stream_request("nope"), BETA)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "docs" not in err.details()
    # Health probes need no token (documented: probes must work).
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in server.log() and BETA not in server.log()  # tokens are never logged


def test_token_files_are_checked_at_start_up(tmp_path, monkeypatch):
    datasets = ["docs", "other"]

    def load(text: str) -> object:
        return load_tokens(ServerSettings(auth_tokens_file=str(write_tokens(tmp_path, text))), datasets)

    assert len(load(f"{ALPHA}\n\n# comment\n{BETA} docs,other\n")) == 2
    for text, words in [
        ("", "holds no token"),
        ("# nothing but a comment\n", "holds no token"),
        ("short\n", "at least 16 characters"),
        (f"{ALPHA} nope\n", "unknown dataset(s) ['nope']"),
        (f"{ALPHA} docs other\n", "expected `TOKEN [dataset1,dataset2]`"),
        (f"{ALPHA}\n{ALPHA} docs\n", "configured twice"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            load(text)
    with pytest.raises(ConfigError, match="server.auth_tokens_file: cannot read"):
        load_tokens(ServerSettings(auth_tokens_file=str(tmp_path / "missing")), datasets)
    monkeypatch.delenv("NO_SUCH_TOKENS", raising=False)
    with pytest.raises(ConfigError, match="server.auth_tokens_env: environment variable NO_SUCH_TOKENS"):
        load_tokens(ServerSettings(auth_tokens_env="NO_SUCH_TOKENS"), datasets)
    assert load_tokens(ServerSettings(), datasets) is None  # nothing configured: no authentication


def run_cli(tmp_path, config: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "security.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0", "--config", str(path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("server, args, words", [
    ({"tls_cert": "x.pem"}, [], ["tls_cert and tls_key go together"]),
    ({}, ["--tls-client-ca", "ca.pem"], ["server.", "tls_client_ca (mutual TLS) needs tls_cert"]),
    ({}, ["--tls-cert", "{data}/part-000.jsonl", "--tls-key", "{data}/part-001.jsonl"],
     ["server.tls_cert", "not a PEM file"]),
    ({}, ["--auth-tokens-file", "{data}/missing.txt"], ["server.auth_tokens_file", "cannot read"]),
    ({}, ["--max-streams", "0"], ["server.max_streams"]),
])
def test_bad_security_settings_stop_the_server_with_a_named_error(tmp_path, data, server, args, words):
    result = run_cli(tmp_path, jsonl_config(data, **server), *(a.format(data=data) for a in args))
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---- paths ----------------------------------------------------------------------------------------
def rooted(config: dict, *roots) -> object:
    config.setdefault("server", {})["data_roots"] = [str(r) for r in roots]
    return parse_config(config)


def test_data_roots_refuse_every_way_out(tmp_path, data):
    outside = tmp_path / "outside"
    write_jsonl(outside, make_documents(3), files=1)
    (data / "escape.json").symlink_to(outside / "part-000.jsonl")
    (data / "dir").symlink_to(outside, target_is_directory=True)
    check_config_paths(rooted(jsonl_config(data), data))  # inside: fine
    cases = [
        (jsonl_config(outside), "datasets.docs.source.paths[0]", "outside server.data_roots"),
        (jsonl_config(data / ".." / "outside"), "datasets.docs.source.paths[0]", "'..' is not allowed"),
        (jsonl_config(data / "*" / ".." / ".." / "outside"), "datasets.docs.source.paths[0]", "'..' is not allowed"),
        (jsonl_config(data / "dir"), "datasets.docs.source.paths[0]", "outside server.data_roots"),
    ]
    symlinked = jsonl_config(data)
    symlinked["datasets"]["docs"]["source"]["paths"] = [str(data / "part-*.jsonl"), str(data / "escape*.json")]
    cases.append((symlinked, "datasets.docs.source.paths[1]", "resolves to"))
    tokenizer = jsonl_config(data)
    tokenizer["datasets"]["docs"]["tokenizer"] = {"type": "hf", "path": str(outside / "tokenizer.json")}
    cases.append((tokenizer, "datasets.docs.tokenizer.path", "outside server.data_roots"))
    for config, field, words in cases:
        with pytest.raises(ConfigError) as info:
            check_config_paths(rooted(config, data))
        assert field in str(info.value) and words in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match=r"server.data_roots\[0\]"):
        check_config_paths(rooted(jsonl_config(data), tmp_path / "no-such-root"))


def test_data_roots_from_the_command_line_stop_the_server(tmp_path, data):
    result = run_cli(tmp_path, jsonl_config(data), "--data-root", str(tmp_path / "elsewhere"))
    assert result.returncode == 2 and "server.data_roots[0]" in result.stderr, result.stderr
    (tmp_path / "elsewhere").mkdir()
    result = run_cli(tmp_path, jsonl_config(data), "--data-root", str(tmp_path / "elsewhere"))
    assert result.returncode == 2 and "datasets.docs.source.paths[0]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("auth", [False, True])
def test_dataset_names_never_become_paths(start_server, data, tmp_path, auth):
    tokens = write_tokens(tmp_path, f"{ALPHA}\n")
    server = start_server(jsonl_config(data, data_roots=[str(data)], **(
        {"auth_tokens_file": str(tokens)} if auth else {})))
    token = ALPHA if auth else None
    for name in NAMES:
        for method, req in (("stream", stream_request(name)), ("describe", pb.DescribeRequest(dataset=name))):
            err = raw_call(server.address, method, req, token)
            assert isinstance(err, grpc.RpcError), (name, method)
            assert err.code() == grpc.StatusCode.NOT_FOUND, (name, method, err.code(), err.details())
    ok = raw_call(server.address, "stream", stream_request("docs"), token)
    assert isinstance(ok, pb.BatchChunk)
    assert not [f for f in open_files(server.proc.pid) if "passwd" in f]


def open_files(pid: int) -> list[str]:
    """What a process has open (a descriptor closed while we look is skipped)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return found


def test_requests_that_do_not_parse_get_invalid_argument(start_server, data):
    server = start_server(jsonl_config(data))
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_stream("/tokenfeed.v1.TokenFeed/StreamBatches", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        for junk in (b"\xff\xff\xff", b"\x0a\x05ab", bytes(range(256)), b"\x12" * 40):
            with pytest.raises(grpc.RpcError) as info:
                next(iter(raw(junk, timeout=10)))
            assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
                (junk, info.value.code(), info.value.details())
    assert len(list(itertools.islice(StreamingDataset(server.address, "docs", seq_len=32, batch_size=2), 3))) == 3
