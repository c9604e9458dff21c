"""Merge a PC or TSVD checkpoint into a plain dense Llama checkpoint, and export it to Hugging Face format.

Every block matrix built by ``make_linear`` reports the dense (out, in) matrix it applies through
``effective_weight()``: for a PC layer W_plain = γ·σ̂·g(W/σ̂) (Wang et al., arXiv 2606.06470; docs/pc.md), for a TSVD layer U·diag(s)·Vᵀ. Computed once in fp32, these go into a ``model.linear: dense``
model of the same architecture, loaded with strict state-dict checks, and the merged model's logits are
checked against the original's on a random batch (max |Δ| / max |logits| ≤ 1e-5, fp32).

Outputs under ``out_dir`` (default ``<checkpoint dir>/merged``):

* ``merged.ckpt``: a Lightning-format checkpoint of a dense :class:`PretrainModule`
  (``PretrainModule.load_from_checkpoint`` needs no PC/TSVD code), with the same parameter count as the dense
  model;
* ``hf/``: ``config.json`` + ``model.safetensors`` for ``transformers.LlamaForCausalLM``, when the architecture
  maps onto it (no q/k/v norms, no post-projection norms, no soft-caps, plain embeddings); otherwise
  :func:`hf_incompatibility` says why it is skipped.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import lightning as L
import torch

from pc_lightning.checkpoint_file import open_checkpoint
from pc_lightning.config import ModelConfig
from pc_lightning.layers import iter_layers
from pc_lightning.model import Llama
from pc_lightning.modules.pretrain import PretrainModule

log = logging.getLogger(__name__)

MERGE_TOLERANCE = 1e-5  # max relative logit difference, merged vs original, fp32
HF_TOLERANCE = 1e-4  # max relative logit difference, HF export vs merged, fp32


@torch.no_grad()
def merged_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's state dict with each block linear replaced by ``<name>.weight`` = its effective weight."""
    layers = iter_layers(model)
    prefixes = tuple(f"{name}." for name, _ in layers)
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, layer in layers:
        state[f"{name}.weight"] = layer.effective_weight().detach().float().clone()
    return state


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def probe_batch(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=gen)


def merge_model(model: Llama) -> Llama:
    """A dense Llama computing the same function (fp32), checked on a random batch."""
    model = model.float().eval()
    dense_cfg = copy.deepcopy(model.cfg)
    dense_cfg.linear = "dense"
    dense = Llama(dense_cfg)
    dense.load_state_dict(merged_state_dict(model), strict=True)
    dense.eval()
    idx = probe_batch(dense_cfg)
    with torch.no_grad():
        diff = relative_difference(dense(idx), model(idx))
    if diff > MERGE_TOLERANCE:
        raise RuntimeError(f"merged logits differ from the original's by {diff:.2e} (> {MERGE_TOLERANCE:.0e})")
    return dense


def hf_incompatibility(cfg: ModelConfig) -> str | None:
    """Why the model does not map onto transformers' LlamaForCausalLM, or None when it does."""
    reasons = []
    if cfg.attn_norm != "none":
        reasons.append(f"attn_norm={cfg.attn_norm}")
    if cfg.post_proj_norm or cfg.post_fc2_norm:
        reasons.append("post-projection norms")
    if cfg.attn_softcap > 0 or cfg.logit_softcap > 0:
        reasons.append("soft-capping")
    if cfg.embed != "plain":
        reasons.append(f"embed={cfg.embed}")
    return ", ".join(reasons) + " (LlamaForCausalLM has no such option)" if reasons else None


def hf_state_dict(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Our parameter names -> LlamaForCausalLM's."""
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "mlp_norm.weight"]
        for proj in ("q", "k", "v", "o"):
            out[theirs + f"self_attn.{proj}_proj.weight"] = state[ours + f"attn.{proj}.weight"]
        for proj in ("gate", "up", "down"):
            out[theirs + f"mlp.{proj}_proj.weight"] = state[ours + f"mlp.{proj}.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def export_hf(dense: Llama, out_dir: Path) -> Path:
    """Write config.json + model.safetensors; check LlamaForCausalLM's logits against ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dense.cfg
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    hf.load_state_dict(hf_state_dict(dense.state_dict(), cfg.n_layers), strict=True)
    idx = probe_batch(cfg)
    with torch.no_grad():
        diff = relative_difference(hf(input_ids=idx, use_cache=False).logits, dense(idx))
    if diff > HF_TOLERANCE:
        raise RuntimeError(f"Hugging Face export's logits differ by {diff:.2e} (> {HF_TOLERANCE:.0e})")
    hf.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def merge_module(module: PretrainModule, out_dir: str | Path, hf_export: bool = True,
                 source: str = "") -> Path:
    """Write ``out_dir/merged.ckpt`` (+ ``out_dir/hf/``) for a trained module; the module is left unchanged."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense_model = merge_model(copy.deepcopy(module.model).cpu())

    config = copy.deepcopy(dict(module.hparams["config"]))
    config["model"] = {**config["model"], "linear": "dense", "vocab_size": module.cfg.model.vocab_size}
    dense_module = PretrainModule(config, total_steps=module.total_steps)
    dense_module.model.load_state_dict(dense_model.state_dict(), strict=True)
    checkpoint = {
        "state_dict": dense_module.state_dict(),
        "hyper_parameters": {"config": config, "total_steps": module.total_steps},
        "pytorch-lightning_version": L.__version__,
        "initial_loss": module.initial_loss,
        "merged_from": source,
    }
    torch.save(checkpoint, out / "merged.ckpt")

    if hf_export:
        reason = hf_incompatibility(dense_module.cfg.model)
        if reason is None and importlib.util.find_spec("transformers") is None:
            reason = "transformers is not installed (pip install -e '.[hf]')"
        if reason is None:
            export_hf(dense_model, out / "hf")
            log.info("Hugging Face export written to %s", out / "hf")
        else:
            log.warning("Hugging Face export skipped: %s", reason)
            (out / "HF_EXPORT_SKIPPED.txt").write_text(f"Hugging Face export skipped: {reason}\n")
    return out


def merge_checkpoint(ckpt_path: str | Path, out_dir: str | Path | None = None, hf_export: bool = True) -> Path:
    """PC/TSVD (or dense) training checkpoint -> ``out_dir/merged.ckpt`` (+ ``out_dir/hf/``); returns out_dir.

    ``out_dir`` defaults to ``<checkpoint dir>/merged``. A missing, truncated or foreign file raises
    :class:`~pc_lightning.checkpoint_file.CheckpointError`.
    """
    ckpt_path = Path(ckpt_path)
    open_checkpoint(ckpt_path, required=("state_dict", "hyper_parameters"))  # a bad file: one CheckpointError naming it
    module = PretrainModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    out = Path(out_dir) if out_dir is not None else ckpt_path.parent / "merged"
    return merge_module(module, out, hf_export=hf_export, source=str(ckpt_path.resolve()))
