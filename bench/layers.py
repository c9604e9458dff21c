"""Training throughput of the linear kinds: dense vs PC (level 4, FFN + attention out) vs TSVD (rank fractions).

Each variant runs the same training step (forward, next-token cross-entropy, backward, AdamW step) on the same
random batches in one process, eager and ``torch.compile``d, with its per-step machinery included the way
training runs it:

* PC (Wang et al., arXiv 2606.06470): W_eff = γ·σ̂·g(W/σ̂) once per optimizer step through
  :class:`pc_lightning.callbacks.pc_step.PCStep` (``begin_step`` before the first micro-batch, ``end_step``
  after the last backward), batched by shape; bf16 polynomial matmuls on CUDA;
* TSVD (Kamali et al., arXiv 2605.28573): built through the config (``model.linear=tsvd``), with the cached
  orthonormal factors refreshed after every optimizer step (``refresh_all``, as the OrthoRefresh callback does,
  with the default ``ortho_method``, Cholesky-QR).

Reported as tokens/s and as ratios to dense measured in the same run, plus parameter counts and the time to
merge the model into a dense one (:func:`pc_lightning.merge.merge_model`, fp32, CPU). Two tables:

* **main**: dense vs PC vs TSVD, once per ``--accum`` value. CUDA: ~134M (d 768, 12 layers, 12 heads, FFN 2048,
  vocab 32000, batch 16 x 1024, bf16 autocast, fused AdamW), ``--accum 1 8`` by default. CPU: the ``tiny``
  preset shape, ``--accum 1``.
* **wide**: dense vs TSVD at a wider model, where the factors' smaller matmuls pay. CUDA: d 2048, FFN 5632,
  8 layers, 16 heads, batch 8 x 1024 (the PC paper's 1B-width reference shape). CPU: d 512, FFN 1408, 2 layers,
  batch 4 x 128, to show the trend with width only.

On CUDA the report ends with issue 3's speed goals (compiled, ratio to dense) next to what this run measured.

    python bench/layers.py [--steps N] [--accum 1 8] [--no-compile] [--no-wide] [--out results/bench/layers.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from pc_lightning.callbacks.pc_step import PCStep
from pc_lightning.config import ModelConfig, PCConfig, TSVDConfig
from pc_lightning.layers import iter_layers
from pc_lightning.layers.pc_linear import PCLinear
from pc_lightning.layers.tsvd_linear import refresh_all
from pc_lightning.merge import merge_model
from pc_lightning.model import Llama, count_parameters
from timing import setup, tokens_per_second, write_report  # bench/timing.py (this folder is on sys.path)

# The wide table's shape (ModelConfig keywords) and batch, by device.
WIDE = {
    "cuda": (dict(d_model=2048, n_layers=8, n_heads=16, d_ff=5632, vocab_size=32000, max_seq_len=1024), (8, 1024)),
    "cpu": (dict(d_model=512, n_layers=2, n_heads=8, d_ff=1408, vocab_size=4096, max_seq_len=256), (4, 128)),
}
PC = "pc (level 4, ffn+attn_out)"
TSVD = {0.25: "tsvd r=0.25", 0.5: "tsvd r=0.5"}

# Issue 3's goals on CUDA, compiled: (table, accum, variant) -> minimum tokens/s ratio to dense.
GOALS = {
    ("main", 1, PC): 0.90,
    ("main", 8, PC): 0.97,
    ("main", 1, TSVD[0.25]): 0.90,
    ("wide", 1, TSVD[0.25]): 1.35,
}


def variants(shape: dict, with_pc: bool = True) -> dict[str, ModelConfig]:
    configs = {"dense": ModelConfig(**shape)}
    if with_pc:
        configs[PC] = ModelConfig(**shape, linear="pc", pc=PCConfig(level=4))
    for fraction, name in TSVD.items():
        configs[name] = ModelConfig(**shape, linear="tsvd", tsvd=TSVDConfig(init_rank_fraction=fraction))
    return configs


def step_hooks(model: Llama, cfg: ModelConfig, bf16: bool):
    """(before the first micro-batch, after the last backward, after the optimizer step) for this linear kind."""
    if cfg.linear == "pc":
        pc = PCStep(cfg.pc.bf16_matmuls, layers=[layer for _, layer in iter_layers(model, PCLinear)])
        return (lambda: pc.begin_step(bf16)), pc.end_step, (lambda: None)
    if cfg.linear == "tsvd":
        return (lambda: None), (lambda: None), (lambda: refresh_all(model, cfg.tsvd.ortho_method))
    return (lambda: None), (lambda: None), (lambda: None)


def measure(cfg: ModelConfig, batch: tuple[int, int], device: torch.device, steps: int, accum: int,
            compile_: bool) -> float:
    """Tokens/s of full optimizer steps (``accum`` micro-batches each), after warm-up (compilation excluded)."""
    torch.manual_seed(0)
    model = Llama(cfg).to(device)
    begin, end, after = step_hooks(model, cfg, bf16=device.type == "cuda")
    return tokens_per_second(model, cfg.vocab_size, batch, device, steps, compile_, accum, begin, end, after)


def params_and_merge_seconds(cfg: ModelConfig) -> tuple[int, float | None]:
    """The parameter count, and the time to merge the model into a dense one (None for dense), on one model."""
    torch.manual_seed(0)
    model = Llama(cfg)
    params = count_parameters(model)
    if cfg.linear == "dense":
        return params, None
    t0 = time.perf_counter()
    merge_model(model)
    return params, time.perf_counter() - t0


def table(title: str, configs: dict[str, ModelConfig], batch: tuple[int, int], device: torch.device, steps: int,
          accum: int, modes: list[bool]) -> tuple[list[str], dict[tuple[str, bool], float]]:
    """One Markdown table (tokens/s and ratio to dense per mode, params, merge time) and its ratios."""
    tokens = {(name, c): measure(cfg, batch, device, steps, accum, c) for c in modes for name, cfg in configs.items()}
    ratios = {key: value / tokens["dense", key[1]] for key, value in tokens.items()}
    shape = {k: v for k, v in dataclasses.asdict(configs["dense"]).items()
             if k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size")}
    lines = [
        f"## {title}: {accum} micro-batch(es) per step",
        "",
        f"shape: {shape}, batch {batch[0]}x{batch[1]} per micro-batch, {steps} timed optimizer steps",
        "",
        "| variant | params | merge s | " + " | ".join(
            f"{'compiled' if c else 'eager'} tokens/s | vs dense" for c in modes) + " |",
        "|---|---|---|" + "---|---|" * len(modes),
    ]
    for name, cfg in configs.items():
        params, merge = params_and_merge_seconds(cfg)
        cells = " | ".join(f"{tokens[name, c]:,.0f} | {ratios[name, c]:.2f}x" for c in modes)
        lines.append(f"| {name} | {params:,} | {'-' if merge is None else f'{merge:.2f}'} | {cells} |")
    return lines + [""], ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per configuration")
    parser.add_argument("--accum", type=int, nargs="+", default=None,
                        help="micro-batches per optimizer step, one main table each (default: 1 8 on CUDA, 1 on CPU)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-wide", action="store_true", help="skip the wide dense-vs-TSVD table")
    parser.add_argument("--out", default="results/bench/layers.md")
    args = parser.parse_args()

    run = setup(args.steps, gpu_steps=20, cpu_steps=10)
    cuda = run.device.type == "cuda"
    modes = [False] if args.no_compile else [False, True]
    lines = [f"# Linear kinds: dense vs PC vs TSVD ({run.where}, torch {torch.__version__})", ""]
    ratios: dict[tuple[str, int, str], float] = {}  # (table, accum, variant) -> compiled ratio to dense
    for accum in args.accum or ([1, 8] if cuda else [1]):
        body, r = table("main", variants(run.shape), run.batch, run.device, run.steps, accum, modes)
        lines += body
        ratios.update({("main", accum, name): v for (name, c), v in r.items() if c})
    if not args.no_wide:
        shape, batch = WIDE[run.device.type]
        body, r = table("wide", variants(shape, with_pc=False), batch, run.device, run.steps, 1, modes)
        lines += body
        ratios.update({("wide", 1, name): v for (name, c), v in r.items() if c})

    if cuda:
        lines += ["## Issue 3's speed goals (compiled, tokens/s ratio to dense in this run)", "",
                  "| table | micro-batches | variant | goal | measured | met |", "|---|---|---|---|---|---|"]
        for (where, accum, name), goal in GOALS.items():
            got = ratios.get((where, accum, name))
            measured, met = ("not run", "-") if got is None else (f"{got:.2f}x", "yes" if got >= goal else "NO")
            lines.append(f"| {where} | {accum} | {name} | >= {goal:.2f}x | {measured} | {met} |")
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
