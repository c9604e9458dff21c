"""Corpus -> tokenizer -> packed token memmaps, cached by (corpus, tokenizer, vocab size, split).

Layout of one cache entry (``<cache_dir>/<corpus-slug>-<key>/``)::

    tokenizer.json   the trained (or copied) tokenizer
    train.bin        uint16 (vocab < 65536) or uint32 token ids, documents joined by <|endoftext|>
    val.bin          same, for the held-out documents
    meta.json        hashes, counts, dtype, tokenizing throughput, validation unigram entropy

A second :func:`prepare` with the same key opens the files and tokenizes nothing. Parallel workers
(sweeps, DDP ranks) serialise on a file lock and the entry appears atomically (written to a temporary
directory, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from filelock import FileLock

from pc_lightning.config import ConfigError, DataConfig
from pc_lightning.data.corpus import corpus_fingerprint, iter_lines, load_corpus, split_corpus
from pc_lightning.data.tokenizer import EOT, load_tokenizer, train_bpe
from pc_lightning.secrets import redact

FORMAT_VERSION = 1


@dataclass
class PreparedData:
    dir: Path
    meta: dict
    cached: bool  # True when this call reused an existing entry (no tokenizing)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"


def _sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_key(cfg: DataConfig) -> str:
    tok = f"file:{_sha256_file(cfg.tokenizer_path)}" if cfg.tokenizer_path else f"bpe:{cfg.vocab_size}"
    spec = dict(v=FORMAT_VERSION, corpus=corpus_fingerprint(cfg), tokenizer=tok, val_fraction=cfg.val_fraction)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir_for(cfg: DataConfig) -> Path:
    slug = cfg.source if cfg.source == "bible" else "hf-" + redact(str(cfg.path)).replace("/", "_").strip("._")[:40]
    return Path(cfg.cache_dir).expanduser().resolve() / f"{slug}-{cache_key(cfg)}"


def prepare(cfg: DataConfig) -> PreparedData:
    """Return the prepared data for `cfg`, building it first if the cache has no entry for it."""
    target = cache_dir_for(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "meta.json").exists():
            return PreparedData(target, json.loads((target / "meta.json").read_text()), cached=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = _build(cfg, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves no half-written entry behind
            raise
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tmp.rename(target)
    return PreparedData(target, meta, cached=False)


def _build(cfg: DataConfig, out: Path) -> dict:
    datasets.disable_progress_bars()
    corpus = load_corpus(cfg)
    train_docs, val_docs = split_corpus(corpus, cfg.val_fraction)

    t0 = time.perf_counter()
    if cfg.tokenizer_path:
        tok = load_tokenizer(cfg.tokenizer_path)
    else:
        tok = train_bpe(iter_lines(train_docs), cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_seconds = time.perf_counter() - t0

    vocab = tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    dtype = np.uint16 if vocab < 2**16 else np.uint32

    def encode(batch):
        return {"ids": [enc.ids + [eot] for enc in tok.encode_batch(batch["text"])]}

    t0 = time.perf_counter()
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        map_kwargs = {} if cfg.streaming else {"num_proc": cfg.num_proc}
        ids = docs.map(encode, batched=True, batch_size=256, remove_columns=["text"], **map_kwargs)
        n_tokens = n_docs = 0
        with open(out / f"{split}.bin", "wb") as f:
            for batch in ids.iter(batch_size=1024):
                for seq in batch["ids"]:
                    f.write(np.asarray(seq, dtype=dtype).tobytes())
                    n_tokens += len(seq)
                    n_docs += 1
        if n_tokens < cfg.seq_len + 2:
            raise ConfigError("data", f"the {split} split has only {n_tokens} tokens, fewer than data.seq_len+2; "
                                      "use more documents or a larger data.val_fraction")
        counts[split] = (n_tokens, n_docs)
    tokenize_seconds = time.perf_counter() - t0

    val = np.memmap(out / "val.bin", dtype=dtype, mode="r")
    freq = np.bincount(val, minlength=vocab).astype(np.float64)
    p = freq[freq > 0] / freq.sum()
    total = counts["train"][0] + counts["val"][0]
    return {
        "format_version": FORMAT_VERSION,
        "corpus": corpus_fingerprint(cfg),
        "tokenizer_sha256": _sha256_file(out / "tokenizer.json"),
        "vocab_size": vocab,
        "eot_id": eot,
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train"][0],
        "train_docs": counts["train"][1],
        "val_tokens": counts["val"][0],
        "val_docs": counts["val"][1],
        "tokenizer_train_seconds": round(tokenizer_seconds, 3),
        "tokenize_seconds": round(tokenize_seconds, 3),
        "tokenize_tokens_per_second": round(total / max(tokenize_seconds, 1e-9)),
        "val_unigram_entropy": float(-(p * np.log(p)).sum()),  # nats
    }
