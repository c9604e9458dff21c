"""The Llama model: causal, shapes and parameter counts per preset, overfits one batch."""

from __future__ import annotations

import os

import pytest
import torch

from pc_lightning.config import ModelConfig, from_dict, load_yaml_with_defaults
from pc_lightning.model import Llama, count_parameters

ROOT = os.path.dirname(os.path.dirname(__file__))


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def expected_parameters(cfg: ModelConfig) -> int:
    d, f, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    block = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two RMSNorm gains
    return 2 * V * d + L * block + d  # embedding, LM head, blocks, final norm


def test_causal():
    torch.manual_seed(0)
    model = Llama(small()).eval()
    idx = torch.randint(0, 97, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def preset(name: str) -> ModelConfig:
    cfg = from_dict(load_yaml_with_defaults(os.path.join(ROOT, "conf", "model", f"{name}.yaml"))).model
    cfg.vocab_size = 32000
    return cfg


@pytest.mark.parametrize("name", ["tiny", "124m", "350m", "1b"])
def test_presets_parameter_count_and_shapes(name):
    mcfg = preset(name)
    assert mcfg.name == name
    with torch.device("meta"):
        model = Llama(mcfg)
    assert count_parameters(model) == expected_parameters(mcfg)
    idx = torch.zeros(2, 8, dtype=torch.long, device="meta")
    assert model(idx).shape == (2, 8, 32000)


def test_124m_preset_matches_reference_size():
    assert 130e6 < expected_parameters(preset("124m")) < 140e6  # the ~134M GPU preset


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Llama(small())
    batch = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_out_projection_init_is_scaled():
    torch.manual_seed(0)
    cfg = small(d_model=256, n_layers=8, d_ff=512)
    model = Llama(cfg)
    q_std = model.blocks[0].attn.q.weight.std().item()
    o_std = model.blocks[0].attn.o.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4.0, rel=0.05)  # / sqrt(2 * 8)


def test_torchtitan_init_stds_per_matrix_and_layer():
    """init: torchtitan draws q, k, v, gate at 0.02 and o, up, down at 0.02 / sqrt(2 (l + 1)) in block l
    (0-based), the embedding from N(0, 1) and the head at std d^-1/2 cut at 3 std (torchtitan's Llama
    init_weights, which the PC reference trains from); norms start at gain 1."""
    torch.manual_seed(0)
    cfg = small(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, d_ff=512, init="torchtitan")
    model = Llama(cfg)
    for layer, block in enumerate(model.blocks):
        deep = 0.02 / (2 * (layer + 1)) ** 0.5
        want = {"q": 0.02, "k": 0.02, "v": 0.02, "gate": 0.02, "o": deep, "up": deep, "down": deep}
        for matrix in (block.attn.q, block.attn.k, block.attn.v, block.attn.o, block.mlp.gate, block.mlp.up,
                       block.mlp.down):
            w = matrix.weight
            assert w.std().item() == pytest.approx(want[matrix.role], rel=0.02), (layer, matrix.role)
            assert abs(w.mean().item()) < 0.05 * want[matrix.role]
        assert torch.equal(block.attn_norm.weight, torch.ones(256)) and torch.equal(block.mlp_norm.weight,
                                                                                    torch.ones(256))
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.02)
    head, head_std = model.lm_head.weight, 256 ** -0.5
    assert head.abs().max().item() <= 3 * head_std
    # a normal cut at +-3 std has std 0.9866 of the uncut one
    assert head.std().item() == pytest.approx(0.9866 * head_std, rel=0.02)


@pytest.mark.parametrize("linear", ["pc", "tsvd"])
def test_torchtitan_init_gives_pc_and_tsvd_layers_the_same_stds(linear, monkeypatch):
    """Every linear kind receives its matrix's std through init_weights(std)."""
    from pc_lightning.config import PCConfig
    from pc_lightning.layers.pc_linear import PCLinear
    from pc_lightning.layers.tsvd_linear import TSVDLinear

    kind = {"pc": PCLinear, "tsvd": TSVDLinear}[linear]
    seen = {}
    original = kind.init_weights

    def record(self, std):
        seen[id(self)] = std
        original(self, std)

    monkeypatch.setattr(kind, "init_weights", record)
    cfg = small(n_layers=3, init="torchtitan", linear=linear,
                pc=PCConfig(level=4, targets=["ffn", "attn_out", "qk", "v"]))
    model = Llama(cfg)
    for layer, block in enumerate(model.blocks):
        deep = 0.02 / (2 * (layer + 1)) ** 0.5
        for matrix in (block.attn.q, block.attn.k, block.attn.v, block.attn.o, block.mlp.gate, block.mlp.up,
                       block.mlp.down):
            assert isinstance(matrix, kind)
            want = deep if matrix.role in ("o", "up", "down") else 0.02
            assert seen[id(matrix)] == pytest.approx(want), (layer, matrix.role)


@pytest.mark.parametrize("attn_norm,norms", [("qk_norm", 2), ("qkv_norm", 3)])
def test_attention_norm_parameters_per_scope(attn_norm, norms):
    """A LayerNorm (gain and bias) per normalised projection and block: over head_dim, shared by the heads, with
    qk_norm_scope head; over d with full. qkv_norm also drops the pre-attention RMSNorm (d gains)."""
    base = small(d_model=32, n_heads=4)
    head_dim = 32 // 4
    for scope, width in (("head", head_dim), ("full", 32)):
        cfg = small(d_model=32, n_heads=4, attn_norm=attn_norm, qk_norm_scope=scope)
        extra = norms * 2 * width - (32 if attn_norm == "qkv_norm" else 0)
        assert count_parameters(Llama(cfg)) == expected_parameters(base) + cfg.n_layers * extra, scope
