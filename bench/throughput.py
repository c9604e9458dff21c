"""Training throughput of the suite's baseline Llama vs Hugging Face `LlamaForCausalLM` of the same shape.

Both models run the same training step (forward, next-token cross-entropy, backward, AdamW step) on the
same random batches in the same process, eager and `torch.compile`d; the figure that matters is the
ratio suite / HF measured in this run. CPU: the `tiny` preset shape. CUDA: ~134M (d 768, 12 layers,
12 heads, FFN 2048, vocab 32000, batch 16 x 1024, bf16 autocast, fused AdamW), where the
PC paper's setup reports HF compiled at 394k tokens/s (38% MFU) on an H100.

    python bench/throughput.py [--steps 20] [--no-compile] [--out results/bench/throughput.md]
"""

from __future__ import annotations

import argparse

import torch

from pc_lightning.config import ModelConfig
from pc_lightning.model import Llama, count_parameters, flops_per_token
from timing import setup, tokens_per_second, write_report  # bench/timing.py (this folder is on sys.path)



def hf_llama(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


class HFLogits(torch.nn.Module):
    """idx -> logits, like the suite's model (HF returns an output object)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=False).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default="results/bench/throughput.md")
    args = parser.parse_args()

    run = setup(args.steps, gpu_steps=30, cpu_steps=10)
    device, shape, batch, steps = run.device, run.shape, run.batch, run.steps
    cfg = ModelConfig(**shape)

    rows = []
    modes = [False] if args.no_compile else [False, True]
    for compile_ in modes:
        torch.manual_seed(0)
        ours = Llama(cfg)
        hf = HFLogits(hf_llama(cfg))
        n_ours, n_hf = count_parameters(ours), count_parameters(hf)
        tps_hf = tokens_per_second(hf, cfg.vocab_size, batch, device, steps, compile_)
        tps_ours = tokens_per_second(ours, cfg.vocab_size, batch, device, steps, compile_)
        rows.append((("compiled" if compile_ else "eager"), tps_ours, tps_hf, n_ours, n_hf))
        del ours, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()

    lines = [
        f"# Throughput: suite baseline vs HF LlamaForCausalLM ({run.where})",
        "",
        f"shape: {shape}, batch {batch[0]}x{batch[1]}, {steps} timed training steps, "
        f"torch {torch.__version__}",
        "",
        "| mode | suite tokens/s | HF tokens/s | ratio suite/HF | params suite | params HF |",
        "|---|---|---|---|---|---|",
    ]
    for mode, ours, hf, n_ours, n_hf in rows:
        lines.append(f"| {mode} | {ours:,.0f} | {hf:,.0f} | {ours / hf:.2f}x | {n_ours:,} | {n_hf:,} |")
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        peak = get_available_flops(device, torch.bfloat16)
        fpt = flops_per_token(cfg, batch[1])
        if peak:
            lines += ["", "MFU (suite): " + ", ".join(f"{m} {o * fpt / peak:.1%}" for m, o, *_ in rows)]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
