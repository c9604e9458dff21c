"""Linear layer kinds, the role table, the factory that picks one kind per matrix, and the one layer lookup.

Every block matrix is built through :func:`make_linear` with a *role* (q, k, v, o, gate, up, down). :data:`ROLES`
says what each role belongs to: its *group* (qk, v, attn_out, ffn; what ``model.pc.targets`` /
``model.tsvd.targets`` name) and its *kind* (qkv, proj, fc1, fc2: Rybakov et al.'s activation kinds, by which
the monitors aggregate). Every kind offers ``forward``, ``init_weights(std)`` and ``effective_weight()`` (the
dense (out, in) matrix it applies), so the model never needs to know which kind it holds. :func:`iter_layers` is
how everything else (callbacks, merge, Gauss-Newton) finds the block matrices, of any kind or of one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pc_lightning.config import ModelConfig
from pc_lightning.layers.dense import DenseLinear


@dataclass(frozen=True)
class Role:
    group: str  # qk | v | attn_out | ffn (config targets)
    kind: str  # qkv | proj | fc1 | fc2 (monitors)


ROLES = {
    "q": Role("qk", "qkv"), "k": Role("qk", "qkv"), "v": Role("v", "qkv"), "o": Role("attn_out", "proj"),
    "gate": Role("ffn", "fc1"), "up": Role("ffn", "fc1"), "down": Role("ffn", "fc2"),
}


def make_linear(in_features: int, out_features: int, role: str, cfg: ModelConfig) -> nn.Module:
    group = ROLES[role].group
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


def iter_layers(model: nn.Module, kind: type[nn.Module] | None = None) -> list[tuple[str, nn.Module]]:
    """(module name, layer) in module order: every block matrix :func:`make_linear` built (it carries ``.role``),
    or, with ``kind`` (e.g. ``PCLinear``, ``TSVDLinear``), every layer of that class, however it was built."""
    if kind is not None:
        return [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    return [(name, m) for name, m in model.named_modules() if getattr(m, "role", None) in ROLES]


__all__ = ["DenseLinear", "ROLES", "Role", "iter_layers", "make_linear"]
