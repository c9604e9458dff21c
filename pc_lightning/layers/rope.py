"""Rotary position embeddings (Su et al., RoFormer, arXiv 2104.09864), in the "rotate half" layout that
Hugging Face's Llama uses, so exported weights need no permutation.

For position t and frequency pair i: theta_i = base^(-2i/d); x' = x * cos(t theta) + rotate_half(x) * sin(t theta).
"""

from __future__ import annotations

import torch


def rope_cache(max_seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_seq_len, head_dim), fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd)."""
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)
