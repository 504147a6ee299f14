"""Sources in an object store, against a real S3-protocol server (moto's standalone server, its own
process on 127.0.0.1): every source kind from a bucket serves what the same files on local disk
serve, resume is exact, bad buckets and globs are named at start, a rewritten object is refused,
and a proxy that answers 503 SlowDown, resets connections and delays requests costs nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import yaml

from benchmarks._s3 import FaultProxy, S3Server, Schedule, client, objects, split, storage_options, upload
from client import RequestError, StreamingDataset, TokenfeedError
from server.__main__ import LOAD_EXIT_WAIT_S
from tests.conftest import ROOT
from tests.test_metrics import metrics_url, poll, scrape, value
from tests.resume_helpers import check_resume, same_batches, take
from tests.test_source_resume import write_source

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KINDS = ("jsonl", "jsonl.zst", "text", "parquet")
SEQ, BATCH = 64, 4


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def corpora(s3, tmp_path_factory):
    """Each source kind written locally and uploaded to s3://corpus/<kind>/; a prepared copy of the
    parquet corpus too. Returns (local configs, bucket configs) by dataset name."""
    root = tmp_path_factory.mktemp("corpora")
    local, remote = {}, {}
    opts = storage_options(s3.endpoint)
    for kind in KINDS:
        name = kind.replace(".", "_")
        source = write_source(kind, root / name)
        local[name] = {"source": source}
        upload(s3.endpoint, root / name, f"s3://corpus/{name}")
        pattern = source["paths"][0].rsplit("/", 1)[1]
        remote[name] = {"source": {**source, "paths": [f"s3://corpus/{name}/{pattern}"], "storage_options": opts}}
    hf = write_source("hf", root / "hf")  # a save_to_disk directory
    local["hf"] = {"source": hf}
    upload(s3.endpoint, root / "hf", "s3://corpus/hf")
    remote["hf"] = {"source": {**hf, "path": "s3://corpus/hf/saved", "storage_options": opts}}
    raw = root / "raw.yaml"
    raw.write_text(yaml.safe_dump({"datasets": local}))
    subprocess.run([sys.executable, "-m", "server", "prepare", "--config", str(raw), "--dataset", "parquet",
                    "--out", str(root / "prepared"), "--workers", "1"], cwd=ROOT, check=True, capture_output=True)
    upload(s3.endpoint, root / "prepared", "s3://corpus/prepared")
    local["tokens"] = {"source": {"type": "tokens", "path": str(root / "prepared")}}
    remote["tokens"] = {"source": {"type": "tokens", "path": "s3://corpus/prepared", "storage_options": opts}}
    return local, remote


@pytest.fixture(scope="module")
def servers(corpora, module_servers):
    local, remote = corpora
    return module_servers({"datasets": local}), module_servers({"datasets": remote})


def batches(address: str, name: str, rank: int, world: int, n: int, **kwargs) -> list:
    return take(StreamingDataset(address, name, seq_len=SEQ, batch_size=BATCH, seed=3, rank=rank,
                                 world_size=world, **kwargs), n)


@pytest.mark.parametrize("name", [k.replace(".", "_") for k in KINDS] + ["hf", "tokens"])
def test_a_bucket_serves_what_the_same_files_on_disk_serve(servers, name):
    on_disk, in_bucket = servers
    for rank in range(2):
        assert same_batches(batches(in_bucket.address, name, rank, 2, 12),
                            batches(on_disk.address, name, rank, 2, 12)), f"{name}, rank {rank}"
    info = StreamingDataset(in_bucket.address, name, seq_len=SEQ, batch_size=BATCH).describe()
    assert info.num_shards > 1
    assert not any("s3://" in s.name or "127.0.0.1" in s.name for s in info.shards)  # names relative to the prefix


def test_resume_from_a_bucket_is_exact(servers):
    _, in_bucket = servers

    def make():
        return StreamingDataset(in_bucket.address, "jsonl", seq_len=SEQ, batch_size=BATCH, seed=5, rank=1,
                                world_size=2)

    reference = take(make(), 20)
    for k in (3, 14):
        check_resume(make, make, reference, k)


def run_cli(tmp_path, config) -> subprocess.CompletedProcess:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("paths, words", [
    (["s3://no-such-bucket/web/*.jsonl"], ["datasets.web.source.paths[0]", "s3://no-such-bucket/web/*.jsonl",
                                           "matches no object"]),
    (["s3://corpus/jsonl/*.parquet"], ["datasets.web.source.paths[0]", "matches no object"]),
])
def test_a_missing_bucket_or_an_empty_glob_stops_the_server_naming_the_field(s3, corpora, tmp_path, paths, words):
    result = run_cli(tmp_path, {"datasets": {"web": {"source": {
        "type": "jsonl", "paths": paths, "storage_options": storage_options(s3.endpoint)}}}})
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_refused_credentials_stop_the_server_naming_the_field(tmp_path):
    store = S3Server(authenticate=True)
    try:
        opts = storage_options(store.endpoint)
        source = {"type": "jsonl", "paths": ["s3://corpus/web/*.jsonl"], "storage_options": opts}
        result = run_cli(tmp_path, {"datasets": {"web": {"source": source}}})
    finally:
        store.stop()
    assert result.returncode == 2, result.stderr
    assert "datasets.web.source.paths[0]: cannot list s3://corpus/web/*.jsonl" in result.stderr, result.stderr
    assert "PermissionError: The AWS Access Key Id you provided does not exist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_storage_options_are_named_at_start(s3, corpora, tmp_path):
    result = run_cli(tmp_path, {"datasets": {"web": {"source": {
        "type": "jsonl", "paths": ["s3://corpus/jsonl/*.jsonl"], "storage_options": {"no_such_option": 1}}}}})
    assert result.returncode == 2, result.stderr
    assert "datasets.web.source.paths[0]" in result.stderr and "no_such_option" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_object_rewritten_under_a_running_server_is_refused(s3, tmp_path, start_server):
    source = write_source("text", tmp_path / "text")
    upload(s3.endpoint, tmp_path / "text", "s3://rewritten/text")
    source = {**source, "paths": ["s3://rewritten/text/*.txt"], "storage_options": storage_options(s3.endpoint)}
    server = start_server({"datasets": {"docs": {"source": source, "retry": {"attempts": 1}}}})
    s3_client = client(s3.endpoint)
    for url in objects(s3.endpoint, "s3://rewritten/text/"):
        bucket, key = split(url)
        data = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3_client.put_object(Bucket=bucket, Key=key, Body=data[::-1])  # same size, other bytes: only the ETag tells
    with pytest.raises(RequestError, match=r"FAILED_PRECONDITION: dataset 'docs': \d+\.txt was rewritten"):
        batches(server.address, "docs", 0, 1, 4)
    assert server.proc.poll() is None  # the server stays up for everyone else


def test_throttling_resets_and_delays_between_server_and_store_lose_nothing(s3, corpora, servers, start_server):
    """Every 4th request to the store gets 503 SlowDown, every 7th a reset connection, every 3rd
    50 ms of latency; a 2-rank job reads through it exactly what a direct reader reads."""
    _, remote = corpora
    _, direct = servers
    proxy = FaultProxy(s3.endpoint, Schedule(slow_down=4, reset=7, delay=3, delay_s=0.05))
    try:
        source = {**remote["jsonl"]["source"], "storage_options": storage_options(proxy.endpoint)}
        faulty = start_server({"datasets": {"jsonl": {"source": source}}})
        for rank in range(2):
            got = batches(faulty.address, "jsonl", rank, 2, 15, reconnect_deadline_s=120)
            assert same_batches(got, batches(direct.address, "jsonl", rank, 2, 15)), f"rank {rank}"
    finally:
        proxy.close()
    assert proxy.counts.get("slow_down", 0) > 0 and proxy.counts.get("reset", 0) > 0, proxy.counts


def test_a_store_that_stops_answering_mid_read_does_not_hold_the_server_past_its_shutdown(s3, corpora,
                                                                                        start_server):
    """SIGTERM while a load thread's read hangs in a store that stopped answering (the proxy holds
    every request for 2 minutes): the server exits within its grace period and the loads' wait,
    with status 0 and a line saying what it left, not after the read's timeouts and retries."""
    _, remote = corpora
    proxy = FaultProxy(s3.endpoint, Schedule())
    try:
        source = {**remote["jsonl"]["source"], "storage_options": storage_options(proxy.endpoint)}
        server = start_server({"server": {"shutdown_grace_s": 1.0}, "datasets": {"jsonl": {"source": source}}})
        proxy.schedule = Schedule(delay=1, delay_s=120.0)
        asked = proxy.requests
        ds = StreamingDataset(server.address, "jsonl", seq_len=SEQ, batch_size=BATCH, reconnect_deadline_s=1.0)

        def first_batch() -> None:
            try:
                next(iter(ds))
            except TokenfeedError:  # the server went away before it came: expected here
                pass
        threading.Thread(target=first_batch, daemon=True).start()
        poll(lambda: proxy.requests > asked)  # a shard's read is now held in the proxy
        t0 = time.monotonic()
        code = server.stop()
        took = time.monotonic() - t0
    finally:
        proxy.close()
    assert code == 0 and took < 1.0 + LOAD_EXIT_WAIT_S + 3.0, (code, took, server.log()[-3000:])
    assert server.wait_log("load thread(s) still reading"), server.log()[-3000:]


def test_a_second_server_reuses_the_shared_cache_and_tokenizes_nothing(s3, corpora, start_server):
    """The cache's second tier in the bucket: one server tokenizes an epoch and writes each shard
    there; a fresh server (another job, a new replica) on the same content reads them back and
    its tokenizer counters stay at 0, serving the same batches."""
    _, remote = corpora
    client(s3.endpoint).create_bucket(Bucket="shared-cache")
    cache = {"disk": {"path": "s3://shared-cache/tokenfeed", "storage_options": storage_options(s3.endpoint)}}
    # (no prefetch: the shards a server reads are then exactly those its batches need)
    config = {"server": {"metrics_port": 0}, "cache": cache, "prefetch": {"depth": 0},
              "datasets": {"web": remote["jsonl"]}}
    first = start_server(config)
    epoch = batches(first.address, "web", 0, 1, 30)
    tokenized = value(scrape(metrics_url(first)), "tokenfeed_tokenized_shards_total")
    assert tokenized >= 2
    poll(lambda: len(objects(s3.endpoint, "s3://shared-cache/tokenfeed/")) >= tokenized)
    first.stop()

    second = start_server(config)
    assert same_batches(batches(second.address, "web", 0, 1, 30), epoch)
    samples = scrape(metrics_url(second))
    assert value(samples, "tokenfeed_tokenized_shards_total") == 0
    assert value(samples, "tokenfeed_tokenizer_documents_total") == 0
    assert value(samples, "tokenfeed_cache_shared_reads_total") > 0


def test_prepare_writes_to_a_bucket_resumably_as_it_writes_a_directory(s3, corpora, servers, tmp_path):
    """`data-server prepare --out s3://...`: stopped after 2 shards, run again to finish (finished
    shards are kept), byte-identical to a local preparation of the same data (served from a bucket:
    test_a_bucket_serves_what_the_same_files_on_disk_serve[tokens])."""
    local, remote = corpora
    client(s3.endpoint).create_bucket(Bucket="prepared")
    raw = tmp_path / "raw.yaml"
    raw.write_text(yaml.safe_dump({"datasets": {"web": remote["jsonl"]}}))

    def prepare(out: str, *extra: str) -> None:
        subprocess.run([sys.executable, "-m", "server", "prepare", "--config", str(raw), "--dataset", "web",
                        "--out", out, "--workers", "1", *extra], cwd=ROOT, check=True, capture_output=True)

    prepare("s3://prepared/web", "--max-shards", "2")
    first = set(objects(s3.endpoint, "s3://prepared/web/"))
    assert not any(u.endswith("manifest.json") for u in first) and len([u for u in first if u.endswith(".tft")]) == 2
    prepare("s3://prepared/web")
    prepare(str(tmp_path / "local"))
    in_bucket = {u.rsplit("/", 1)[1]: u for u in objects(s3.endpoint, "s3://prepared/web/")}
    local_files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(in_bucket) == local_files  # no plan or progress left behind
    s3_client = client(s3.endpoint)
    for name, url in in_bucket.items():
        bucket, key = split(url)
        assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == (tmp_path / "local" / name).read_bytes()

    bad = subprocess.run([sys.executable, "-m", "server", "prepare", "--config", str(raw), "--dataset", "web",
                          "--out", "s3://prepared/other", "--storage-options", "[1]"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--storage-options: a JSON object is needed" in bad.stderr, bad.stderr
