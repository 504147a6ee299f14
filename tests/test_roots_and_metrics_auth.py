"""Issue 17, items 5 and 7: ``server.data_roots`` holds while serving, not only at start-up (a file
or directory swapped for a symlink out of the root is refused when read, never served), and
/metrics can require a bearer token."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from server.config import parse_config
from server.stages.dataset import Dataset
from server.errors import FailedPrecondition
from server.stages.identity import FULL_HASH_BYTES, SAMPLE_BYTES, digest_file
from server.prepare import prepare
from server.stages import files
from server.stages.files import OutsideDataRoots, confine_reads
from server.stages.sources.base import BadRecords
from tests.conftest import ROOT, ServerProcess, jsonl_config, make_documents, write_jsonl
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

MARKER = b"TOPSECRET-"
StartServer = Callable[..., ServerProcess]  # the conftest fixture `start_server`
_METRICS_LINE = re.compile(r"metrics: serving (http://\S+/metrics)")


# ---- data roots at every open (in process) --------------------------------------------------------
@pytest.fixture
def confined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """``(root, outside)``; reads in this process are confined to ``root`` for the test only."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    monkeypatch.setattr(files, "_DATA_ROOTS", files.data_roots())  # restored after the test
    return root, outside


def source_in(kind: str, root: Path) -> tuple[dict[str, object], Path]:
    """A one-file source of ``kind`` under ``root`` (config, the file it reads)."""
    data = root / kind
    if kind == "jsonl":
        return {"type": "jsonl", "paths": [str(data / "*.jsonl")]}, write_jsonl(data, make_documents(5))[0]
    data.mkdir()
    if kind == "text":
        (data / "a.txt").write_text("one document")
        return {"type": "text", "paths": [str(data / "*.txt")]}, data / "a.txt"
    if kind == "parquet":
        pq.write_table(pa.table({"text": ["one", "two"]}), data / "a.parquet")
        return {"type": "parquet", "paths": [str(data / "*.parquet")]}, data / "a.parquet"
    raw, _ = source_in("jsonl", root)
    config = parse_config({"datasets": {"raw": {"source": raw}}})
    prepare(config, "raw", str(data / "prepared"), workers=1)
    return {"type": "tokens", "path": str(data / "prepared")}, data / "prepared" / "shard-000000.tft"


@pytest.mark.parametrize("kind", ["jsonl", "text", "parquet", "tokens"])
def test_every_source_refuses_a_file_swapped_out_of_the_roots(confined: tuple[Path, Path], kind: str) -> None:
    """The twin outside is a byte-for-byte copy: content checks pass, only the roots refuse it."""
    root, outside = confined
    source, path = source_in(kind, root)
    confine_reads([str(root.resolve())])
    ds = Dataset("d", parse_config({"datasets": {"d": {"source": source}}}).datasets["d"])
    twin = outside / path.name
    twin.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(twin)
    if kind != "tokens":
        with pytest.raises(OutsideDataRoots, match="resolves outside server.data_roots"):
            ds.source.read_shard(ds.shards[0], BadRecords())
    with pytest.raises(FailedPrecondition, match=f"{path.name} resolves outside server.data_roots"):
        ds.tokenize_shard(0)  # refused at once: an escape is not an I/O fault to retry


# ---- data roots while serving ----------------------------------------------------------------------
def big_corpus(path: Path) -> Path:
    """One ASCII JSONL file just over ``FULL_HASH_BYTES``, so that its identity is a sampled digest."""
    path.mkdir(parents=True)
    filler = " ".join(["alpha", "beta", "gamma", "delta", "tokens", "stream"] * 100)
    lines, size, i = [], 0, 0
    while size < FULL_HASH_BYTES + SAMPLE_BYTES // 2:
        line = json.dumps({"text": f"doc-{i:06d} {filler}"}) + "\n"
        lines.append(line)
        size, i = size + len(line), i + 1
    out = path / "part-000.jsonl"
    out.write_text("".join(lines))
    return out


def secret_twin(original: Path, secret: Path) -> None:
    """A copy of ``original`` with one document's text replaced by ``MARKER``s, where the sampled
    identity does not look: the server's identity check cannot tell the two apart, so only the
    data roots stand between the secret and a client."""
    data = bytearray(original.read_bytes())
    start = data.index(b"\n", 3 * SAMPLE_BYTES // 2) + 1  # a line past the first sample...
    end = data.index(b"\n", start)
    assert end < (len(data) - SAMPLE_BYTES) // 2  # ...that ends before the middle one
    head = len(b'{"text": "')
    data[start + head:end - 2] = (MARKER * (end - start))[:end - 2 - start - head]
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(bytes(data))
    assert digest_file(str(secret), len(data)) == digest_file(str(original), len(data))


def rooted_server(start_server: StartServer, root: Path) -> ServerProcess:
    """A server confined to ``root`` with ``docs`` (the big file under data/sub) and ``other``,
    whose file is a symlink to another file inside the root: that stays allowed."""
    config = jsonl_config(root / "data" / "sub", shard_bytes=1 << 20, data_roots=[str(root)])
    (kept,) = write_jsonl(root / "store", make_documents(20, seed=4), files=1)
    (root / "other").mkdir()
    (root / "other" / "part-000.jsonl").symlink_to(kept)
    config["datasets"]["other"] = jsonl_config(root / "other")["datasets"]["docs"]
    return start_server(config)


def swap_file(root: Path, outside: Path) -> None:
    """Atomically replace the corpus file with a symlink to its secret twin outside the root."""
    corpus = root / "data" / "sub" / "part-000.jsonl"
    secret_twin(corpus, outside / "secret.jsonl")
    link = corpus.with_name(".swap")
    link.symlink_to(outside / "secret.jsonl")
    os.replace(link, corpus)


def swap_directory(root: Path, outside: Path) -> None:
    """Replace the corpus's directory with a symlink to a directory outside holding the twin."""
    sub = root / "data" / "sub"
    secret_twin(sub / "part-000.jsonl", outside / "sub" / "part-000.jsonl")
    sub.rename(sub.with_name("sub.orig"))
    sub.symlink_to(outside / "sub", target_is_directory=True)


def read_epoch(address: str, dataset: str) -> tuple[list[bytes], grpc.RpcError | None]:
    """The bytes of every row of ``dataset``'s first epoch, and the error the stream ended with
    (``None`` once a row of the next epoch arrived)."""
    rows: list[bytes] = []
    request = pb.StreamRequest(dataset=dataset, seq_len=1024, batch_size=16, batches_per_message=4, world_size=1)
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        call = pb_grpc.TokenFeedStub(channel).StreamBatches(request, timeout=90)
        try:
            for chunk in call:
                rows += [row[row < 256].astype(np.uint8).tobytes() for row in wire.decode_chunk(chunk).reshape(
                    -1, chunk.seq_len + 1)]
                if max(chunk.epochs) >= 1:
                    call.cancel()
                    return rows, None
        except grpc.RpcError as err:
            return rows, err
    raise AssertionError("the stream ended without an error before its first epoch did")


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("swap", [swap_file, swap_directory], ids=["file", "directory"])
def test_a_symlink_swapped_in_after_start_up_is_refused_not_served(start_server: StartServer, tmp_path: Path,
                                                                     swap: Callable[[Path, Path], None]) -> None:
    """The start-up checks pass, then the corpus (or its directory) becomes a symlink to a twin
    outside the root that the content identity cannot tell apart (sampled digest of a large file):
    before issue 17 its secret was streamed. Now no byte of it is, the stream ends naming the
    problem, and the server goes on serving the other dataset (itself an in-root symlink)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    big_corpus(root / "data" / "sub")
    server = rooted_server(start_server, root)
    swap(root, outside)  # after the start-up checks passed, before any shard is read
    rows, err = read_epoch(server.address, "docs")
    assert not [r for r in rows if MARKER in r], "the secret outside server.data_roots was streamed"
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "part-000.jsonl resolves outside server.data_roots" in err.details(), err.details()
    assert str(outside) not in err.details()  # where the link points is for the server's log only
    # Refused at once, not retried as an I/O fault; the server stays up and serves the rest.
    assert "failed; retry" not in server.log() and "Traceback" not in server.log()
    assert server.wait_log(f"resolves to {outside.resolve()}", f"data_roots ({root.resolve()})"), server.log()
    assert server.proc.poll() is None
    other, err = read_epoch(server.address, "other")
    assert other and err is None


# ---- /metrics behind a bearer token ---------------------------------------------------------------
def metrics_url(server: ServerProcess) -> str:
    """The address the server logged for /metrics (port 0 picks a free one)."""
    match = _METRICS_LINE.search(server.log())
    assert match, "the server did not log its metrics address:\n" + server.log()
    return match.group(1)


def scrape(url: str, token: str | None = None) -> tuple[int, Message, str]:
    """Status, headers and body of one GET of /metrics (``token`` as a bearer token)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def assert_guarded(url: str, token: str) -> None:
    """401 without a token and with a wrong one, the metrics with the right one."""
    for given in (None, "wrong-" + token, token[:-1]):
        status, headers, body = scrape(url, given)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (given, status)
        assert "tokenfeed_" not in body
    status, _, body = scrape(url, token)
    assert status == 200 and "tokenfeed_active_streams" in body


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_metrics_token_file_guards_scrapes_and_no_token_leaves_them_open(start_server: StartServer,
                                                                         tmp_path: Path) -> None:
    """The token file (the one Prometheus reads as credentials_file) closes /metrics to anyone
    without it; a server without the option serves scrapes as before."""
    write_jsonl(tmp_path / "data", make_documents(20, seed=5), files=1)
    token = secrets.token_urlsafe(32)
    (tmp_path / "metrics.token").write_text(token + "\n")  # the file Prometheus reads too
    guarded = start_server(jsonl_config(tmp_path / "data", metrics_port=0,
                                        metrics_token_file=str(tmp_path / "metrics.token")))
    assert_guarded(metrics_url(guarded), token)
    assert token not in guarded.log()
    open_server = start_server(jsonl_config(tmp_path / "data", metrics_port=0))
    status, _, body = scrape(metrics_url(open_server))
    assert status == 200 and "tokenfeed_active_streams" in body


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_metrics_token_from_the_environment_by_flag(start_server: StartServer, tmp_path: Path) -> None:
    """The token may come from an environment variable (containers), named by a flag."""
    write_jsonl(tmp_path / "data", make_documents(20, seed=5), files=1)
    token = secrets.token_urlsafe(32)
    server = start_server(jsonl_config(tmp_path / "data", metrics_port=0), env={"SCRAPE_TOKEN": token},
                          extra_args=["--metrics-token-env", "SCRAPE_TOKEN"])
    assert_guarded(metrics_url(server), token)


@pytest.mark.parametrize("server, env, words", [
    ({"metrics_token_file": "{tmp}/missing"}, {}, "server.metrics_token_file: cannot read"),
    ({"metrics_token_file": "{tmp}/short.token"}, {}, "at least 16 characters"),
    ({"metrics_token_file": "{tmp}/two.token"}, {}, "expected one token"),
    ({"metrics_token_env": "SCRAPE_TOKEN"}, {"SCRAPE_TOKEN": " "}, "metrics_token_env ($SCRAPE_TOKEN): holds no"),
    ({"metrics_token_file": "{tmp}/two.token", "metrics_token_env": "X"}, {}, "set one of them"),
])
def test_bad_metrics_token_settings_stop_the_server_with_a_named_error(tmp_path: Path, server: dict[str, str],
                                                                       env: dict[str, str], words: str) -> None:
    """A configured but unusable token stops the server with the field named: never an open endpoint."""
    write_jsonl(tmp_path / "data", make_documents(5), files=1)
    (tmp_path / "short.token").write_text("short\n")
    (tmp_path / "two.token").write_text(f"{'a' * 20} {'b' * 20}\n")
    config = jsonl_config(tmp_path / "data", metrics_port=0, **{k: v.format(tmp=tmp_path) for k, v in server.items()})
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0", "--config", str(path)],
                            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
