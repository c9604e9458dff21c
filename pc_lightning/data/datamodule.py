"""LightningDataModule yielding (B, T+1) token windows from the packed memmaps.

* Training: window ``i`` (a global sample index) starts at an offset drawn from a generator seeded with
  ``(seed, i)``, so the data a run sees depends only on the seed and the sample index. On resume the
  sampler starts at ``global_step * accumulate * batch * world_size``: a resumed run sees exactly the
  windows an uninterrupted run would have. A spike rollback (callbacks/spike_detection.py) moves the start on by
  the batches it skips (``skip_batches``, kept in checkpoints). Each rank takes every ``world_size``-th index (we do the
  sharding ourselves; Lightning's DistributedSampler is turned off in the Trainer).
* Validation: a fixed set of ``val_batches * batch_size`` windows spread evenly over ``val.bin``, so val loss
  is comparable across runs and variants. Each window comes with the number of UTF-8 bytes of text its target
  tokens stand for (counted once, from the tokenizer's per-token byte lengths), the denominator of bits per byte.
"""

from __future__ import annotations

from typing import Iterator

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, Sampler

from pc_lightning.config import DataConfig
from pc_lightning.data.prepare import PreparedData, prepare
from pc_lightning.data.tokenizer import token_byte_lengths


class RandomWindows(Dataset):
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.high = len(tokens) - (seq_len + 1)

    def __len__(self) -> int:  # indices are unbounded; the sampler decides how many are drawn
        return 2**62

    def offset(self, index: int) -> int:
        return int(np.random.default_rng((self.seed, index)).integers(0, self.high + 1))

    def __getitem__(self, index: int) -> torch.Tensor:
        s = self.offset(index)
        return torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))


class FixedWindows(Dataset):
    """``count`` windows of ``seq_len + 1`` tokens spread evenly over ``tokens``.

    With ``token_bytes`` (bytes of text per token id, :func:`~pc_lightning.data.tokenizer.token_byte_lengths`)
    an item is ``(window, target_bytes)``: the bytes of the window's targets ``window[1:]``, counted once here.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int, token_bytes: np.ndarray | None = None):
        self.tokens, self.seq_len = tokens, seq_len
        high = len(tokens) - (seq_len + 1)
        self.starts = np.linspace(0, high, num=count).astype(np.int64)
        self.target_bytes = None
        if token_bytes is not None:
            self.target_bytes = np.array([int(token_bytes[self.window(i)[1:]].sum()) for i in range(count)],
                                         dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def window(self, index: int) -> np.ndarray:
        s = int(self.starts[index])
        return self.tokens[s : s + self.seq_len + 1].astype(np.int64)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.window(index))
        if self.target_bytes is None:
            return window
        return window, torch.tensor(self.target_bytes[index])


class ResumableSampler(Sampler[int]):
    """Global sample indices ``start + j * world_size + rank`` for j in [0, count)."""

    def __init__(self, start: int, count: int, rank: int = 0, world_size: int = 1):
        self.start, self.count, self.rank, self.world_size = start, count, rank, world_size

    def __iter__(self) -> Iterator[int]:
        for j in range(self.count):
            yield self.start + j * self.world_size + self.rank

    def __len__(self) -> int:
        return self.count

    def skip(self, samples: int) -> None:
        """Jump ``samples`` indices per rank ahead in the stream; applies to indices not drawn yet."""
        self.start += samples * self.world_size


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int, max_steps: int, accumulate: int = 1):
        super().__init__()
        self.cfg, self.seed, self.max_steps, self.accumulate = cfg, seed, max_steps, accumulate
        self.prepared: PreparedData | None = None
        self.skipped_samples = 0  # per rank, skipped by spike rollbacks (PaLM); saved in checkpoints
        self._sampler: ResumableSampler | None = None
        self._token_bytes: np.ndarray | None = None

    def skip_batches(self, batches: int) -> None:
        """Skip the next ``batches`` micro-batches of the training stream (PaLM's rollback recipe)."""
        self.skipped_samples += batches * self.cfg.batch_size
        if self._sampler is not None:
            self._sampler.skip(batches * self.cfg.batch_size)

    def state_dict(self) -> dict:
        return {"skipped_samples": self.skipped_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_samples = state_dict.get("skipped_samples", 0)

    def prepare_data(self) -> None:
        prepare(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            self.prepared = prepare(self.cfg)

    def _world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        return trainer.global_step, trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        step, rank, world = self._world()
        per_step = self.cfg.batch_size * self.accumulate  # samples per rank per optimizer step
        sampler = ResumableSampler(
            start=(step * per_step + self.skipped_samples) * world,
            count=max(0, self.max_steps - step) * per_step,
            rank=rank,
            world_size=world,
        )
        self._sampler = sampler
        ds = RandomWindows(self.prepared.tokens("train"), self.cfg.seq_len, self.seed)
        return DataLoader(ds, batch_size=self.cfg.batch_size, sampler=sampler,
                          num_workers=self.cfg.num_workers, drop_last=True,
                          persistent_workers=self.cfg.num_workers > 0)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text per token id of the prepared tokenizer (computed once)."""
        if self._token_bytes is None:
            self._token_bytes = token_byte_lengths(Tokenizer.from_file(str(self.prepared.tokenizer_path)))
        return self._token_bytes

    def val_dataloader(self) -> DataLoader:
        ds = FixedWindows(self.prepared.tokens("val"), self.cfg.seq_len, self.cfg.val_batches * self.cfg.batch_size,
                          token_bytes=self.token_bytes())
        # fixed windows, split across ranks by Lightning's distributed sampler would change the set per
        # world size; every rank evaluates all of them instead (cheap at these sizes).
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
