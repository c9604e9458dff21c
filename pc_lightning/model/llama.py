"""A Llama-style decoder in one file: RMSNorm, RoPE, SwiGLU, SDPA attention, untied embeddings, no biases.

Touvron et al. 2023 (arXiv 2302.13971). Everything a variant changes is a field of
:class:`~pc_lightning.config.ModelConfig`, read here and nowhere else:

* ``linear``: which kind of matrix the blocks use (dense, PC, TSVD), via :func:`make_linear`;
* ``attn_norm`` (qk_norm / qkv_norm), ``post_proj_norm``, ``post_fc2_norm``: Rybakov et al. 2024
  (arXiv 2410.16682); qkv_norm drops the pre-attention norm; ``qk_norm_scope`` says whether the q/k (and v)
  LayerNorms normalise each head over head_dim (one LayerNorm(head_dim) shared by the heads) or the full width;
* ``attn_softcap``, ``logit_softcap``: Gemma 2, ``cap * tanh(x / cap)``;
* ``init: small`` and ``embed: scaled | layernorm``: Spike No More (Takase et al., arXiv 2312.16903),
  std = sqrt(2 / (5 d)) for every linear, embedding output times sqrt(d) or a LayerNorm on it;
* ``init: torchtitan``: the Llama init of torchtitan, which the PC reference trains from (:func:`block_init_stds`).

With ``init: normal | small`` out-projections (attention ``o`` and MLP ``down``) get their init std divided by
sqrt(2 n_layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pc_lightning.config import ModelConfig
from pc_lightning.layers import make_linear
from pc_lightning.layers.rope import apply_rope, rope_cache


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): smooth, keeps |x| < cap (Gemma 2)."""
    return cap * torch.tanh(x / cap)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = d // cfg.n_heads
        self.softcap = cfg.attn_softcap
        self.q = make_linear(d, d, "q", cfg)
        self.k = make_linear(d, d, "k", cfg)
        self.v = make_linear(d, d, "v", cfg)
        self.o = make_linear(d, d, "o", cfg)
        # Rybakov et al.: LayerNorm on the projected q, k (and v). Scope head: over each head's head_dim values,
        # one LayerNorm(head_dim) applied to every head (its gain and bias shared by the heads); full: over d.
        self.norm_per_head = cfg.qk_norm_scope == "head"
        width = self.head_dim if self.norm_per_head else d
        self.q_norm = nn.LayerNorm(width) if cfg.attn_norm in ("qk_norm", "qkv_norm") else None
        self.k_norm = nn.LayerNorm(width) if cfg.attn_norm in ("qk_norm", "qkv_norm") else None
        self.v_norm = nn.LayerNorm(width) if cfg.attn_norm == "qkv_norm" else None
        self.post_norm = nn.LayerNorm(d) if cfg.post_proj_norm else None
        # Hook point (identity): monitors read the (q, k) pair here, after qk-norm and RoPE.
        self.qk_probe = nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if not self.norm_per_head:
            q, k, v = self.normalise(q, k, v)  # (B, T, d): over the full width
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim) for t in (q, k, v))
        if self.norm_per_head:
            q, k, v = self.normalise(q, k, v)  # (B, T, heads, head_dim): each head over its own head_dim
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self.qk_probe((apply_rope(q, cos, sin), apply_rope(k, cos, sin)))
        if self.softcap > 0:
            y = capped_attention(q, k, v, self.softcap)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.o(y.transpose(1, 2).reshape(B, T, -1))
        return self.post_norm(y) if self.post_norm is not None else y

    def normalise(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The attn_norm LayerNorms over the last dimension (identity where a norm is off)."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return q, k, v


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float) -> torch.Tensor:
    """Causal attention with soft-capped scores: softmax(mask(cap * tanh(q k^T / sqrt(hd) / cap))) v.

    SDPA has no soft-cap, so on CUDA we use FlexAttention's ``score_mod`` (a fused kernel); elsewhere
    (CPU, and forward-mode AD) the explicit math path.
    """
    if q.is_cuda:
        from pc_lightning.model.flex import flex_capped_attention

        return flex_capped_attention(q, k, v, cap)
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    scores = softcap(scores, cap)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv 2002.05202)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = make_linear(cfg.d_model, cfg.d_ff, "gate", cfg)
        self.up = make_linear(cfg.d_model, cfg.d_ff, "up", cfg)
        self.down = make_linear(cfg.d_ff, cfg.d_model, "down", cfg)
        self.post_norm = nn.LayerNorm(cfg.d_model) if cfg.post_fc2_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(F.silu(self.gate(x)) * self.up(x))
        return self.post_norm(y) if self.post_norm is not None else y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # qkv_norm normalises q, k, v after projection instead of the block input.
        self.attn_norm = None if cfg.attn_norm == "qkv_norm" else nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x if self.attn_norm is None else self.attn_norm(x)
        x = x + self.attn(h, cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def base_init_std(cfg: ModelConfig) -> float:
    """The init std of the in-projections: sqrt(2 / (5 d)) with ``init: small``, else ``init_std``."""
    return math.sqrt(2.0 / (5.0 * cfg.d_model)) if cfg.init == "small" else cfg.init_std


def block_init_stds(cfg: ModelConfig, layer: int) -> dict[str, float]:
    """The init std of every block matrix role in block ``layer`` (0-based); every linear kind draws its matrix
    with it (``init_weights(std)``).

    * ``normal`` / ``small``: :func:`base_init_std` for q, k, v, gate, up; divided by sqrt(2 n_layers) for the
      out-projections o and down.
    * ``torchtitan`` (its Llama ``init_weights`` with ``depth_init``, which the PC reference keeps): q, k, v and
      gate (torchtitan's w1) at ``init_std`` (0.02); o, up (w3) and down (w2) at 0.02 / sqrt(2 (layer + 1)),
      which grows smaller with depth and includes torchtitan's scaling of the up-projection. torchtitan draws
      these from ``trunc_normal_`` with its default cut at ±2 (absolute), which is 100 std for 0.02: in effect
      a plain normal, which is what we draw. The embedding (N(0, 1)) and the head (normal of std d^-½ cut at ±3
      std) are set in :meth:`Llama.init_weights`; norms start at gain 1 (bias 0).
    """
    if cfg.init == "torchtitan":
        std, deep = cfg.init_std, cfg.init_std / math.sqrt(2.0 * (layer + 1))
        return {"q": std, "k": std, "v": std, "gate": std, "o": deep, "up": deep, "down": deep}
    std = base_init_std(cfg)
    out = std / math.sqrt(2.0 * cfg.n_layers)
    return {"q": std, "k": std, "v": std, "gate": std, "up": std, "o": out, "down": out}


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_norm = nn.LayerNorm(cfg.d_model) if cfg.embed == "layernorm" else None
        self.emb_scale = math.sqrt(cfg.d_model) if cfg.embed == "scaled" else 1.0
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        if cfg.init == "torchtitan":
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=1.0)
            head_std = cfg.d_model ** -0.5
            nn.init.trunc_normal_(self.lm_head.weight, mean=0.0, std=head_std, a=-3 * head_std, b=3 * head_std)
        else:
            # Spike No More uses the same std for the embedding, so with embed=scaled the embedding output has
            # std sqrt(d) * sqrt(2/(5d)) = sqrt(2/5) ~ 0.63 at init: the paper's "close to 1" (section 4).
            std = base_init_std(cfg)
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        for index, block in enumerate(self.blocks):
            stds = block_init_stds(cfg, index)
            # (the draw order of the earlier init, so that normal/small runs keep their initial weights)
            for layer in (block.attn.q, block.attn.k, block.attn.v, block.mlp.gate, block.mlp.up, block.attn.o,
                          block.mlp.down):
                layer.init_weights(stds[layer.role])

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)
        if self.emb_scale != 1.0:
            x = x * self.emb_scale
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab)."""
        T = idx.size(1)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if self.cfg.logit_softcap > 0:
            logits = softcap(logits, self.cfg.logit_softcap)
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, dense equivalent (PaLM appendix B): 6 N + 12 L d T (attention)."""
    d, L = cfg.d_model, cfg.n_layers
    matmul_params = L * (4 * d * d + 3 * d * cfg.d_ff) + d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * L * d * seq_len
