"""The one corpus every loader reads, built once under a cache directory and reused across runs.

The Python standard library's ``.py`` files, tokenized with a byte-level BPE of 16,384 tokens
trained on them (``data-server tokenizer train``), prepared into tokenfeed token shards
(``data-server prepare``), then repeated to the target size:

* ``<scale>/tokens.u16``: the token stream (every document followed by EOS, shards in index
  order), repeated; the peers' formats are written from it.
* ``<scale>/tokenfeed/``: a token directory listing the prepared shards once per repetition, as
  hard links (distinct paths, hence distinct cache entries, but no extra disk).
* ``stdlib-jsonl/part-*.jsonl``: the raw documents as JSON Lines (8 files, so that 2 DataLoader
  workers of a streaming ``datasets`` recipe each get some) for the raw-text question.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT

log = logging.getLogger(__name__)

VOCAB = 16384
JSONL_PARTS = 8


@dataclass(frozen=True)
class Corpus:
    """Paths and sizes of a built corpus (everything a measurement needs to find it)."""

    cache: str
    scale: str
    tokenizer: str          # tokenizer.json
    tokens: str             # the shared uint16 token stream
    num_tokens: int
    repeats: int
    base_tokens: int        # tokens of one pass over the standard library
    tokenfeed_dir: str      # prepared token shards, repeated
    jsonl: list[str]        # raw documents
    text_bytes: int         # UTF-8 bytes of the raw documents
    eos_id: int
    pad_id: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Corpus:
        return cls(**json.loads(text))


def _stdlib_glob() -> str:
    return str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py")


def _data_server(*args: str) -> None:
    cmd = [sys.executable, "-m", "server", *args, "--log-level", "WARNING"]
    subprocess.run(cmd, cwd=ROOT, check=True)


def _write_yaml(path: Path, tokenizer: str | None) -> None:
    source = {"type": "text", "paths": [_stdlib_glob()], "exclude": ["**/site-packages/**"]}
    ds = {"source": source, **({"tokenizer": {"type": "hf", "path": tokenizer}} if tokenizer else {})}
    path.write_text(json.dumps({"datasets": {"stdlib": ds}}))  # JSON is YAML


def _tokenizer(cache: Path) -> Path:
    out = cache / "bpe16k.json"
    if not out.exists():
        log.info("training the BPE tokenizer (vocabulary %d) on the standard library", VOCAB)
        _write_yaml(cache / "train.yaml", None)
        _data_server("tokenizer", "train", "--config", str(cache / "train.yaml"), "--dataset", "stdlib",
                     "--vocab-size", str(VOCAB), "--out", str(out))
    return out


def _prepared(cache: Path, tokenizer: Path) -> Path:
    out = cache / "stdlib-tokens"
    if not (out / "manifest.json").exists():
        log.info("preparing the standard library into token shards")
        _write_yaml(cache / "prepare.yaml", str(tokenizer))
        _data_server("prepare", "--config", str(cache / "prepare.yaml"), "--dataset", "stdlib", "--out", str(out))
    return out


def _jsonl(cache: Path) -> tuple[list[str], int]:
    """The documents the text source reads (blank and non-UTF-8 files left out, as it does)."""
    out = cache / "stdlib-jsonl"
    paths = [out / f"part-{i:02d}.jsonl" for i in range(JSONL_PARTS)]
    meta = out / "meta.json"
    if not meta.exists():
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")
                       if "site-packages" not in p.parts and p.is_file())
        docs = []
        for p in files:
            try:
                text = p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                docs.append(text)
        size = 0
        for i, path in enumerate(paths):
            with open(path, "w") as f:
                for text in docs[i::JSONL_PARTS]:
                    f.write(json.dumps({"text": text}) + "\n")
                    size += len(text.encode())
        meta.write_text(json.dumps({"docs": len(docs), "text_bytes": size}))
    return [str(p) for p in paths], json.loads(meta.read_text())["text_bytes"]


def _token_stream(prepared: Path, manifest: dict) -> np.ndarray:
    """One pass over the prepared shards: every document's tokens (EOS included), in index order."""
    sys.path.insert(0, str(ROOT))
    from server.stages.sources.tokens import decode_shard  # the format's own reader

    parts = []
    for entry in manifest["shards"]:
        data = (prepared / entry["file"]).read_bytes()
        parts.append(np.asarray(decode_shard(data, np.dtype("<u2")).tokens))
    return np.concatenate(parts)


def _repeated_dir(prepared: Path, manifest: dict, out: Path, repeats: int) -> None:
    """A token directory that lists every prepared shard ``repeats`` times (hard links)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        for p in tmp.iterdir():
            p.unlink()
    tmp.mkdir(parents=True, exist_ok=True)
    shards = []
    for r in range(repeats):
        for entry in manifest["shards"]:
            name = f"r{r:03d}-{entry['file']}"
            os.link(prepared / entry["file"], tmp / name)
            shards.append({**entry, "name": f"{entry['name']} #{r}", "file": name})
    totals = {k: v * repeats if isinstance(v, int) else v for k, v in manifest["totals"].items()}
    new = {**manifest, "dataset": "bench", "num_shards": len(shards), "totals": totals, "shards": shards}
    (tmp / "manifest.json").write_text(json.dumps(new, indent=1))
    if manifest.get("tokenizer_file"):
        os.link(prepared / manifest["tokenizer_file"], tmp / manifest["tokenizer_file"])
    tmp.rename(out)


def build(cache: Path, scale: str, target_tokens: int) -> Corpus:
    """Build (or find) the corpus for ``scale`` ("quick" or "full") of about ``target_tokens``."""
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(cache)
    prepared = _prepared(cache, tokenizer)
    jsonl, text_bytes = _jsonl(cache)
    manifest = json.loads((prepared / "manifest.json").read_text())
    base = int(manifest["totals"]["tokens"])
    repeats = max(1, round(target_tokens / base))
    where = cache / scale
    meta = where / "corpus.json"
    if meta.exists():
        corpus = Corpus.from_json(meta.read_text())
        if corpus.repeats == repeats and corpus.base_tokens == base:
            return corpus
    where.mkdir(parents=True, exist_ok=True)
    log.info("writing the %s corpus: %d x %.2f M tokens", scale, repeats, base / 1e6)
    stream = _token_stream(prepared, manifest)
    assert len(stream) == base, (len(stream), base)
    tokens = where / "tokens.u16"
    data = stream.astype("<u2").tobytes()
    with open(tokens, "wb") as f:
        f.writelines(data for _ in range(repeats))
    tf_dir = where / "tokenfeed"
    if tf_dir.exists():
        for p in tf_dir.iterdir():
            p.unlink()
        tf_dir.rmdir()
    _repeated_dir(prepared, manifest, tf_dir, repeats)
    tok = manifest["tokenizer"]
    corpus = Corpus(cache=str(cache), scale=scale, tokenizer=str(tokenizer), tokens=str(tokens),
                    num_tokens=base * repeats, repeats=repeats, base_tokens=base, tokenfeed_dir=str(tf_dir),
                    jsonl=jsonl, text_bytes=text_bytes, eos_id=int(tok["eos_id"]), pad_id=int(tok["pad_id"]))
    meta.write_text(corpus.to_json())
    return corpus
