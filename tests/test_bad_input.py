"""Bad requests get a status naming the problem; the server keeps serving everyone else."""

from __future__ import annotations

import itertools
import subprocess
import sys

import grpc
import pytest
import yaml

from client import RequestError, StreamingDataset
from tests.conftest import ROOT, jsonl_config
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc


def first_message(address: str, **fields) -> grpc.RpcError | pb.BatchChunk:
    request = {"dataset": "docs", "seq_len": 64, "batch_size": 2, "world_size": 1, **fields}
    with grpc.insecure_channel(address) as channel:
        try:
            return next(iter(pb_grpc.TokenFeedStub(channel).StreamBatches(pb.StreamRequest(**request), timeout=30)))
        except grpc.RpcError as err:
            return err


CASES = [
    ({"dataset": "nope"}, grpc.StatusCode.NOT_FOUND, ["'nope'", "docs"]),
    ({"seq_len": 0}, grpc.StatusCode.INVALID_ARGUMENT, ["seq_len"]),
    ({"seq_len": 5000}, grpc.StatusCode.INVALID_ARGUMENT, ["seq_len", "4096"]),
    ({"batch_size": 0}, grpc.StatusCode.INVALID_ARGUMENT, ["batch_size"]),
    ({"batch_size": 100}, grpc.StatusCode.INVALID_ARGUMENT, ["batch_size", "64"]),
    ({"world_size": 0}, grpc.StatusCode.INVALID_ARGUMENT, ["world_size"]),
    ({"rank": 2, "world_size": 2}, grpc.StatusCode.INVALID_ARGUMENT, ["rank", "world_size=2"]),
    ({"packing": "zip"}, grpc.StatusCode.INVALID_ARGUMENT, ["packing"]),
]


def test_each_bad_request_gets_a_named_status_and_the_server_keeps_serving(start_server, corpus):
    path, _ = corpus
    server = start_server(jsonl_config(path, max_seq_len=4096, max_batch_size=64))
    for fields, code, words in CASES:
        err = first_message(server.address, **fields)
        assert isinstance(err, grpc.RpcError), fields
        assert err.code() == code, (fields, err.details())
        for word in words:
            assert word in err.details(), (fields, err.details())
        assert isinstance(first_message(server.address), pb.BatchChunk), "server stopped serving"


def test_client_raises_readable_errors(start_server, corpus):
    path, _ = corpus
    server = start_server(jsonl_config(path, max_seq_len=4096))
    with pytest.raises(RequestError, match="unknown dataset 'web'.*docs") as info:
        next(iter(StreamingDataset(server.address, "web", seq_len=64, batch_size=2)))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ValueError, match="seq_len: must be in \\[1, 4096\\], got 9000"):
        next(iter(StreamingDataset(server.address, "docs", seq_len=9000, batch_size=2)))
    with pytest.raises(ValueError, match="rank"):
        StreamingDataset(server.address, "docs", rank=3, world_size=2)
    assert len(list(itertools.islice(StreamingDataset(server.address, "docs", seq_len=64, batch_size=2), 3))) == 3


def run_cli(tmp_path, config) -> subprocess.CompletedProcess:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    return subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("config, words", [
    ({"datasets": {"docs": {"source": {"type": "jsonl", "paths": ["/nonexistent/*.jsonl"]}}}},
     ["datasets.docs.source.paths[0]", "/nonexistent/*.jsonl", "matches no file"]),
    ({"datasets": {"docs": {"source": {"type": "jsonl"}}}}, ["datasets.docs.source", "paths", "Field required"]),
    ({"datasets": {"docs": {"source": {"type": "jsonl", "paths": ["x"], "text_feld": "t"}}}},
     ["text_feld", "Extra inputs"]),
    ({"server": {"port": "abc"}, "datasets": {}}, ["server.port"]),
    ("datasets: [unclosed", ["not valid YAML"]),
])
def test_bad_config_stops_the_server_with_a_named_error(tmp_path, config, words):
    result = run_cli(tmp_path, config)
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
