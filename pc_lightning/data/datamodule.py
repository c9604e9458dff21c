"""LightningDataModule yielding (B, T+1) token windows from the packed memmaps.

* Training: window ``i`` (a global sample index) starts at an offset drawn from a generator seeded with
  ``(seed, i)``, so the data a run sees depends only on the seed and the sample index. The indices come from
  a :class:`TrainingStream`: rank r's q-th sample of the run (its *slot* q, counted from step 0) is global
  index ``(q + shift(q)) * world_size + r``, and a loader built at optimizer step s starts at slot
  ``s * accumulate * batch``. The stream has no end (``trainer.max_steps`` ends training), so Lightning never
  ends an epoch, which would start the loader over: a run resumed at any step, with any ``trainer.max_steps``,
  reads exactly the windows an uninterrupted run reads. ``shift(q)`` adds up the skips of spike rollbacks
  (callbacks/spike_detection.py, ``skip_batches``) registered at slots <= q; each skip is registered at the
  first slot not drawn yet and kept in checkpoints, so it takes effect at the same slot after a resume,
  however far the loader had prefetched. Each rank takes every ``world_size``-th index (we do the sharding
  ourselves; Lightning's DistributedSampler is turned off in the Trainer).
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


class TrainingStream(Sampler[int]):
    """Rank ``rank``'s global sample indices, from slot ``first_slot`` on, without end.

    ``skips`` is a list of ``[slot, samples]``: from that slot on, the stream is ``samples`` indices further on.
    The list is shared with (and saved by) the data module. Iterating again continues after the last slot drawn.
    """

    def __init__(self, first_slot: int = 0, rank: int = 0, world_size: int = 1,
                 skips: list[list[int]] | None = None):
        self.next_slot, self.rank, self.world_size = first_slot, rank, world_size
        self.skips = skips if skips is not None else []

    def index(self, slot: int) -> int:
        shift = sum(samples for at, samples in self.skips if at <= slot)
        return (slot + shift) * self.world_size + self.rank

    def __iter__(self) -> Iterator[int]:
        while True:
            slot, self.next_slot = self.next_slot, self.next_slot + 1
            yield self.index(slot)

    def skip(self, samples: int) -> None:
        """Move the stream ``samples`` indices per rank on, from the first slot not drawn yet."""
        self.skips.append([self.next_slot, samples])


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int, accumulate: int = 1):
        super().__init__()
        self.cfg, self.seed, self.accumulate = cfg, seed, accumulate
        self.prepared: PreparedData | None = None
        self.skips: list[list[int]] = []  # [slot, samples] per rollback (PaLM's data skip); saved in checkpoints
        self._stream: TrainingStream | None = None
        self._token_bytes: np.ndarray | None = None

    @property
    def skipped_samples(self) -> int:
        """Samples per rank skipped by spike rollbacks so far."""
        return sum(samples for _, samples in self.skips)

    def skip_batches(self, batches: int) -> None:
        """Skip the next ``batches`` micro-batches of the training stream (PaLM's rollback recipe)."""
        samples = batches * self.cfg.batch_size
        if self._stream is not None:
            self._stream.skip(samples)
        else:  # before training starts: from the beginning
            self.skips.append([0, samples])

    def state_dict(self) -> dict:
        return {"skips": [list(s) for s in self.skips], "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        skips = state_dict.get("skips")
        if skips is None:  # written before skips had slots: the total applied from the resumed step on
            skipped = state_dict.get("skipped_samples", 0)
            skips = [[0, skipped]] if skipped else []
        self.skips[:] = [list(s) for s in skips]

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

    @property
    def train_batch_size(self) -> int:
        """Windows per batch of the training loader."""
        return self.cfg.batch_size

    def train_dataloader(self) -> DataLoader:
        step, rank, world = self._world()
        per_step = self.cfg.batch_size * self.accumulate  # samples per rank per optimizer step
        self._stream = TrainingStream(step * per_step, rank=rank, world_size=world, skips=self.skips)
        ds = RandomWindows(self.prepared.tokens("train"), self.cfg.seq_len, self.seed)
        return DataLoader(ds, batch_size=self.train_batch_size, sampler=self._stream,
                          num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0)

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
