"""``model.compile`` with every linear kind: no graph breaks, one training graph that is not re-traced from one
optimizer step to the next, the same numbers as eager, and a compiled training run through the Trainer.

The GPU speed of PC and TSVD rests on this (docs/benchmarks.md): PC's per-step W_eff leaf and TSVD's cached
orthonormal factors change every step, and a guard on them would make dynamo re-trace each step. The speed
itself is measured by ``bench/layers.py``, not here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from pc_lightning.callbacks.pc_step import PCStep
from pc_lightning.config import ModelConfig, PCConfig
from pc_lightning.layers import iter_layers
from pc_lightning.layers.pc_linear import PCLinear
from pc_lightning.layers.tsvd_linear import refresh_all
from pc_lightning.model import Llama
from pc_lightning.train import train

SHAPE = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=128, max_seq_len=32)


def run_steps(model: Llama, cfg: ModelConfig, forward, bf16: bool, steps: int = 3, accum: int = 2) -> list[float]:
    """``steps`` AdamW steps of ``accum`` micro-batches each, with the per-step machinery training runs (under
    bf16 autocast, as bf16-mixed runs them, if ``bf16``)."""
    torch.manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (2, 17)) for _ in range(steps * accum)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pc = PCStep(layers=[layer for _, layer in iter_layers(model, PCLinear)]) if cfg.linear == "pc" else None
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    losses = []
    for i in range(steps):
        if pc is not None:
            pc.begin_step(bf16)
        for x in data[i * accum:(i + 1) * accum]:
            with amp:
                logits = forward(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
            (loss / accum).backward()
            losses.append(loss.item())
        if pc is not None:
            pc.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.linear == "tsvd":
            refresh_all(model, cfg.tsvd.ortho_method)
    return losses


# Graph breaks and re-traces are decided by dynamo, before any backend runs: the fast cases compile with
# "aot_eager" (dynamo + AOTAutograd, no code generation); one fp32 case per linear kind with inductor, the backend
# that `model.compile` uses, stays in the slow suite.
CASES = [pytest.param(linear, bf16, "aot_eager", id=f"{linear}-{'bf16' if bf16 else 'fp32'}-aot_eager")
         for linear in ("dense", "pc", "tsvd") for bf16 in (False, True)] + [
    pytest.param(linear, False, "inductor", id=f"{linear}-fp32-inductor", marks=pytest.mark.slow)
    for linear in ("dense", "pc", "tsvd")]


@pytest.mark.parametrize("linear, bf16, backend", CASES)
def test_compiled_training_traces_once_and_matches_eager(linear, bf16, backend):
    cfg = ModelConfig(**SHAPE, linear=linear, pc=PCConfig(level=4))
    torch.manual_seed(0)
    eager = Llama(cfg)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()

    eager_losses = run_steps(eager, cfg, eager, bf16)
    compiled_losses = run_steps(compiled, cfg, torch.compile(compiled, backend=backend), bf16)

    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # 6 forwards over 3 optimizer steps, one graph
    # bf16: inductor fuses and rounds differently from eager autocast
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-2 if bf16 else 1e-4)
    if not bf16:
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # ~50 s: four training runs, two of them compiled
@pytest.mark.parametrize("linear", ["pc", "tsvd"])
def test_compiled_run_matches_eager_run(tiny_cfg, linear):
    """Through the Trainer, with gradient accumulation (PC) and rank changes (TSVD, which re-trace)."""
    extra = {"model.linear": linear, "trainer.accumulate_grad_batches": 2}
    if linear == "tsvd":
        extra.update({"model.tsvd.rank_check_every": 3, "model.tsvd.energy_threshold": 0.6})
    eager = train(tiny_cfg(name=f"{linear}-eager", **extra), quiet=True)
    compiled = train(tiny_cfg(name=f"{linear}-compiled", **{"model.compile": True}, **extra), quiet=True)
    assert eager.status == compiled.status == "finished" and compiled.step == 6
    assert compiled.metrics["val/loss"] == pytest.approx(eager.metrics["val/loss"], rel=1e-3)
