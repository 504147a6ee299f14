"""Offline corpus work: ``prepare`` (tokenize a dataset once into token shards, resumably, on all
cores) and ``train_tokenizer`` (a byte-level BPE ``tokenizer.json`` trained on a dataset)."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from server.config import Config, DatasetConfig, HfTokenizerConfig, SentencePieceTokenizerConfig, TokensSourceConfig
from server.stages.dataset import Dataset
from server.errors import ConfigError
from server.prepare_out import OutDir
from server.stages.sources import BadRecords, BrokenShard, build_source
from server.stages.sources.tokens import FORMAT, MANIFEST, VERSION, checksum, encode_shard

log = logging.getLogger(__name__)
PLAN = "plan.json"          # what an unfinished preparation is making (checked on resume)
#: Makes the shards of a run elsewhere (``server.prepare_ray``): (dataset, config, todo, out, level) -> entries.
Runner = Callable[[Dataset, Config, list[int], str, int], Iterator[dict]]


@dataclass(frozen=True)
class PrepareResult:
    """What a ``prepare`` run did."""

    complete: bool      # the manifest is written
    shards_done: int    # shards finished in this run
    shards_total: int
    input_bytes: int    # source bytes read in this run
    tokens: int         # tokens written in this run
    seconds: float


def dataset_config(config: Config, name: str) -> DatasetConfig:
    """The named dataset's config (one with a source), or a ``ConfigError`` listing the names
    there are, or naming a mixture's components."""
    try:
        ds = config.datasets[name]
    except KeyError:
        raise ConfigError(f"--dataset: the config has no dataset {name!r} "
                          f"(it has: {', '.join(sorted(config.datasets))})") from None
    if ds.mixture is not None:
        raise ConfigError(f"--dataset: {name!r} is a mixture; name one of its components instead "
                          f"({', '.join(sorted(ds.mixture.weights))})")
    return ds


def prepare(config: Config, name: str, out: str, *, workers: int | None = None, max_shards: int | None = None,
            level: int = 3, log_every_s: float = 5.0, runner: Runner | None = None,
            storage_options: dict[str, Any] | None = None) -> PrepareResult:
    """Tokenize dataset ``name`` into ``out``: one zstd token shard per source shard (same index,
    same documents, so serving it yields the raw dataset's batches) and ``manifest.json``.

    Resumable: finished shards are kept and a rerun does only the rest (``max_shards`` stops a run
    early). ``workers`` processes (default: one per core) each read, tokenize and write shards, or
    ``runner`` makes them (e.g. as Ray tasks) and yields their entries as they finish. ``out`` may
    be an object-store URL (``s3://bucket/prepared``), reached with ``storage_options`` (default:
    the dataset source's).
    """
    ds_config = dataset_config(config, name)
    if isinstance(ds_config.source, TokensSourceConfig):
        raise ConfigError(f"datasets.{name}.source: already tokens; there is nothing to prepare")
    ds = Dataset(name, ds_config)
    plan = {"format": FORMAT, "version": VERSION, "dataset": name, "fingerprint": ds.fingerprint,
            "num_shards": ds.num_shards, "tokenizer": ds.info.to_json(), "dtype": ds.dtype.str}
    target = OutDir(out, storage_options if storage_options is not None else source_storage_options(ds))
    done = _start(target, plan)
    if done is None:
        log.info("%s is already a complete preparation of %r; nothing to do", out, name)
        return PrepareResult(True, 0, ds.num_shards, 0, 0, 0.0)
    todo = [i for i in range(ds.num_shards) if i not in done]
    if max_shards is not None:
        todo = todo[:max_shards]
    log.info("preparing %r into %s: %d shards, %d already done, %d to do now", name, out, ds.num_shards,
             len(done), len(todo))
    t0 = time.perf_counter()
    meter = _Meter(name, ds, len(done), t0, log_every_s)
    try:
        entries = runner(ds, config, todo, out, level) if runner else _run(ds, config, todo, out, workers, level)
        for entry in entries:
            target.record(entry)
            done[entry["index"]] = entry
            meter.add(entry)
    finally:
        target.close()
    complete = len(done) == ds.num_shards
    if complete:
        _finish(target, ds, plan, done)
    meter.log(final=True)
    return PrepareResult(complete, len(todo), ds.num_shards, meter.bytes, meter.tokens, time.perf_counter() - t0)


def _start(out: OutDir, plan: dict) -> dict[int, dict] | None:
    """Create or check ``out``; the shards an earlier run finished, or None when all is done."""
    out.create()
    if out.exists(MANIFEST):
        old = out.read_json(MANIFEST)
        if {k: old.get(k) for k in plan} == plan:
            return None
        raise ConfigError(f"--out: {out} already holds a different preparation; remove it or choose another")
    if out.exists(PLAN):
        if out.read_json(PLAN) != plan:
            raise ConfigError(f"--out: {out} holds an unfinished preparation of other data or with "
                              "another tokenizer; remove it or choose another directory")
    elif out.names():
        raise ConfigError(f"--out: {out} is not empty and holds no preparation; choose an empty directory")
    else:
        out.write_json(PLAN, plan)
    out.drop_temporaries()
    return _finished_shards(out)


def _finished_shards(out: OutDir) -> dict[int, dict]:
    """Shards recorded as finished whose files are intact: locally their checksum is checked; in an
    object store (an object is written whole or not at all) their size, without downloading them."""
    done: dict[int, dict] = {}
    for entry in out.recorded():
        try:
            if out.remote:
                intact = out.size(entry["file"]) == entry["bytes"]
            else:
                intact = checksum(out.read_bytes(entry["file"])) == entry["checksum"]
        except (KeyError, TypeError, OSError):
            continue
        if intact:
            done[int(entry["index"])] = entry
    out.keep_only(list(done.values()))
    return done


def _run(ds: Dataset, config: Config, todo: list[int], out: str, workers: int | None,
         level: int) -> Iterator[dict]:
    """Entries of finished shards, as they finish (in a process pool when ``workers > 1``)."""
    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    if workers == 1:
        for index in todo:
            yield prepare_shard(ds, index, out, level)
        return
    # spawn: a forked child would inherit the tokenizers thread pool (and its locks) mid-use.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(config.model_dump_json(), ds.name)) as pool:
        futures = [pool.submit(_work, index, out, level) for index in todo]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


_WORKER_DS: Dataset | None = None


def _init_worker(config_json: str, name: str) -> None:
    global _WORKER_DS
    # Each process is one core's worth: the tokenizers thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _WORKER_DS = Dataset(name, Config.model_validate_json(config_json).datasets[name])


def _work(index: int, out: str, level: int) -> dict:
    assert _WORKER_DS is not None, "worker not initialised"
    return prepare_shard(_WORKER_DS, index, out, level)


def prepare_shard(ds: Dataset, index: int, out: str | OutDir, level: int = 3) -> dict:
    """Tokenize shard ``index`` and write its file atomically; its manifest entry. An environment
    fault that outlasts the dataset's retries raises (``Unavailable``): the shard is never recorded
    as empty, and running prepare again continues with it. A URL ``out`` is reached with the
    dataset source's storage options."""
    target = out if isinstance(out, OutDir) else OutDir(out, source_storage_options(ds))
    ds.bad = BadRecords()  # this shard's tally only (the Dataset is this process's own)
    shard = ds.tokenize_shard(index)
    data = encode_shard(shard, level)
    name = f"shard-{index:06d}.tft"
    target.write_bytes(name, data)
    spec = ds.shards[index]
    return {"index": index, "name": spec.name, "file": name, "docs": shard.num_docs, "tokens": shard.num_tokens,
            "bytes": len(data), "input_bytes": spec.bytes, "checksum": checksum(data), "bad": ds.bad.snapshot()}


def _finish(out: OutDir, ds: Dataset, plan: dict, done: dict[int, dict]) -> None:
    """Write the manifest (which marks the directory complete) and drop the resume files."""
    shards = [{k: v for k, v in done[i].items() if k != "index"} for i in range(ds.num_shards)]
    tokenizer_file = None
    tok_config = ds.config.tokenizer
    if isinstance(tok_config, (HfTokenizerConfig, SentencePieceTokenizerConfig)):  # keep a copy so the
        tokenizer_file = os.path.basename(tok_config.path) if isinstance(tok_config, SentencePieceTokenizerConfig) \
            else "tokenizer.json"                                                      # directory decodes on its own
        with open(os.path.expanduser(tok_config.path), "rb") as f:
            out.write_bytes(tokenizer_file, f.read())
    bad: dict[str, int] = {}
    for s in shards:
        for reason, n in s["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    # (never the storage options: they may hold credentials)
    source = ds.source_config.model_dump(mode="json", exclude={"storage_options"})
    manifest = {**plan, "tokenizer_file": tokenizer_file, "source": source,
                "totals": {"shards": len(shards), "docs": sum(s["docs"] for s in shards),
                           "tokens": sum(s["tokens"] for s in shards),
                           "input_bytes": sum(s["input_bytes"] for s in shards), "bad": bad},
                "shards": shards}
    out.write_json(MANIFEST, manifest)
    out.drop_progress()
    out.remove(PLAN)


def source_storage_options(ds: Dataset) -> dict[str, Any]:
    """The storage options of the dataset's source (what a URL ``--out`` uses by default)."""
    return dict(getattr(ds.source_config, "storage_options", {}) or {})


class _Meter:
    """Rates of a prepare run, logged every few seconds."""

    def __init__(self, name: str, ds: Dataset, already: int, t0: float, every_s: float) -> None:
        self.name, self.total, self.count = name, ds.num_shards, already
        self.t0, self.every_s, self.last = t0, every_s, t0
        self.bytes = self.tokens = 0

    def add(self, entry: dict) -> None:
        self.count += 1
        self.bytes += entry["input_bytes"]
        self.tokens += entry["tokens"]
        if time.perf_counter() - self.last >= self.every_s:
            self.log()

    def log(self, final: bool = False) -> None:
        self.last = now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        log.info("prepare %s: %d/%d shards%s, %.1f MB in %.1f s = %.2f MB/s of input, %.2f M tokens = "
                 "%.2f M tokens/s", self.name, self.count, self.total, " (done)" if final else "",
                 self.bytes / 1e6, dt, self.bytes / 1e6 / dt, self.tokens / 1e6, self.tokens / 1e6 / dt)


def _training_texts(config: Config, name: str, bad: BadRecords, stats: dict[str, int]) -> Iterator[list[str]]:
    """The documents of dataset ``name``, shard by shard, counted into ``stats`` (docs, chars)."""
    ds_config = dataset_config(config, name)
    if isinstance(ds_config.source, TokensSourceConfig):
        raise ConfigError(f"datasets.{name}.source: tokens carry no text to train a tokenizer on")
    # Only the source: the dataset's own tokenizer may be the file this run is about to write.
    assert ds_config.source is not None  # (dataset_config refuses mixtures)
    source = build_source(ds_config.source, f"datasets.{name}.source")  # (config errors now, not mid-training)

    def texts() -> Iterator[list[str]]:
        for shard in source.shards():
            try:
                docs = source.read_shard(shard, bad)
            except BrokenShard as err:  # content: skipped (an I/O error stops the run, to be rerun)
                bad.add("broken_shard", sample=f"{shard.name}: {err}")
                continue
            stats["docs"] += len(docs)
            stats["chars"] += sum(len(d) for d in docs)
            yield docs
    return texts()


def train_tokenizer(config: Config, name: str, vocab_size: int, out: str, *, min_frequency: int = 2,
                    special_tokens: tuple[str, ...] = ("<|endoftext|>", "<|pad|>")) -> dict:
    """Train a byte-level BPE on dataset ``name`` (offline) and write ``out`` (a tokenizer.json).

    The special tokens get the first ids; the defaults are found as EOS and PAD by the ``hf``
    tokenizer. Returns figures of the run.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ds_config = dataset_config(config, name)
    if isinstance(ds_config.source, TokensSourceConfig):
        raise ConfigError(f"datasets.{name}.source: tokens carry no text to train a tokenizer on")
    if vocab_size < 256 + len(special_tokens):
        raise ConfigError(f"--vocab-size: must be at least {256 + len(special_tokens)} (256 bytes + "
                          f"{len(special_tokens)} special tokens), got {vocab_size}")
    bad = BadRecords()
    stats = {"docs": 0, "chars": 0}
    texts = _training_texts(config, name, bad, stats)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer)
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    tok.save(tmp)
    os.replace(tmp, out)
    result: dict[str, Any] = {**stats, "vocab_size": tok.get_vocab_size(), "seconds": round(seconds, 2),
                              "bad": bad.snapshot()}
    if result["vocab_size"] < vocab_size:
        log.warning("the corpus supports only %d of the %d tokens asked for (too little or too repetitive text)",
                    result["vocab_size"], vocab_size)
    log.info("trained a byte-level BPE of %d tokens on %d documents (%.1f M chars) of %r in %.1f s -> %s",
             result["vocab_size"], stats["docs"], stats["chars"] / 1e6, name, seconds, out)
    return result


#: SentencePiece's own specials, declared in the model (the ``sentencepiece`` tokenizer finds EOS and PAD there).
SP_SPECIALS: dict[str, Any] = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3, "unk_piece": "<unk>",
                               "bos_piece": "<s>", "eos_piece": "</s>", "pad_piece": "<pad>"}
#: Lines SentencePiece samples from the corpus: it holds them all in memory while training.
SP_MAX_SENTENCES = 2_000_000


def train_sentencepiece(config: Config, name: str, vocab_size: int, out: str, *, model_type: str = "bpe") -> dict:
    """Train a SentencePiece model (``bpe`` or ``unigram``) on dataset ``name`` and write ``out`` (a .model).

    Lossless: no normalization, whitespace kept as is, newline a piece of its own and byte fallback for
    characters outside the vocabulary, so decoding gives back the exact text. Returns figures of the run.
    """
    import sentencepiece

    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"--model-type: must be bpe or unigram, got {model_type!r}")
    required = 256 + 4 + 1  # byte pieces, the 4 specials, the newline
    if vocab_size <= required:
        raise ConfigError(f"--vocab-size: must be more than {required} (256 byte pieces + 4 specials + newline), "
                          f"got {vocab_size}")
    bad = BadRecords()
    stats = {"docs": 0, "chars": 0}
    # SentencePiece reads sentences: each document's lines (the newline itself is a user-defined piece).
    texts = _training_texts(config, name, bad, stats)
    lines = (line for docs in texts for doc in docs for line in doc.split("\n") if line)
    model = io.BytesIO()
    t0 = time.perf_counter()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            byte_fallback=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
            user_defined_symbols=["\n"], input_sentence_size=SP_MAX_SENTENCES, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2, **SP_SPECIALS)
    except RuntimeError as err:  # e.g. "Vocabulary size too high" for a small corpus
        raise ConfigError(f"--vocab-size: SentencePiece cannot train {vocab_size} pieces on {name!r}: {err}") from None
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)
    result: dict[str, Any] = {**stats, "vocab_size": vocab_size, "seconds": round(seconds, 2), "bad": bad.snapshot()}
    log.info("trained a SentencePiece %s of %d pieces on %d documents (%.1f M chars) of %r in %.1f s -> %s",
             model_type, vocab_size, stats["docs"], stats["chars"] / 1e6, name, seconds, out)
    return result
