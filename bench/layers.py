"""Training throughput of the linear kinds: dense vs PC (level 4, FFN + attention out) vs TSVD (rank fractions).

Each variant runs the same training step (forward, next-token cross-entropy, backward, AdamW step) on the same
random batches in one process, eager and ``torch.compile``d, with its per-step machinery included the way
training runs it:

* PC (Wang et al., arXiv 2606.06470): W_eff = γ·σ̂·g(W/σ̂) once per optimizer step through
  :class:`pc_lightning.callbacks.pc_step.PCStep` (``begin_step`` before the first micro-batch, ``end_step``
  after the last backward), batched by shape; bf16 polynomial matmuls on CUDA;
* TSVD (Kamali et al., arXiv 2605.28573): built through the config (``model.linear=tsvd``), with the cached
  orthonormal factors refreshed after every optimizer step (``refresh_all``, as the OrthoRefresh callback does).

Reported as tokens/s and as ratios to dense measured in the same run, plus parameter counts and the time to
merge the model into a dense one (:func:`pc_lightning.merge.merge_model`, fp32, CPU). CPU: the ``tiny`` preset
shape. CUDA: ~134M (d 768, 12 layers, 12 heads, FFN 2048, vocab 32000, batch 16 x 1024, bf16 autocast,
fused AdamW); DESIGN.md section 8 has the H100 reference figures.

    python bench/layers.py [--steps N] [--accum 1] [--no-compile] [--out results/bench/layers.md]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from pc_lightning.callbacks.pc_step import PCStep, pc_layers
from pc_lightning.config import ModelConfig, PCConfig, TSVDConfig
from pc_lightning.merge import merge_model
from pc_lightning.model import Llama, count_parameters
from timing import setup, tokens_per_second, write_report  # bench/timing.py (this folder is on sys.path)



def variants(shape: dict) -> dict[str, ModelConfig]:
    return {
        "dense": ModelConfig(**shape),
        "pc (level 4, ffn+attn_out)": ModelConfig(**shape, linear="pc", pc=PCConfig(level=4)),
        "tsvd r=0.25": ModelConfig(**shape, linear="tsvd", tsvd=TSVDConfig(init_rank_fraction=0.25)),
        "tsvd r=0.5": ModelConfig(**shape, linear="tsvd", tsvd=TSVDConfig(init_rank_fraction=0.5)),
    }


def step_hooks(model: Llama, cfg: ModelConfig, bf16: bool):
    """(before the first micro-batch, after the last backward, after the optimizer step) for this linear kind."""
    if cfg.linear == "pc":
        pc = PCStep(cfg.pc.bf16_matmuls, layers=pc_layers(model))
        return (lambda: pc.begin_step(bf16)), pc.end_step, (lambda: None)
    if cfg.linear == "tsvd":
        from pc_lightning.callbacks.ortho_refresh import refresh_all

        return (lambda: None), (lambda: None), (lambda: refresh_all(model, cfg.tsvd.ortho_method))
    return (lambda: None), (lambda: None), (lambda: None)


def measure(cfg: ModelConfig, batch: tuple[int, int], device: torch.device, steps: int, accum: int,
            compile_: bool) -> float:
    """Tokens/s of full optimizer steps (``accum`` micro-batches each), after warm-up (compilation excluded)."""
    torch.manual_seed(0)
    model = Llama(cfg).to(device)
    begin, end, after = step_hooks(model, cfg, bf16=device.type == "cuda")
    return tokens_per_second(model, cfg.vocab_size, batch, device, steps, compile_, accum, begin, end, after)


def merge_seconds(cfg: ModelConfig) -> float | None:
    if cfg.linear == "dense":
        return None
    torch.manual_seed(0)
    model = Llama(cfg)
    t0 = time.perf_counter()
    merge_model(copy.deepcopy(model))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per configuration")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default="results/bench/layers.md")
    args = parser.parse_args()

    run = setup(args.steps, gpu_steps=20, cpu_steps=6)
    device, shape, batch, steps = run.device, run.shape, run.batch, run.steps
    configs = variants(shape)
    modes = [False] if args.no_compile else [False, True]

    tokens = {(name, c): measure(cfg, batch, device, steps, args.accum, c) for c in modes
              for name, cfg in configs.items()}
    params = {name: count_parameters(Llama(cfg)) for name, cfg in configs.items()}
    merges = {name: merge_seconds(cfg) for name, cfg in configs.items()}

    header = "| variant | params | merge s | " + " | ".join(
        f"{'compiled' if c else 'eager'} tokens/s | vs dense" for c in modes) + " |"
    lines = [
        f"# Linear kinds: dense vs PC vs TSVD ({run.where})",
        "",
        f"shape: {shape}, batch {batch[0]}x{batch[1]}, {args.accum} micro-batch(es) per step, {steps} timed "
        f"optimizer steps, torch {torch.__version__}",
        "",
        header,
        "|---|---|---|" + "---|---|" * len(modes),
    ]
    for name in configs:
        merge = "-" if merges[name] is None else f"{merges[name]:.2f}"
        cells = " | ".join(f"{tokens[name, c]:,.0f} | {tokens[name, c] / tokens['dense', c]:.2f}x" for c in modes)
        lines.append(f"| {name} | {params[name]:,} | {merge} | {cells} |")
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
