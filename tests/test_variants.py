"""Stability variants change the forward exactly as their formulas say; combinations train; divergence is a result.

Rybakov et al. 2024 (qk/qkv/fc norms, soft-cap), Gemma 2 (soft-capping), PaLM (z-loss), Spike No More (init,
embedding scaling / LayerNorm).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from pc_lightning import tracking
from pc_lightning.config import ModelConfig
from pc_lightning.model.llama import Llama, capped_attention, softcap
from pc_lightning.modules.pretrain import next_token_loss
from pc_lightning.train import train


def model(**variant) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=64, **variant)
    return Llama(cfg)


def tokens(B: int = 4, T: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))


def probe_qk(m: Llama, idx: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    handle = m.blocks[block].attn.qk_probe.register_forward_hook(lambda mod, args, out: seen.update(qk=out))
    m(idx)
    handle.remove()
    return seen["qk"]


# ---------------------------------------------------------------------------------------------- soft-capping
def test_softcap_formula_and_bound():
    x = torch.linspace(-1e4, 1e4, 1001)
    y = softcap(x, 30.0)
    assert torch.equal(y, 30.0 * torch.tanh(x / 30.0))
    assert y.abs().max() <= 30.0


def test_capped_attention_is_softmax_of_capped_scores():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8) * 20 for _ in range(3))  # scores far beyond the cap
    cap = 5.0
    scores = cap * torch.tanh((q @ k.transpose(-2, -1)) / math.sqrt(8) / cap)
    assert scores.abs().max() <= cap
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(capped_attention(q, k, v, cap), expected)
    assert not torch.allclose(capped_attention(q, k, v, cap), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_softcap_changes_the_model_forward():
    plain, capped = model(), model(attn_softcap=1.0)
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for m in (plain, capped):  # large q, k weights so the scores exceed the cap
            for block in m.blocks:
                block.attn.q.weight.mul_(50)
                block.attn.k.weight.mul_(50)
        assert not torch.allclose(plain(tokens()), capped(tokens()))


def test_capped_logits_never_exceed_the_cap():
    m = model(logit_softcap=30.0)
    with torch.no_grad():
        m.lm_head.weight.mul_(1e4)
        logits = m(tokens())
    assert logits.abs().max() <= 30.0
    assert logits.abs().max() > 29.0  # the cap is reached, so the bound is tested


# ---------------------------------------------------------------------------------------------- norms
def test_qkv_norm_has_no_pre_attention_norm():
    m = model(attn_norm="qkv_norm")
    names = [n for n, _ in m.named_parameters()]
    assert not any(".attn_norm." in n for n in names)
    assert all(b.attn_norm is None for b in m.blocks)
    assert any(".attn.v_norm." in n for n in names) and any(".attn.q_norm." in n for n in names)
    assert all(b.attn_norm is not None for b in model(attn_norm="qk_norm").blocks)


def test_qkv_norm_normalises_v():
    m = model(attn_norm="qkv_norm")
    with torch.no_grad():  # the un-normalised block input has std 0.02: v's variance would sit near LayerNorm's eps
        m.tok_emb.weight.mul_(50)
    seen = {}
    m.blocks[0].attn.v_norm.register_forward_hook(lambda mod, args, out: seen.update(v=out))
    m(tokens())
    torch.testing.assert_close(seen["v"].mean(-1), torch.zeros_like(seen["v"].mean(-1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["v"].var(-1, unbiased=False), torch.ones_like(seen["v"][..., 0]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("attn_norm", ["qk_norm", "qkv_norm"])
def test_qk_norm_normalises_q_and_k(attn_norm):
    """After LayerNorm (gain 1, bias 0) each token's q has mean 0, variance 1 over the model width, i.e. squared
    norm d; RoPE rotates pairs within a head and keeps that norm."""
    m = model(attn_norm=attn_norm)
    with torch.no_grad():
        m.tok_emb.weight.mul_(50)  # well above LayerNorm's eps also without the pre-attention norm (qkv_norm)
        for block in m.blocks:
            block.attn.q.weight.mul_(30)  # without the norm, the norm of q would be far from sqrt(d)
        for t in probe_qk(m, tokens()):
            per_token = t.transpose(1, 2).flatten(2).norm(dim=-1)  # (B, T)
            torch.testing.assert_close(per_token, torch.full_like(per_token, math.sqrt(64)), rtol=1e-3, atol=0)
    plain_q, _ = probe_qk(model(), tokens())
    assert not torch.allclose(plain_q.transpose(1, 2).flatten(2).norm(dim=-1), torch.full((4, 32), 8.0), rtol=0.1)


def normalised_projections(m: Llama, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """q, k, v of block 0 as attention sees them before RoPE, (B, T, heads, head_dim), with the norms' gains and
    biases set off identity, so a test sees the values *before* the affine part by undoing it."""
    attn = m.blocks[0].attn
    seen = {}
    for name in ("q", "k", "v"):
        norm = getattr(attn, f"{name}_norm")
        if norm is not None:
            with torch.no_grad():
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.uniform_(-0.5, 0.5)
            norm.register_forward_hook(
                lambda mod, args, out, name=name: seen.update({name: (out - mod.bias) / mod.weight}))
    m(idx)
    B, T = idx.shape
    return {n: t.reshape(B, T, attn.n_heads, attn.head_dim) for n, t in seen.items()}


@pytest.mark.parametrize("attn_norm", ["qk_norm", "qkv_norm"])
@pytest.mark.parametrize("scope", ["head", "full"])
def test_qk_norm_scope_normalises_each_head_or_the_whole_width(attn_norm, scope):
    """qk_norm_scope head: before the affine part each head's vector has mean 0 and variance 1 over head_dim (one
    LayerNorm(head_dim) shared by the heads); full: mean 0 and variance 1 over the whole width d, heads not each."""
    m = model(attn_norm=attn_norm, qk_norm_scope=scope)
    width = m.blocks[0].attn.head_dim if scope == "head" else 64
    assert m.blocks[0].attn.q_norm.normalized_shape == (width,)
    with torch.no_grad():
        m.tok_emb.weight.mul_(50)  # well above LayerNorm's eps also without the pre-attention norm (qkv_norm)
        for block in m.blocks:  # variances far above LayerNorm's eps, and the two heads at very different scales
            for proj in (block.attn.q, block.attn.k, block.attn.v):
                proj.weight.mul_(10)
                proj.weight[:32].mul_(20)
        got = normalised_projections(m, tokens())
    assert set(got) == ({"q", "k", "v"} if attn_norm == "qkv_norm" else {"q", "k"})
    for name, t in got.items():
        per_head_var = t.var(-1, unbiased=False)
        whole = t.flatten(2)
        if scope == "head":
            torch.testing.assert_close(t.mean(-1), torch.zeros_like(t[..., 0]), atol=1e-4, rtol=0)
            torch.testing.assert_close(per_head_var, torch.ones_like(per_head_var), atol=1e-3, rtol=0)
        else:
            torch.testing.assert_close(whole.mean(-1), torch.zeros_like(whole[..., 0]), atol=1e-4, rtol=0)
            torch.testing.assert_close(whole.var(-1, unbiased=False), torch.ones_like(whole[..., 0]), atol=1e-3,
                                       rtol=0)
            assert (per_head_var - 1).abs().max() > 0.5, name  # the heads are not each normalised


def test_rybakov_presets_normalise_per_head_and_the_model_default_stays_full():
    import os

    from pc_lightning.config import load_config

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf")
    assert ModelConfig().qk_norm_scope == "full"  # configs and checkpoints from before the key keep their model
    for preset in ("qk_norm", "qk_norm_cap", "qkv_norm", "qk_fc_norm"):
        cfg = load_config(os.path.join(root, "experiment", f"rybakov-{preset}.yaml"))
        assert cfg.model.qk_norm_scope == "head", preset
        assert cfg.model.attn_norm in ("qk_norm", "qkv_norm")


@pytest.mark.parametrize("scope", ["head", "full"])
def test_soft_capped_attention_with_either_scope_is_the_capped_softmax_of_the_normalised_q_k(scope):
    """qk_norm + soft-cap: attention is capped_attention (FlexAttention on CUDA) of the normalised, rotated q, k."""
    from pc_lightning.layers.rope import apply_rope

    m = model(attn_norm="qk_norm", qk_norm_scope=scope, attn_softcap=2.0)
    attn, idx = m.blocks[0].attn, tokens()
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        m(idx)
        x, T = seen["x"], idx.shape[1]
        B = x.shape[0]
        q, k, v = attn.q(x), attn.k(x), attn.v(x)
        split = lambda t: t.view(B, T, attn.n_heads, attn.head_dim)  # noqa: E731
        if scope == "head":
            q, k = attn.q_norm(split(q)), attn.k_norm(split(k))
        else:
            q, k = split(attn.q_norm(q)), split(attn.k_norm(k))
        cos, sin = m.rope_cos[:T], m.rope_sin[:T]
        q, k, v = (t.transpose(1, 2) for t in (q, k, split(v)))
        y = capped_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 2.0)
        want = attn.o(y.transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(seen["y"], want)


@pytest.mark.parametrize("which", ["post_proj_norm", "post_fc2_norm"])
def test_post_norms_normalise_the_sublayer_output(which):
    m = model(**{which: True})
    target = m.blocks[0].attn if which == "post_proj_norm" else m.blocks[0].mlp
    with torch.no_grad():  # at init the sub-layer output is tiny and LayerNorm's eps would dominate its variance
        (target.o if which == "post_proj_norm" else target.down).weight.mul_(1e3)
    seen = {}
    target.register_forward_hook(lambda mod, args, out: seen.update(y=out))
    m(tokens())
    torch.testing.assert_close(seen["y"].var(-1, unbiased=False), torch.ones_like(seen["y"][..., 0]), atol=1e-3, rtol=0)
    assert target.post_norm is not None and model().blocks[0].attn.post_norm is None


# ---------------------------------------------------------------------------------------------- Spike No More
def embedding_output(m: Llama) -> torch.Tensor:
    return m.embed(torch.arange(512))


def test_small_init_stds():
    d, n_layers = 64, 2
    m = model(init="small")
    std = math.sqrt(2 / (5 * d))
    assert m.blocks[0].attn.q.weight.std().item() == pytest.approx(std, rel=0.05)
    assert m.blocks[0].mlp.down.weight.std().item() == pytest.approx(std / math.sqrt(2 * n_layers), rel=0.05)
    assert model().blocks[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_scaled_embedding_output_std_at_init():
    """Spike No More: embed x sqrt(d) with init std sqrt(2/(5d)) gives std sqrt(2/5) ~ 0.63 (the paper's own
    figure for "close to 1"), against sqrt(2/(5d)) ~ 0.08 for plain embeddings of the same init."""
    scaled = embedding_output(model(init="small", embed="scaled")).std().item()
    assert scaled == pytest.approx(math.sqrt(2 / 5), rel=0.03)
    plain = embedding_output(model(init="small", embed="plain")).std().item()
    assert plain == pytest.approx(math.sqrt(2 / (5 * 64)), rel=0.03)
    ln = embedding_output(model(init="small", embed="layernorm")).std(dim=-1, unbiased=False)
    torch.testing.assert_close(ln, torch.ones_like(ln), atol=5e-3, rtol=0)  # eps 1e-5 vs variance 0.006


# ---------------------------------------------------------------------------------------------- z-loss
def test_z_loss_adds_exactly_coef_times_mean_log_z_squared():
    logits = torch.randn(2, 8, 512) * 5
    targets = torch.randint(0, 512, (2, 8))
    total, ce, log_z = next_token_loss(logits, targets, z_loss=1e-4)
    lz = torch.logsumexp(logits.view(-1, 512), dim=-1)
    assert torch.equal(ce, F.cross_entropy(logits.view(-1, 512), targets.view(-1)))
    torch.testing.assert_close(total, ce + 1e-4 * (lz**2).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(log_z, lz.mean())
    plain_total, plain_ce, _ = next_token_loss(logits, targets)
    assert torch.equal(plain_total, plain_ce)


# ---------------------------------------------------------------------------------------------- combinations
GRID = [
    {"model.attn_norm": "qk_norm", "model.attn_softcap": 50.0},
    {"model.attn_norm": "qkv_norm", "model.logit_softcap": 30.0, "model.embed": "scaled", "model.init": "small"},
    {"model.attn_norm": "qk_norm", "model.post_proj_norm": True, "model.post_fc2_norm": True, "model.z_loss": 1e-4},
    {"model.attn_norm": "none", "model.embed": "layernorm", "model.init": "small", "model.attn_softcap": 50.0,
     "model.logit_softcap": 30.0},
    {"model.attn_norm": "qkv_norm", "model.post_fc2_norm": True, "model.attn_softcap": 20.0, "model.z_loss": 1e-4},
    {"model.attn_norm": "qk_norm", "model.post_proj_norm": True, "model.embed": "scaled", "model.init": "small",
     "model.logit_softcap": 30.0},
]


@pytest.mark.parametrize("variant", GRID, ids=lambda v: ",".join(f"{k[6:]}={x}" for k, x in v.items()))
def test_variant_grid_trains(tiny_cfg, variant):
    result = train(tiny_cfg(name="grid", **variant, **{"trainer.max_steps": 3, "trainer.val_every": 3}), quiet=True)
    assert result.status == "finished" and result.step == 3
    assert math.isfinite(result.metrics["val/loss"])


# ---------------------------------------------------------------------------------------------- divergence
def test_huge_learning_rate_ends_as_diverged(tiny_cfg):
    cfg = tiny_cfg(name="blowup", **{"optim.lr": 50.0, "optim.warmup_fraction": 0.0, "optim.grad_clip": 0.0,
                                     "trainer.max_steps": 20, "trainer.val_every": 20})
    result = train(cfg, quiet=True)
    assert result.status == "diverged", result
    assert result.step < 20
    run = MlflowClient(tracking.tracking_uri(cfg.tracking)).get_run(result.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["status"] == "diverged"
