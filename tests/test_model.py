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
    assert 130e6 < expected_parameters(preset("124m")) < 140e6  # DESIGN.md section 8: ~134M


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
