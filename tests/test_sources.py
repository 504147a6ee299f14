"""Sources on real files: JSONL (plain, gzip, zstd), text, Parquet, HF datasets; bad records and
broken files counted and skipped; config errors that name the field; fingerprints."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import zstandard

from server.config import parse_config
from server.stages.dataset import Dataset
from server.errors import ConfigError
from tests.conftest import make_documents, write_jsonl


def dataset(source: dict[str, Any], name: str = "d") -> Dataset:
    return Dataset(name, parse_config({"datasets": {name: {"source": source}}}).datasets[name])


def documents(ds: Dataset) -> list[str]:
    """Every document of every shard, in shard order (byte tokenizer: decode = bytes)."""
    out = []
    for i in range(ds.num_shards):
        shard = ds.tokenize_shard(i)
        for a, b in zip(shard.offsets[:-1].tolist(), shard.offsets[1:].tolist()):
            assert shard.tokens[b - 1] == ds.info.eos_id
            out.append(bytes(shard.tokens[a : b - 1].astype("u1").tolist()).decode())
    return out


def jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"meta": {"body": d}}) + "\n" for d in docs).encode()


# ---- JSONL -----------------------------------------------------------------------------------
def test_jsonl_nested_field_split_into_byte_ranges(tmp_path):
    docs = make_documents(200, max_len=3000)
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(docs))
    ds = dataset({"type": "jsonl", "paths": [str(tmp_path / "*.jsonl")], "text_field": "meta.body",
                  "shard_bytes": 16 << 10})
    assert ds.num_shards > 5
    assert documents(ds) == docs and ds.bad.snapshot() == {}


def test_compressed_jsonl_one_shard_per_file(tmp_path):
    docs = make_documents(120)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs[:40])))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs[40:80])))
    # Several zstd frames in one file, as streaming writers produce.
    frames = [zstandard.ZstdCompressor().compress(jsonl_bytes(docs[i : i + 10])) for i in range(80, 120, 10)]
    (tmp_path / "c.jsonl.zst").write_bytes(b"".join(frames))
    ds = dataset({"type": "jsonl", "paths": [str(tmp_path / "*.jsonl.*")], "text_field": "meta.body",
                  "shard_bytes": 1024})
    assert [os.path.basename(s.name) for s in ds.shards] == ["a.jsonl.gz", "b.jsonl.zst", "c.jsonl.zst"]
    assert documents(ds) == docs


@pytest.mark.parametrize("kind", ["truncated_zst", "truncated_gz", "corrupt_gz", "garbage_zst"])
def test_broken_compressed_file_is_one_skipped_shard(tmp_path, kind):
    docs = make_documents(60)
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(docs[:30]))
    good = {"zst": zstandard.ZstdCompressor().compress, "gz": gzip.compress}[kind.split("_")[1]]
    data = bytearray(good(jsonl_bytes(docs[30:])))
    if kind.startswith("truncated"):
        data = data[: len(data) // 2]
    elif kind == "corrupt_gz":
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    else:
        data[8:] = os.urandom(len(data) - 8)
    (tmp_path / f"b.jsonl.{kind.split('_')[1]}").write_bytes(bytes(data))
    ds = dataset({"type": "jsonl", "paths": [str(tmp_path / "*")], "text_field": "meta.body"})
    assert ds.num_shards == 2
    assert documents(ds) == docs[:30]
    assert documents(ds) == docs[:30]  # deterministic: skipped again, counted again
    assert ds.bad.snapshot() == {"broken_shard": 2}
    assert "b.jsonl" in ds.bad.sample_snapshot()["broken_shard"]


def test_every_bad_record_kind_is_counted_and_skipped(tmp_path):
    lines = [
        b'{"text": "good one"}',
        b'{"text": "broken',                      # invalid JSON
        b'{"body": "no text field"}',              # missing field
        b'{"text": 42}',                           # not a string
        b'{"text": "caf\xe9 latin-1"}',            # invalid UTF-8
        b'{"text": "   "}',                        # empty document
        b'{"text": "lone \\ud800 surrogate"}',     # the tokenizer raises
        b'["a", "list"]',                          # not an object: missing field
        b'',
        b'{"text": "good two"}',
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = dataset({"type": "jsonl", "paths": [str(tmp_path / "a.jsonl")]})
    assert documents(ds) == ["good one", "good two"]
    assert ds.bad.snapshot() == {"invalid_json": 1, "missing_field": 2, "not_a_string": 1, "invalid_utf8": 1,
                                 "empty_document": 1, "tokenizer_error": 1}
    samples = ds.bad.sample_snapshot()
    assert "line 2" in samples["invalid_json"] and "line 5" in samples["invalid_utf8"]


# ---- text ------------------------------------------------------------------------------------
def test_text_one_document_per_file_and_delimited(tmp_path):
    (tmp_path / "books").mkdir()
    for i in range(5):
        (tmp_path / "books" / f"{i}.txt").write_text(f"book {i}\n\nchapter")
    (tmp_path / "books" / "empty.txt").write_text("\n")
    (tmp_path / "books" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    books = dataset({"type": "text", "paths": [str(tmp_path / "books/*.txt")]})
    assert sorted(documents(books)) == [f"book {i}\n\nchapter" for i in range(5)]  # files in hash order
    assert books.bad.snapshot() == {"empty_document": 1, "invalid_utf8": 1}

    (tmp_path / "notes.txt").write_bytes(b"one\n\ntwo\n\n\xff\xfe bad\n\n \n\nthree\n\n")
    notes = dataset({"type": "text", "paths": [str(tmp_path / "notes.txt")], "delimiter": "\n\n"})
    assert documents(notes) == ["one", "two", "three"]  # a bad document costs only itself
    assert notes.bad.snapshot() == {"invalid_utf8": 1, "empty_document": 1}


# ---- Parquet ---------------------------------------------------------------------------------
def write_parquet(path: Path, texts: list, row_group_size: int = 10, nested: bool = False) -> Path:
    column = pa.array([None if t is None else {"body": t} for t in texts]) if nested else pa.array(texts)
    pq.write_table(pa.table({"id": list(range(len(texts))), "doc": column}), path, row_group_size=row_group_size)
    return path


def test_parquet_row_groups_are_shards(tmp_path):
    docs = make_documents(45)
    write_parquet(tmp_path / "b.parquet", docs[25:])
    write_parquet(tmp_path / "a.parquet", docs[:25])
    ds = dataset({"type": "parquet", "paths": [str(tmp_path / "*.parquet")], "text_field": "doc"})
    assert [s.name.rsplit("/", 1)[1] for s in ds.shards] == [
        "a.parquet[row group 0]", "a.parquet[row group 1]", "a.parquet[row group 2]",
        "b.parquet[row group 0]", "b.parquet[row group 1]"]
    assert documents(ds) == docs


def test_parquet_nested_binary_and_bad_values(tmp_path):
    write_parquet(tmp_path / "n.parquet", ["one", None, "", "two"], nested=True)
    ds = dataset({"type": "parquet", "paths": [str(tmp_path / "n.parquet")], "text_field": "doc.body"})
    assert documents(ds) == ["one", "two"]
    assert ds.bad.snapshot() == {"missing_field": 1, "empty_document": 1}
    pq.write_table(pa.table({"doc": pa.array([b"ok", b"\xff\xfe", b"fine"], pa.binary())}), tmp_path / "b.parquet")
    ds = dataset({"type": "parquet", "paths": [str(tmp_path / "b.parquet")], "text_field": "doc"})
    assert documents(ds) == ["ok", "fine"] and ds.bad.snapshot() == {"invalid_utf8": 1}


def test_corrupt_and_truncated_parquet_are_skipped_shards(tmp_path):
    docs = make_documents(30)
    write_parquet(tmp_path / "a.parquet", docs[:10])
    data = bytearray(write_parquet(tmp_path / "b.parquet", docs[10:20], row_group_size=100).read_bytes())
    data[4:200] = os.urandom(196)  # data pages destroyed, footer intact
    (tmp_path / "b.parquet").write_bytes(bytes(data))
    full = write_parquet(tmp_path / "c.parquet", docs[20:]).read_bytes()
    (tmp_path / "c.parquet").write_bytes(full[: len(full) // 2])  # footer gone
    ds = dataset({"type": "parquet", "paths": [str(tmp_path / "*.parquet")], "text_field": "doc"})
    assert ds.num_shards == 3
    assert documents(ds) == docs[:10]
    assert ds.bad.snapshot() == {"broken_shard": 2}


# ---- Hugging Face datasets -------------------------------------------------------------------
def test_hf_save_to_disk_directory_in_row_ranges(tmp_path):
    import datasets

    docs = make_documents(95)
    hfd = datasets.Dataset.from_dict({"text": docs, "meta": [{"t": d} for d in docs]})
    hfd.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    ds = dataset({"type": "hf", "path": str(tmp_path / "saved"), "text_field": "meta.t", "rows_per_shard": 20})
    assert ds.num_shards == 5 and ds.shards[-1].name.endswith("[rows 80:95]")
    assert documents(ds) == docs
    datasets.DatasetDict({"train": hfd, "test": hfd.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    assert documents(dataset({"type": "hf", "path": str(tmp_path / "dd"), "split": "test"})) == docs[:3]
    with pytest.raises(ConfigError, match=r"datasets\.d\.source\.split: .* no split 'valid' \(it has: train, test\)"):
        dataset({"type": "hf", "path": str(tmp_path / "dd"), "split": "valid"})


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet", "text"])
def test_hf_load_dataset_local_files(tmp_path, fmt):
    docs = [d.replace("\n", " ") for d in make_documents(30, max_len=300)]
    data = tmp_path / "data"
    if fmt == "json":
        write_jsonl(data, docs, files=2)
        docs = docs[0::2] + docs[1::2]  # file by file
    else:
        data.mkdir()
        path = data / f"part.{ {'csv': 'csv', 'parquet': 'parquet', 'text': 'txt'}[fmt]}"
        if fmt == "csv":
            pa_csv.write_csv(pa.table({"text": docs}), path)
        elif fmt == "parquet":
            pq.write_table(pa.table({"text": docs}), path)
        else:
            path.write_text("\n".join(docs) + "\n")
    ds = dataset({"type": "hf", "format": fmt, "data_files": [str(data / "*")], "rows_per_shard": 7,
                  "cache_dir": str(tmp_path / "cache")})
    assert ds.num_shards == 5
    assert documents(ds) == docs


# ---- config errors ---------------------------------------------------------------------------
def config_error(source: dict[str, Any], name: str = "web") -> str:
    with pytest.raises(ConfigError) as info:
        dataset(source, name)
    return str(info.value)


def test_sources_that_point_at_nothing_or_the_wrong_format_fail_at_start(tmp_path):
    write_parquet(tmp_path / "x.parquet", ["a", "b"])
    (tmp_path / "t.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    missing = str(tmp_path / "nothing/*.jsonl.zst")
    assert config_error({"type": "jsonl", "paths": [str(tmp_path / "t.txt"), missing]}).startswith(
        f"datasets.web.source.paths[1]: '{missing}' matches no file")
    msg = config_error({"type": "jsonl", "paths": [str(tmp_path / "*.parquet")]})
    assert msg.startswith("datasets.web.source.paths[0]: ") and "is a parquet file, not JSON Lines" in msg
    msg = config_error({"type": "text", "paths": [str(tmp_path / "t.txt"), str(tmp_path / "x.parquet")]})
    assert msg.startswith("datasets.web.source.paths[1]: ") and "is a parquet file, not text" in msg
    msg = config_error({"type": "parquet", "paths": [str(tmp_path / "t.txt")]})
    assert msg.startswith("datasets.web.source.paths[0]: ") and "not Parquet" in msg
    msg = config_error({"type": "parquet", "paths": [str(tmp_path / "x.parquet")], "text_field": "body"})
    assert msg.startswith("datasets.web.source.text_field: ") and "no column 'body' (it has: id, doc)" in msg
    msg = config_error({"type": "parquet", "paths": [str(tmp_path / "x.parquet")], "text_field": "id"})
    assert "datasets.web.source.text_field: column 'id'" in msg and "not a string" in msg
    msg = config_error({"type": "tokens", "path": str(tmp_path / "empty")})
    assert msg.startswith("datasets.web.source.path: ") and "has no manifest.json" in msg
    msg = config_error({"type": "hf", "path": str(tmp_path / "empty")})
    assert msg.startswith("datasets.web.source.path: cannot load")
    msg = config_error({"type": "hf", "format": "json", "data_files": [str(tmp_path / "*.parquet")],
                        "cache_dir": str(tmp_path / "cache")})
    assert msg.startswith("datasets.web.source.data_files: cannot load 1 file(s) as json")
    assert "data_files[0]" in config_error({"type": "hf", "format": "json", "data_files": [missing]})
    with pytest.raises(ConfigError, match="datasets.web.source.hf.*give either `path`"):
        parse_config({"datasets": {"web": {"source": {"type": "hf", "text_field": "text"}}}})


# ---- determinism and fingerprints ------------------------------------------------------------
def test_shard_list_is_deterministic_and_fingerprint_follows_every_file(tmp_path):
    for name in ("c", "a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"document {name}")
    source = {"type": "text", "paths": [str(tmp_path / "c.txt"), str(tmp_path / "*.txt")], "shard_bytes": 1}
    first = dataset(source)
    names = [os.path.basename(s.name) for s in first.shards]
    assert sorted(names) == ["a.txt", "b.txt", "c.txt"]  # each file once
    reordered = dataset({**source, "paths": [str(tmp_path / "*.txt"), str(tmp_path / "b.txt")]})
    assert [os.path.basename(s.name) for s in reordered.shards] == names  # independent of listing order
    assert dataset(source).fingerprint == first.fingerprint
    (tmp_path / "b.txt").write_text("document B")  # same size, new content
    os.utime(tmp_path / "b.txt", ns=(1, 1))
    assert dataset(source).fingerprint != first.fingerprint


def test_hf_fingerprint_follows_the_arrow_files_content_not_their_mtime(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "s"))
    before = dataset({"type": "hf", "path": str(tmp_path / "s")}).fingerprint
    arrow = next((tmp_path / "s").glob("*.arrow"))
    os.utime(arrow, ns=(1, 1))
    assert dataset({"type": "hf", "path": str(tmp_path / "s")}).fingerprint == before
    datasets.Dataset.from_dict({"text": ["one", "too"]}).save_to_disk(str(tmp_path / "t"))
    assert dataset({"type": "hf", "path": str(tmp_path / "t")}).fingerprint != before


def test_the_spellings_of_the_issue_work(tmp_path):
    """Every source and tokenizer spelling of the docs, on real files, in one YAML config."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from server.config import load_config
    from server.prepare import prepare

    docs = make_documents(20, max_len=500)
    (tmp_path / "web").mkdir()
    (tmp_path / "web/a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    (tmp_path / "books").mkdir()
    (tmp_path / "books/one.txt").write_text(docs[0])
    (tmp_path / "notes.txt").write_text("\n\n".join(docs))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "pq/a.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved_dataset"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    d = str(tmp_path)
    (tmp_path / "c.yaml").write_text(f"""
datasets:
  web:   {{source: {{type: jsonl,   paths: ["{d}/web/*.jsonl.zst"], text_field: text}}}}
  books: {{source: {{type: text,    paths: ["{d}/books/*.txt"]}}}}
  notes: {{source: {{type: text,    paths: ["{d}/notes.txt"], delimiter: "\\n\\n"}}, tokenizer: {{type: byte}}}}
  pq:    {{source: {{type: parquet, paths: ["{d}/pq/*.parquet"], text_field: text}},
          tokenizer: {{type: hf, path: {d}/tokenizer.json}}}}
  hfd:   {{source: {{type: hf,      path: "{d}/saved_dataset", text_field: text}}}}
  prep:  {{source: {{type: tokens,  path: "{d}/prepared"}}}}
""")
    config = load_config(tmp_path / "c.yaml")
    assert prepare(config, "pq", str(tmp_path / "prepared"), workers=1).complete
    built = {name: Dataset(name, ds) for name, ds in config.datasets.items()}
    for name in ("web", "notes", "hfd"):
        assert documents(built[name]) == docs, name
    assert documents(built["books"]) == docs[:1]
    assert built["prep"].info == built["pq"].info and built["pq"].info.vocab_size == 302  # + EOS, PAD
    assert built["prep"].tokenize_shard(0).tokens.tolist() == built["pq"].tokenize_shard(0).tokens.tolist()
