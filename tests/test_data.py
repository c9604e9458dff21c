"""Data pipeline: real corpus + BPE + datasets.map; deterministic, cached, document-level split."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch

from pc_lightning.config import DataConfig
from pc_lightning.data.datamodule import FixedWindows, RandomWindows, TrainingStream
from pc_lightning.data.prepare import prepare


def cfg(cache: str, **kw) -> DataConfig:
    base = dict(vocab_size=512, cache_dir=cache, seq_len=32, batch_size=4)
    base.update(kw)
    return DataConfig(**base)


def test_prepare_is_cached_and_deterministic(tmp_path):
    first = prepare(cfg(str(tmp_path / "a")))
    assert not first.cached
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()}
    second = prepare(cfg(str(tmp_path / "a")))
    assert second.cached  # no tokenizing the second time
    assert {p.name: p.stat().st_mtime_ns for p in second.dir.iterdir()} == mtimes
    other = prepare(cfg(str(tmp_path / "b")))  # a fresh cache builds the same bytes
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (first.dir / name).read_bytes() == (other.dir / name).read_bytes()
    meta = first.meta
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert meta["val_docs"] > 0 and meta["train_docs"] > 10 * meta["val_docs"]
    assert 0 < meta["val_unigram_entropy"] < np.log(512)


def test_cache_key_depends_on_tokenizer(tmp_path):
    a = prepare(cfg(str(tmp_path), vocab_size=512))
    b = prepare(cfg(str(tmp_path), vocab_size=600))
    assert a.dir != b.dir


def test_local_text_files_through_datasets(tmp_path):
    text = tmp_path / "corpus.txt"
    lines = [f"Document number {i} talks about the river and the {i % 7} hills." for i in range(400)]
    text.write_text("\n".join(lines))
    p = prepare(cfg(str(tmp_path / "c"), source="hf", path="text", data_files=[str(text)], vocab_size=300,
                    val_fraction=0.1, seq_len=8))
    assert p.meta["train_docs"] + p.meta["val_docs"] == 400
    assert p.meta["corpus"].startswith("hf:text")


def test_streaming_source(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} of a streamed corpus about sheep" for i in range(300)))
    p = prepare(cfg(str(tmp_path / "s"), source="hf", path="text", data_files=[str(text)], vocab_size=280,
                    val_fraction=0.1, streaming=True, seq_len=8))
    assert p.meta["train_docs"] + p.meta["val_docs"] == 300


def test_windows_are_reproducible_from_seed(tmp_path):
    tokens = prepare(cfg(str(tmp_path))).tokens("train")
    a, b = RandomWindows(tokens, 32, seed=1), RandomWindows(tokens, 32, seed=1)
    assert all(torch.equal(a[i], b[i]) for i in range(20))
    assert a[0].shape == (33,) and a[0].dtype == torch.int64
    c = RandomWindows(tokens, 32, seed=2)
    assert not all(torch.equal(a[i], c[i]) for i in range(20))


def draw(stream: TrainingStream, n: int) -> list[int]:
    return list(islice(stream, n))


def test_training_stream_started_at_any_slot_continues_the_full_stream():
    full = draw(TrainingStream(0), 30)
    assert full == list(range(30))
    assert all(draw(TrainingStream(k), 30 - k) == full[k:] for k in (1, 7, 29))
    ranks = [draw(TrainingStream(0, rank=r, world_size=2), 5) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    stream = TrainingStream(0)
    assert draw(stream, 4) + draw(stream, 4) == list(range(8))  # iterating again continues, never replays


def test_a_skip_applies_from_the_first_undrawn_slot_also_after_a_restart():
    stream = TrainingStream(0, world_size=2, rank=1)
    seen = draw(stream, 6)  # slots 0-5: what the loader has drawn, prefetched batches included
    stream.skip(10)
    seen += draw(stream, 6)  # slots 6-11 skip 10 samples of this rank
    assert stream.skips == [[6, 10]]
    assert seen == [2 * q + 1 for q in range(6)] + [2 * (q + 10) + 1 for q in range(6, 12)]
    for start in (3, 6, 9):  # a resumed stream with the saved skips reads what the first one read
        assert draw(TrainingStream(start, world_size=2, rank=1, skips=stream.skips), 12 - start) == seen[start:]


def test_validation_windows_fixed(tmp_path):
    tokens = prepare(cfg(str(tmp_path))).tokens("val")
    v = FixedWindows(tokens, 32, 8)
    assert len(v) == 8 and torch.equal(v[3], FixedWindows(tokens, 32, 8)[3])
