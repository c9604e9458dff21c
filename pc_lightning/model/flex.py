"""Soft-capped causal attention on CUDA through FlexAttention (fused kernel, compiled on first use).

FlexAttention (torch.nn.attention.flex_attention) takes a ``score_mod`` applied to each score after the
1/sqrt(hd) scaling and before masking, which is exactly where Gemma 2 puts its soft-cap.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

_flex = torch.compile(flex_attention, dynamic=False)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: str):
    return create_block_mask(_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def flex_capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float) -> torch.Tensor:
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    block_mask = _causal_block_mask(q.size(-2), str(q.device))
    return _flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
