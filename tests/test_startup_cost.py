"""Start-up cost on many small files (issue 23, goal 4): the per-file work of building a dataset
stays a cut of a string and a stat, never a path normalisation or an open that the answer does
not need. Each test fails on the code before the fix; the figures are ``benchmarks/bench_scale.py``."""

from __future__ import annotations

import gc
import json
import os
import posixpath
from typing import Any

import pytest

from server.app import build_datasets
from server.config import parse_config
from server.errors import ConfigError, FailedPrecondition
from server.stages import files, identity
from server.stages.dataset import Dataset, dumps_flat
from server.stages.sources import base, jsonl


def small_files(root: Any, n: int = 30) -> None:
    for i in range(n):
        sub = root / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:03d}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n")


def build(root: Any, cache: Any) -> Dataset:
    source = {"type": "jsonl", "paths": [str(root / "**/*.jsonl")], "shard_bytes": "64KiB"}
    config = parse_config({"datasets": {"d": {"source": source}}})
    return Dataset("d", config.datasets["d"], digest_cache_dir=str(cache))


@pytest.mark.parametrize(("path", "root"), [
    ("/a/b/c", "/a"), ("/a/b/c", "/"), ("/a/b", "/a/b"), ("/a/./b", "/a"), ("/a/b/../c", "/a"), ("/a//b", "/a"),
    ("/ab/c", "/a"), ("/a/b/", "/a"), ("/a/b", "/a/"), ("/a/b/.", "/a"), ("/a/b/..", "/a"), ("/a/.b/c", "/a"),
    ("/a/b..c/d", "/a"), ("/a/b/c", "/a/./b"), ("/a/b/c", "/x"), ("/a/b/.c", "/a"), ("/a/..b/c", "/a"),
    ("/a/b", "/a/b/c"), ("/a/b/c//", "/a"), ("/a/b/c/..", "/a/b"),
])
def test_relative_equals_relpath(path, root):
    assert files.relative(path, root) == os.path.relpath(path, root)
    assert files.relative_all([path], root) == {path: os.path.relpath(path, root)}  # its loop, inlined


def test_building_a_dataset_normalises_no_path_per_file(tmp_path, monkeypatch):
    small_files(tmp_path / "data")
    first = build(tmp_path / "data", tmp_path / "cache")
    calls = []
    real = posixpath.relpath
    monkeypatch.setattr(os.path, "relpath", lambda *a: calls.append(a) or real(*a))
    again = build(tmp_path / "data", tmp_path / "cache")
    assert len(calls) <= 2, f"os.path.relpath called {len(calls)} times for 30 files"
    assert again.fingerprint == first.fingerprint  # the content identity is what it was


def test_a_small_jsonl_file_is_one_shard_without_being_read_for_cuts(tmp_path, monkeypatch):
    small_files(tmp_path / "data")
    opened = []
    real = jsonl.Storage.open
    monkeypatch.setattr(jsonl.Storage, "open", lambda self, path: opened.append(path) or real(self, path))
    ds = build(tmp_path / "data", tmp_path / "cache")
    assert ds.num_shards == 30 and opened == []
    big = tmp_path / "data" / "big.jsonl"
    big.write_text("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(2000)))
    assert build(tmp_path / "data", tmp_path / "cache").num_shards > 31 and opened == [str(big)]


def test_a_restart_sniffs_no_file_again_but_a_changed_one(tmp_path, monkeypatch):
    small_files(tmp_path / "data")
    first = build(tmp_path / "data", tmp_path / "cache")
    sniffed = []
    real = base._sniff
    monkeypatch.setattr(base, "_sniff", lambda path, storage: sniffed.append(path) or real(path, storage))
    again = build(tmp_path / "data", tmp_path / "cache")
    assert sniffed == [] and again.fingerprint == first.fingerprint
    changed = tmp_path / "data" / "d0" / "f000.jsonl"
    changed.write_bytes(b"\x00binary, not JSON Lines\n")
    with pytest.raises(ConfigError, match="is a binary file"):
        build(tmp_path / "data", tmp_path / "cache")
    assert sniffed == [str(changed)]
    changed.write_text(json.dumps({"text": "new"}) + "\n")
    other = build(tmp_path / "data", tmp_path / "elsewhere")  # another cache: every file sniffed
    assert other is not None and len(sniffed) > 30


def test_building_a_dataset_stats_each_file_once(tmp_path, monkeypatch):
    """The listing's stat serves the size, the digest-cache key and the remembered format; reading
    a shard later still stats afresh, so a file changed after start-up is refused."""
    small_files(tmp_path / "data")
    build(tmp_path / "data", tmp_path / "cache")
    stats: list[str] = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(str(p)) or real(p, *a, **k))
    ds = build(tmp_path / "data", tmp_path / "cache")
    per_file = {p: stats.count(p) for p in set(stats) if p.endswith(".jsonl")}
    assert len(per_file) == 30 and max(per_file.values()) == 1, per_file
    monkeypatch.setattr(os, "stat", real)
    changed = tmp_path / "data" / "d0" / "f000.jsonl"
    index = next(s.index for s in ds.shards if s.parts[0].path == str(changed))
    changed.write_text(json.dumps({"text": "document 0, rewritten"}) + "\n")
    with pytest.raises(FailedPrecondition, match="changed size"):
        ds.tokenize_shard(index)


@pytest.mark.parametrize("paths", [
    ["/a/b/c", "/a/b/d"], ["/a/b", "/a/bc"], ["/x", "/y"], ["/a/b/c/d", "/a/b/c/e", "/a/b/f"], ["/a/b/c"],
    ["/a/./b", "/a/./c"], ["/a/b/c", "/a/b/c/d"], ["/a//b", "/a/c"],
])
def test_common_root_equals_commonpath(paths):
    root = os.path.commonpath(paths)
    assert files.common_root(paths) == (os.path.dirname(root) if len(paths) == 1 else root)


@pytest.mark.parametrize("content", [
    [["d0/f000.jsonl", 0, 34, 34, "blake2b:00ff"]], [["ä/ü \"q\"\\.jsonl", 0, -1, 7, "x"], ["b", 1, 2, 3, "y"]],
    [["all files", "abc"]], [["a", 1.5]], [],
])
def test_fingerprint_encoding_equals_json_dumps(content):
    assert dumps_flat(content) == json.dumps(content)


# ---- the digest cache between starts, and what a warm start still catches -----------------------
def test_a_restart_on_unchanged_files_neither_hashes_nor_rewrites_the_digest_cache(tmp_path, monkeypatch):
    small_files(tmp_path / "data")
    first = build(tmp_path / "data", tmp_path / "cache")
    cache_file = tmp_path / "cache" / "file-digests.json"
    before = cache_file.stat()
    hashed: list[str] = []
    real_digest = identity.digest_file
    monkeypatch.setattr(identity, "digest_file", lambda path, size: hashed.append(path) or real_digest(path, size))
    written: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b, **k: written.append(str(b)) or real_replace(a, b, **k))
    again = build(tmp_path / "data", tmp_path / "cache")
    assert hashed == [] and written == [] and again.fingerprint == first.fingerprint
    after = cache_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # one file rewritten (same size, other bytes): hashed again, alone, and the cache written once
    changed = tmp_path / "data" / "d1" / "f001.jsonl"
    text = changed.read_text()
    changed.write_text(text.replace("document 1", "document X"))
    os.utime(changed, ns=(before.st_mtime_ns + 10**9, before.st_mtime_ns + 10**9))
    third = build(tmp_path / "data", tmp_path / "cache")
    assert hashed == [str(changed)] and written == [str(cache_file)]
    assert third.fingerprint != first.fingerprint
    assert third._files[str(changed)].digest != first._files[str(changed)].digest


def test_a_warm_start_catches_a_file_with_the_same_size_and_mtime_but_another_inode(tmp_path):
    """The cache key is (path, size, mtime, inode): a file replaced by a copy with another content
    (same size, mtime set back, as ``cp -p`` or an unpacked archive leaves it) is hashed again."""
    small_files(tmp_path / "data")
    first = build(tmp_path / "data", tmp_path / "cache")
    target = tmp_path / "data" / "d2" / "f002.jsonl"
    st = target.stat()
    replacement = tmp_path / "data" / "d2" / "new.tmp"
    replacement.write_text(target.read_text().replace("document 2", "document Z"))
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert build(tmp_path / "data", tmp_path / "cache").fingerprint != first.fingerprint


def test_the_digest_cache_forgets_files_that_are_gone(tmp_path):
    """A host that served a corpus since deleted (a job's temporary directory) does not carry its
    digests forever: the next start that learns something writes only files that exist, the other
    corpora's included; and they still start warm."""
    import shutil

    for name in ("a", "b", "c"):
        small_files(tmp_path / name)
    build(tmp_path / "a", tmp_path / "cache")
    b = build(tmp_path / "b", tmp_path / "cache")
    cache_file = tmp_path / "cache" / "file-digests.json"
    assert len(json.loads(cache_file.read_text())["files"]) == 60
    shutil.rmtree(tmp_path / "a")
    build(tmp_path / "c", tmp_path / "cache")  # learns c's 30 files: a's 30 are left out
    kept = json.loads(cache_file.read_text())["files"]
    assert len(kept) == 60 and not [p for p in kept if p.startswith(str(tmp_path / "a"))]
    assert all(os.path.exists(p) for p in kept)
    cache = identity.DigestCache(str(tmp_path / "cache"))
    assert cache.prune() == 0 and not cache.dirty
    assert build(tmp_path / "b", tmp_path / "cache").fingerprint == b.fingerprint


def test_the_digest_cache_stays_json_that_older_servers_read(tmp_path):
    """Written by orjson, read by the stdlib: same format, same version; and a cache the stdlib
    wrote (an older server) is used as it is."""
    small_files(tmp_path / "data")
    first = build(tmp_path / "data", tmp_path / "cache")
    cache_file = tmp_path / "cache" / "file-digests.json"
    data = json.loads(cache_file.read_text())
    assert data["version"] == 1 and len(data["files"]) == 30
    path, entry = next(iter(data["files"].items()))
    st = os.stat(path)
    assert entry[:3] == [st.st_size, st.st_mtime_ns, st.st_ino] and entry[3].startswith("blake2b:")
    cache_file.write_text(json.dumps(data))  # as the stdlib writes it
    cache = identity.DigestCache(str(tmp_path / "cache"))
    assert cache.get(path, files.FileStat.of(path)) == entry[3] and not cache.dirty
    assert build(tmp_path / "data", tmp_path / "cache").fingerprint == first.fingerprint


@pytest.mark.parametrize("source", [
    {"type": "jsonl", "paths": ["{root}/**/*.jsonl"], "shard_bytes": "1KiB"},  # ranges of the big file
    {"type": "text", "paths": ["{root}/**/*.jsonl"], "shard_bytes": "256B"},  # several files a shard
])
def test_the_fingerprint_is_the_hash_of_every_shards_content(tmp_path, source):
    """The fingerprint's fast path (a shard of one file written directly) hashes exactly what
    ``dumps_flat(shard_content(i))`` says, shard after shard: fingerprints of earlier servers hold."""
    import hashlib

    from server.stages.dataset import _IDENTITY_VERSION
    small_files(tmp_path / "data")
    lines = (json.dumps({"text": "é" * (i % 50)}) + "\n" for i in range(200))
    (tmp_path / "data" / "big.jsonl").write_text("".join(lines))
    source = {**source, "paths": [p.format(root=tmp_path / "data") for p in source["paths"]]}
    config = parse_config({"datasets": {"d": {"source": source}}})
    ds = Dataset("d", config.datasets["d"], digest_cache_dir=str(tmp_path / "cache"))
    h = hashlib.sha256(_IDENTITY_VERSION.encode())
    h.update(ds.document_settings().encode())
    h.update(ds.info.identity.encode())
    for shard in ds.shards:
        h.update(dumps_flat(ds.shard_content(shard.index)).encode())
    assert ds.num_shards >= 3 and ds.fingerprint == h.hexdigest()[:16]


def test_building_datasets_pauses_the_collector_and_restores_it(tmp_path, monkeypatch):
    small_files(tmp_path / "data")

    def config(pattern: str) -> Any:
        return parse_config({"datasets": {"d": {"source": {"type": "jsonl", "paths": [str(tmp_path / pattern)]}}}})

    seen: list[bool] = []
    real = jsonl.JsonlSource.shards
    monkeypatch.setattr(jsonl.JsonlSource, "shards", lambda self: seen.append(gc.isenabled()) or real(self))
    try:
        assert gc.isenabled()
        build_datasets(config("data/**/*.jsonl"))
        assert seen == [False] and gc.isenabled()
        with pytest.raises(ConfigError):
            build_datasets(config("none/*.jsonl"))
        assert gc.isenabled()
        gc.disable()
        build_datasets(config("data/**/*.jsonl"))
        assert not gc.isenabled()  # left as it was
    finally:
        gc.enable()
