"""Linear layer kinds and the factory that picks one per matrix.

Every block matrix is built through :func:`make_linear` with a *role* (q, k, v, o, gate, up, down).
The role's *group* (qk, v, attn_out, ffn) is what ``model.pc.targets`` / ``model.tsvd.targets`` name.
Every kind offers ``forward``, ``init_weights(std)`` and ``effective_weight()`` (the dense (out, in)
matrix it applies), so the model never needs to know which kind it holds.
"""

from __future__ import annotations

from torch import nn

from pc_lightning.config import ModelConfig
from pc_lightning.layers.dense import DenseLinear

ROLE_GROUP = {"q": "qk", "k": "qk", "v": "v", "o": "attn_out", "gate": "ffn", "up": "ffn", "down": "ffn"}


def make_linear(in_features: int, out_features: int, role: str, cfg: ModelConfig) -> nn.Module:
    group = ROLE_GROUP[role]
    if cfg.linear == "pc" and group in cfg.pc.targets:
        from pc_lightning.layers.pc_linear import PCLinear

        layer = PCLinear(in_features, out_features, cfg.pc)
    elif cfg.linear == "tsvd" and group in cfg.tsvd.targets:
        from pc_lightning.layers.tsvd_linear import TSVDLinear

        layer = TSVDLinear(in_features, out_features, cfg.tsvd)
    else:
        layer = DenseLinear(in_features, out_features)
    layer.role = role
    return layer


__all__ = ["DenseLinear", "ROLE_GROUP", "make_linear"]
