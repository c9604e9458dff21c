"""The timed training step both throughput benchmarks share, and the shapes they run at.

One step = ``accum`` micro-batches of forward, next-token cross-entropy and backward, then an AdamW step, on
fixed random batches; warm-up steps (and compilation) are excluded from the timing. Optional hooks run the
per-step machinery a linear kind needs (PC's once-per-step W_eff, TSVD's orthonormal refresh).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.nn.functional as F

CPU_SHAPE = dict(d_model=128, n_layers=4, n_heads=4, d_ff=384, vocab_size=4096, max_seq_len=256)
CPU_BATCH = (16, 128)
GPU_SHAPE = dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, vocab_size=32000, max_seq_len=1024)
GPU_BATCH = (16, 1024)


def _nothing() -> None:
    return None


def tokens_per_second(model: torch.nn.Module, vocab: int, batch: tuple[int, int], device: torch.device, steps: int,
                      compile_: bool, accum: int = 1, begin: Callable[[], None] = _nothing,
                      end: Callable[[], None] = _nothing, after: Callable[[], None] = _nothing) -> float:
    """Tokens/s of full optimizer steps of `model` (idx -> logits); hooks run before the first micro-batch,
    after the last backward and after the optimizer step."""
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    fn = torch.compile(model) if compile_ else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = [torch.randint(0, vocab, (batch[0], batch[1] + 1), generator=gen).to(device) for _ in range(4)]

    def step(i: int) -> None:
        begin()
        for j in range(accum):
            x = data[(i * accum + j) % len(data)]
            with amp:
                logits = fn(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
            (loss / accum).backward()
        end()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after()

    for i in range(3):  # warm-up (and compilation)
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * accum * batch[0] * batch[1] / (time.perf_counter() - t0)
