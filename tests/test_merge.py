"""Merging PC/TSVD models into plain dense checkpoints, and the Hugging Face Llama export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pc_lightning.config import ModelConfig, PCConfig
from pc_lightning.merge import hf_incompatibility, merge_model, relative_difference
from pc_lightning.model import Llama, count_parameters
from pc_lightning.modules.pretrain import PretrainModule

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=96, max_seq_len=64)


def perturbed(model: Llama) -> Llama:
    """Move every parameter off its init (γ ≠ 1, σ̂ ≠ 1), so the merge has something to get wrong."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


@pytest.mark.parametrize("linear", ["pc", "tsvd"])
def test_merged_model_matches_and_loads_strictly_into_dense(linear):
    torch.manual_seed(0)
    model = perturbed(Llama(ModelConfig(**TINY, linear=linear, pc=PCConfig(level=4))))
    dense = merge_model(model)
    idx = torch.randint(0, TINY["vocab_size"], (3, 40))
    with torch.no_grad():
        assert relative_difference(dense(idx), model(idx)) <= 1e-5
    plain = Llama(ModelConfig(**TINY, linear="dense"))
    plain.load_state_dict(dense.state_dict(), strict=True)
    assert count_parameters(dense) == count_parameters(plain)


def test_hf_export_is_skipped_with_a_reason_when_the_architecture_does_not_map():
    assert hf_incompatibility(ModelConfig(**TINY)) is None
    reason = hf_incompatibility(ModelConfig(**TINY, attn_norm="qk_norm", logit_softcap=30.0))
    assert "attn_norm=qk_norm" in reason and "soft-capping" in reason
    for scope in ("head", "full"):  # LlamaForCausalLM has q/k/v norms of neither scope
        for attn_norm in ("qk_norm", "qkv_norm"):
            reason = hf_incompatibility(ModelConfig(**TINY, attn_norm=attn_norm, qk_norm_scope=scope))
            assert reason is not None and f"attn_norm={attn_norm}" in reason


def test_merge_keeps_per_head_qk_norms():
    """A PC model with per-head qkv norms merges into the dense model of the same config (same norm shapes)."""
    torch.manual_seed(0)
    variant = dict(attn_norm="qkv_norm", qk_norm_scope="head")
    model = perturbed(Llama(ModelConfig(**TINY, linear="pc", pc=PCConfig(level=2), **variant)))
    dense = merge_model(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        assert relative_difference(dense(idx), model(idx)) <= 1e-5
    Llama(ModelConfig(**TINY, **variant)).load_state_dict(dense.state_dict(), strict=True)


def test_pcl_merge_and_merge_on_end(tiny_cfg, monkeypatch):
    from mlflow.tracking import MlflowClient
    from transformers import LlamaForCausalLM

    from pc_lightning import tracking
    from pc_lightning.cli import main
    from pc_lightning.train import train

    cfg = tiny_cfg(**{"model.linear": "pc", "model.pc.merge_on_end": True, "name": "pc-merge"})
    result = train(cfg, quiet=True)
    assert result.status == "finished"
    ckpt_dir = Path(result.checkpoint_dir)
    # merge_on_end: the callback merged at the end of training and tagged the MLflow run
    tag = MlflowClient(tracking.tracking_uri(cfg.tracking)).get_run(result.run_id).data.tags["pcl.merged_dir"]
    assert Path(tag) == (ckpt_dir / "merged").resolve() and (Path(tag) / "merged.ckpt").exists()

    out = ckpt_dir / "cli-merged"
    assert main(["merge", str(ckpt_dir / "last.ckpt"), "--out", str(out)]) == 0
    original = PretrainModule.load_from_checkpoint(ckpt_dir / "last.ckpt", map_location="cpu").eval()

    monkeypatch.setitem(sys.modules, "pc_lightning.layers.pc_linear", None)  # any PC import now fails
    merged = PretrainModule.load_from_checkpoint(out / "merged.ckpt", map_location="cpu").eval()
    assert merged.cfg.model.linear == "dense"
    dense_reference = Llama(ModelConfig(**{**vars(original.cfg.model), "linear": "dense"}))
    assert count_parameters(merged.model) == count_parameters(dense_reference)

    idx = torch.randint(0, cfg.model.vocab_size, (2, 32))
    with torch.no_grad():
        logits = merged(idx)
        assert relative_difference(logits, original(idx)) <= 1e-5
        hf = LlamaForCausalLM.from_pretrained(out / "hf").float().eval()
        assert relative_difference(hf(input_ids=idx).logits, logits) <= 1e-4
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "model.safetensors").exists()
