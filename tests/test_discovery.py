"""Replica discovery: what an address resolves to, the same list on every rank, and failover."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import StreamingDataLoader, StreamingDataset
from client.discovery import Replica, Replicas, resolve
from tests import certs
from tests.conftest import jsonl_config, make_documents, write_jsonl
from tests.hosts import HOSTS, ReplicaProcess, hosts_name


def _info(ip: str, port: int) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return (family, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0) if ":" in ip else (ip, port))


def test_a_name_in_hosts_resolves_to_its_replicas_sorted_and_deduplicated() -> None:
    with hosts_name(["127.0.0.3", "127.0.0.1", "127.0.0.2", "127.0.0.3"]) as name:
        want = [Replica(f"127.0.0.{i}:7000", name) for i in (1, 2, 3)]
        assert resolve(f"{name}:7000") == want
        assert resolve(f"dns:///{name}:7000") == want
        assert [Replicas(f"dns:///{name}:7000", rank).current.target for rank in range(4)] == \
            ["127.0.0.1:7000", "127.0.0.2:7000", "127.0.0.3:7000", "127.0.0.1:7000"]
    assert name not in HOSTS.read_text()  # the finalizer took our lines out again


def test_resolution_is_numeric_one_family_and_the_same_whatever_the_resolver_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver's answer in any order, with duplicates (one per socket type) and an AAAA per
    host: one sorted IPv4 list (10.0.0.10 after 10.0.0.9); IPv6 only where there is no IPv4."""
    answers = {"mixed": ["10.0.0.10", "fd00::1", "10.0.0.9", "10.0.0.10", "10.0.0.9", "fd00::2"],
               "v6": ["fd00::b", "fd00::a", "fd00::b"]}
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, port, **kw: [_info(ip, port) for ip in answers[host]])
    assert resolve("dns:///mixed:1") == [Replica("10.0.0.9:1", "mixed"), Replica("10.0.0.10:1", "mixed")]
    answers["mixed"].reverse()
    assert resolve("mixed:1") == [Replica("10.0.0.9:1", "mixed"), Replica("10.0.0.10:1", "mixed")]
    assert resolve("v6:2") == [Replica("[fd00::a]:2", "v6"), Replica("[fd00::b]:2", "v6")]


def test_addresses_that_are_not_expanded_and_bad_ones() -> None:
    assert resolve("127.0.0.1:5") == [Replica("127.0.0.1:5")]
    assert resolve("localhost:5") == [Replica("localhost:5")]  # one server: gRPC resolves the name itself
    assert resolve("unix:/tmp/s.sock") == [Replica("unix:/tmp/s.sock")]
    assert resolve("[::1]:5") == [Replica("[::1]:5")]
    # an explicit list keeps its order (rank r uses entry r % len), duplicates dropped
    assert resolve(["127.0.0.2:5", "127.0.0.1:5", "127.0.0.2:5"]) == [Replica("127.0.0.2:5"), Replica("127.0.0.1:5")]
    assert resolve("no-such-host.invalid:5") == [Replica("no-such-host.invalid:5")]  # tried again on failover
    with pytest.raises(ValueError, match="needs a port"):
        resolve("dns:///svc.ns")
    with pytest.raises(ValueError, match="DNS server in the address"):
        resolve("dns://8.8.8.8/svc.ns:50051")
    with pytest.raises(ValueError, match="at least one server"):
        resolve([])


def test_failover_resolves_again_and_moves_to_the_next_replica() -> None:
    with hosts_name(["127.0.0.1", "127.0.0.2"]) as name:
        replicas = Replicas(f"dns:///{name}:7000", rank=0)
        assert replicas.current.target == "127.0.0.1:7000"
        assert replicas.fail_over() == Replica("127.0.0.2:7000", name)
        text = HOSTS.read_text()  # the name now maps to .1 and .3: ours (.2) went away
        HOSTS.write_text(text.replace(f"127.0.0.2 {name}", f"127.0.0.3 {name}"))
        assert replicas.fail_over() == Replica("127.0.0.1:7000", name)  # rank 0's share of the new list
        assert replicas.fail_over() == Replica("127.0.0.3:7000", name)
    assert Replicas("127.0.0.1:7000", rank=3).fail_over() is None  # nowhere else to go


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tokens(address: Any, n: int, workers: int = 0, **kwargs: Any) -> list[np.ndarray]:
    ds = StreamingDataset(address, dataset="docs", seq_len=64, batch_size=2, seed=5, fields=["tokens"],
                          decode_ahead=0, batches_per_message=1, **kwargs)
    try:
        batches = iter(StreamingDataLoader(ds, num_workers=workers)) if workers else iter(ds)
        return [batch["tokens"].numpy() for batch in itertools.islice(batches, n)]
    finally:
        ds.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_rank_whose_replica_is_down_or_frozen_streams_the_same_batches_from_the_next(tmp_path: Path,
                                                                              start_server: Any) -> None:
    write_jsonl(tmp_path / "data", make_documents(60), files=2)
    live = start_server(jsonl_config(tmp_path / "data"))
    ref = _tokens(live.address, 6)
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there: connection refused
    for workers in (0, 2):  # each DataLoader worker process fails over on its own
        got = _tokens([dead, live.address], 6, workers, failover_s=0.2, reconnect_deadline_s=30)
        assert len(got) == 6 and all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True)), workers
    with socket.socket() as frozen:  # accepts TCP connections (the kernel does) but never answers
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(1)
        got = _tokens([f"127.0.0.1:{frozen.getsockname()[1]}", live.address], 6, failover_s=0.2,
                      reconnect_deadline_s=30)
    assert len(got) == 6 and all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True)), "frozen"


@pytest.mark.integration
@pytest.mark.slow
def test_tls_replicas_found_by_name_are_checked_against_the_name(tmp_path: Path) -> None:
    """Two TLS replicas on 127.0.0.2 and .3 whose certificate names only the Service's name (not
    the IPs the client dials, as with pods): every rank's handshake checks the name and streams."""
    write_jsonl(tmp_path / "data", make_documents(40), files=1)
    ca = certs.make_ca("test CA")
    with hosts_name(["127.0.0.2", "127.0.0.3"]) as name:
        leaf = certs.issue(ca, name, server=True, names=[name])
        for file, pem in (("ca", ca.cert_pem()), ("cert", leaf.cert_pem()), ("key", leaf.key_pem())):
            (tmp_path / f"{file}.pem").write_bytes(pem)
        tls = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
        first = ReplicaProcess("127.0.0.2", jsonl_config(tmp_path / "data"), tmp_path, 0, tls).start()
        second = ReplicaProcess("127.0.0.3", jsonl_config(tmp_path / "data"), tmp_path, first.server.port, tls)
        try:
            second.start()
            address = f"dns:///{name}:{first.server.port}"
            for rank in range(2):
                ds = StreamingDataset(address, dataset="docs", seq_len=64, batch_size=2, rank=rank, world_size=2,
                                      tls_ca=str(tmp_path / "ca.pem"), reconnect_deadline_s=10, failover_s=20)
                assert ds.address == [first, second][rank].address
                assert next(iter(ds))["input_ids"].shape == (2, 64)
                ds.close()
        finally:
            first.server.stop()
            second.server.stop()
