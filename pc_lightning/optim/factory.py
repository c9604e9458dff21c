"""Build the optimizer named by ``optim.name`` for a model (docs/optimizers.md).

* ``adamw``: ``torch.optim.AdamW``. Parameter groups: weight decay on matrices (``ndim >= 2``) and, with
  ``decay_pc_gamma`` (default), on the PC layers' gains γ, and with ``decay_tsvd_s`` (default) on the TSVD
  layers' singular values s; norms, other gains and scalars get none. Why s: the TSVD layer retracts U and V
  onto orthonormal factors after every step, and the Q of the QR of c·U is the Q of U, so the decay the matrix
  groups apply to U and V is undone; ‖U diag(s) Vᵀ‖_F = ‖s‖ for orthonormal U, V, so decaying W in Frobenius
  norm, as a dense layer is decayed, is decaying s. With ``decay_all`` every parameter is decayed (norm gains
  and biases, γ, TSVD s, embedding, head), as the PC reference does (its AdamW and its Muon's AdamW part take
  ``model.parameters()`` with weight decay 0.1); this holds for every optimizer below (:func:`also_decayed`).
* ``muon``: ``torch.optim.Muon`` (Keller Jordan 2024: Nesterov momentum, then ``ns_steps`` Newton-Schulz
  iterations that map the update to about U Vᵀ of its SVD, then lr scaled by ``adjust_lr_fn``:
  ``original`` = sqrt(max(1, rows/cols)), ``match_rms_adamw`` = 0.2·sqrt(max(rows, cols)), which gives the
  update the RMS of an AdamW update, so ``lr`` is on AdamW's scale) on the *hidden matrices*, AdamW with
  ``muon.adamw_lr`` on everything else, stepped together by :class:`CombinedOptimizer`.
  Hidden matrices = every 2-D parameter under ``blocks.``: dense weights, the raw weight W of a PC layer
  (Muon orthogonalises the update of W; the polynomial acts on W in the forward) and the TSVD factors U and
  V (matrices whose rows/columns the layer re-orthonormalises anyway; Muon's update keeps their scale).
  Not hidden: token embedding and LM head (Muon is meant for hidden layers: the embedding is a lookup and
  the head's rows are per-token classifiers), and all 1-D / scalar parameters (norm weights, PC gains γ,
  TSVD singular values s).
* ``soap``: ``pytorch_optimizer.SOAP`` (Vyas et al. 2024, arXiv 2409.11321), see :func:`soap`.
* ``gn`` / ``gn_layerwise``: the outer step belongs to
  :class:`~pc_lightning.modules.gauss_newton.GaussNewtonModule`; :func:`build_inner_optimizer` builds the
  inner optimizer (``gn.inner_optimizer`` = adamw | muon, every group at ``gn.inner_lr``; betas and weight decay
  from ``gn.inner_betas`` / ``gn.inner_weight_decay`` / ``gn.inner_muon_weight_decay`` where set).
"""

from __future__ import annotations

import dataclasses

import pytorch_optimizer
import torch
from torch import nn

from pc_lightning.config import OptimConfig
from pc_lightning.optim.combined import CombinedOptimizer

NamedParams = list[tuple[str, nn.Parameter]]


def pc_gain_names(model: nn.Module) -> frozenset[str]:
    """Parameter names of the PC layers' learnable gains γ."""
    from pc_lightning.layers.pc_linear import PCLinear

    return frozenset(f"{name}.gamma" for name, m in model.named_modules()
                     if isinstance(m, PCLinear) and isinstance(m.gamma, nn.Parameter))


def tsvd_singular_value_names(model: nn.Module) -> frozenset[str]:
    """Parameter names of the TSVD layers' singular values s."""
    from pc_lightning.layers import iter_layers
    from pc_lightning.layers.tsvd_linear import TSVDLinear

    return frozenset(f"{name}.s" for name, _ in iter_layers(model, TSVDLinear))


def also_decayed(model: nn.Module, cfg: OptimConfig) -> frozenset[str]:
    """Names of the parameters below 2-D that get weight decay too: all of them with ``decay_all``, else the PC
    gains with ``decay_pc_gamma`` and the TSVD singular values with ``decay_tsvd_s``."""
    if cfg.decay_all:
        return frozenset(name for name, _ in model.named_parameters())
    names = pc_gain_names(model) if cfg.decay_pc_gamma else frozenset()
    return names | tsvd_singular_value_names(model) if cfg.decay_tsvd_s else names


def weight_decay_at(cfg: OptimConfig, lr: float, weight_decay: float | None = None) -> float:
    """The weight decay (default ``cfg.weight_decay``) to hand an optimizer (part) whose peak LR is ``lr``.
    torch's optimizers decay by lr_t * weight_decay per step; with ``independent_weight_decay`` the decay must not
    scale with the peak LR (Wortsman et al. 2023: p -= s_t * lambda * p, s_t the schedule), so they get
    lambda / lr."""
    weight_decay = cfg.weight_decay if weight_decay is None else weight_decay
    return weight_decay / lr if cfg.independent_weight_decay else weight_decay


def decay_groups(params: NamedParams, weight_decay: float, lr: float,
                 also_decay: frozenset[str] = frozenset()) -> list[dict]:
    """Two groups: weight decay on matrices and on the names in ``also_decay``; none on the rest."""
    decay = [p for n, p in params if p.ndim >= 2 or n in also_decay]
    no_decay = [p for n, p in params if not (p.ndim >= 2 or n in also_decay)]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def adamw(params: NamedParams, cfg: OptimConfig, lr: float | None = None,
          also_decay: frozenset[str] = frozenset()) -> torch.optim.AdamW:
    lr = cfg.lr if lr is None else lr
    fused = all(p.is_cuda for _, p in params) and len(params) > 0
    return torch.optim.AdamW(decay_groups(params, weight_decay_at(cfg, lr), lr, also_decay), lr=lr,
                             betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """Muon's share: 2-D parameters inside the transformer blocks (see the module docstring)."""
    return param.ndim == 2 and name.startswith("blocks.")


def muon(params: NamedParams, cfg: OptimConfig, lr: float | None = None, adamw_lr: float | None = None,
         also_decay: frozenset[str] = frozenset(), muon_weight_decay: float | None = None) -> CombinedOptimizer:
    """Muon on the hidden matrices (weight decay ``muon_weight_decay``, default ``cfg.weight_decay``), AdamW on
    the rest."""
    lr = cfg.lr if lr is None else lr
    adamw_lr = cfg.muon.adamw_lr if adamw_lr is None else adamw_lr
    muon_weight_decay = cfg.weight_decay if muon_weight_decay is None else muon_weight_decay
    hidden = [(n, p) for n, p in params if is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in params if not is_hidden_matrix(n, p)]
    parts: list[torch.optim.Optimizer] = []
    if hidden:
        parts.append(torch.optim.Muon(
            [{"params": [p for _, p in hidden], "name": "muon"}], lr=lr,
            weight_decay=weight_decay_at(cfg, lr, muon_weight_decay),
            momentum=cfg.muon.momentum, nesterov=cfg.muon.nesterov, ns_steps=cfg.muon.ns_steps,
            adjust_lr_fn=cfg.muon.adjust_lr_fn,
        ))
    if rest:
        parts.append(adamw(rest, cfg, lr=adamw_lr, also_decay=also_decay))
    return CombinedOptimizer(parts)


def soap(params: NamedParams, cfg: OptimConfig, also_decay: frozenset[str] = frozenset()) -> pytorch_optimizer.SOAP:
    """SOAP: Adam run in the eigenbasis of Shampoo's factors L = E[G Gᵀ], R = E[Gᵀ G].

    Per matrix: rotate the gradient G' = Q_Lᵀ G Q_R, run Adam on G', rotate the Adam direction back, and
    update L, R every step (EMA with beta2). Dimensions above ``max_precond_dim`` stay unrotated; 1-D
    parameters get plain Adam.

    * First step: ``pytorch_optimizer.SOAP`` spends the first ``step()`` initialising L, R and their
      eigenbases (``torch.linalg.eigh``) from the first gradient and leaves the parameters unchanged
      (tested in tests/test_optimizers.py). Step 1 of a SOAP run therefore trains nothing; bias
      correction counts from the second step.
    * ``precondition_frequency``: every that many steps the eigenbases are re-estimated by one power
      iteration followed by a QR decomposition, warm-started from the previous basis (the paper's cheap
      update, not a fresh ``eigh``). Adam's first moment lives in parameter space and is projected every
      step; the second moment lives in the rotated basis and is re-ordered to follow the new eigenvectors.
    """
    weight_decay = weight_decay_at(cfg, cfg.lr)
    return pytorch_optimizer.SOAP(
        decay_groups(params, weight_decay, cfg.lr, also_decay), lr=cfg.lr, betas=tuple(cfg.betas),
        weight_decay=weight_decay, precondition_frequency=cfg.soap.precondition_frequency,
        max_precondition_dim=cfg.soap.max_precond_dim, eps=cfg.eps,
    )


def build_inner_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The Gauss-Newton inner optimizer over all trainable parameters; every group at ``gn.inner_lr``, with
    ``gn.inner_betas`` / ``gn.inner_weight_decay`` / ``gn.inner_muon_weight_decay`` where set (else optim's)."""
    gn = cfg.gn
    betas = cfg.betas if gn.inner_betas is None else gn.inner_betas
    weight_decay = cfg.weight_decay if gn.inner_weight_decay is None else gn.inner_weight_decay
    inner = dataclasses.replace(cfg, betas=betas, weight_decay=weight_decay)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    also_decay = also_decayed(model, cfg)
    if gn.inner_optimizer == "muon":
        return muon(params, inner, lr=gn.inner_lr, adamw_lr=gn.inner_lr, also_decay=also_decay,
                    muon_weight_decay=gn.inner_muon_weight_decay)
    return adamw(params, inner, lr=gn.inner_lr, also_decay=also_decay)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    also_decay = also_decayed(model, cfg)
    if cfg.name == "adamw":
        return adamw(params, cfg, also_decay=also_decay)
    if cfg.name == "muon":
        return muon(params, cfg, also_decay=also_decay)
    if cfg.name == "soap":
        return soap(params, cfg, also_decay=also_decay)
    if cfg.gauss_newton:
        return build_inner_optimizer(model, cfg)
    raise ValueError(f"unknown optim.name={cfg.name}")
