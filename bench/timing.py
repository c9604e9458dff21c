"""The timed training step both throughput benchmarks share, the shapes they run at and their report file.

One step = ``accum`` micro-batches of forward, next-token cross-entropy and backward, then an AdamW step, on
fixed random batches; warm-up steps (and compilation) are excluded, and tokens/s is one step's tokens over the
median step time. Optional hooks run the per-step machinery a linear kind needs (PC's once-per-step W_eff, TSVD's orthonormal refresh).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

CPU_SHAPE = dict(d_model=128, n_layers=4, n_heads=4, d_ff=384, vocab_size=4096, max_seq_len=256)
CPU_BATCH = (16, 128)
GPU_SHAPE = dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, vocab_size=32000, max_seq_len=1024)
GPU_BATCH = (16, 1024)


@dataclass
class Setup:
    device: torch.device
    shape: dict  # ModelConfig keywords
    batch: tuple[int, int]  # (sequences, tokens per sequence)
    steps: int  # timed optimizer steps
    where: str  # the device, for the report's title


def setup(steps: int | None, gpu_steps: int, cpu_steps: int) -> Setup:
    """The ~134M shape on CUDA (TF32 matmuls allowed), else the tiny CPU shape; ``steps`` overrides the default."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        return Setup(torch.device("cuda"), GPU_SHAPE, GPU_BATCH, steps or gpu_steps, torch.cuda.get_device_name())
    return Setup(torch.device("cpu"), CPU_SHAPE, CPU_BATCH, steps or cpu_steps,
                 f"CPU ({torch.get_num_threads()} threads)")


def write_report(path: str | Path, lines: list[str]) -> None:
    """Print the Markdown report and write it to ``path``."""
    text = "\n".join(lines)
    print(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _nothing() -> None:
    return None


def tokens_per_second(model: torch.nn.Module, vocab: int, batch: tuple[int, int], device: torch.device, steps: int,
                      compile_: bool, accum: int = 1, begin: Callable[[], None] = _nothing,
                      end: Callable[[], None] = _nothing, after: Callable[[], None] = _nothing) -> float:
    """Tokens/s (median step time) of full optimizer steps of `model` (idx -> logits); hooks run before the first
    micro-batch, after the last backward and after the optimizer step."""
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

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(3):  # warm-up (and compilation)
        step(i)
    # Median step time, not total time: one hiccup of a shared machine (another process, a page-cache flush)
    # moves a mean of a few steps by several percent and a ratio with it. One sync per step, as a training
    # loop has anyway (the loss is read back for the divergence check).
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    return accum * batch[0] * batch[1] / statistics.median(times)
