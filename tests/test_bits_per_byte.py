"""val/bpb: bits per byte of the validation windows, exact for the byte-level BPE (partial UTF-8 tokens too)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pc_lightning.config import to_dict
from pc_lightning.data.datamodule import FixedWindows, PretrainDataModule
from pc_lightning.data.prepare import prepare
from pc_lightning.data.tokenizer import EOT, load_tokenizer, token_byte_lengths, train_bpe
from pc_lightning.modules.pretrain import PretrainModule

MULTILINGUAL = [
    "naïve café, déjà vu — Œuvre complète",
    "日本語のテキストと漢字の混ざった文章です。東京、京都、大阪。",
    "Ελληνικά γράμματα και λέξεις, Русский текст и слова",
    "emoji 🙂🙃 and symbols ∑∫√ ≤ ≥ € £ ¥",
    "plain ASCII text about the river and the hills",
]


def test_token_byte_lengths_add_up_to_utf8_bytes(tiny_cfg):
    """Σ bytes over a text's tokens = its UTF-8 length, also for tokens that are part of a character."""
    multilingual = train_bpe([MULTILINGUAL * 20], 300)
    bible = load_tokenizer(str(prepare(tiny_cfg().data).tokenizer_path))
    for tok in (multilingual, bible):
        lengths = token_byte_lengths(tok)
        assert lengths.shape == (tok.get_vocab_size(),) and lengths[tok.token_to_id(EOT)] == 0
        for text in MULTILINGUAL:
            ids = tok.encode(text).ids
            assert lengths[ids].sum() == len(text.encode("utf-8")), text
    # the case that decoded strings would get wrong: a token holding only part of a multi-byte character
    partial = [i for i in range(multilingual.get_vocab_size()) if "\ufffd" in multilingual.decode([i])]
    assert partial and all(token_byte_lengths(multilingual)[i] >= 1 for i in partial)
    assert any(len(multilingual.decode([i]).encode()) != token_byte_lengths(multilingual)[i] for i in partial)


def test_val_bpb_matches_direct_computation(tiny_cfg):
    """The logged val/bpb equals Σ CE (nats) / (ln 2 · UTF-8 bytes of the targets' decoded text)."""
    cfg = tiny_cfg()
    prepared = prepare(cfg.data)
    tok = load_tokenizer(str(prepared.tokenizer_path))
    cfg.model.vocab_size = prepared.vocab_size
    torch.manual_seed(0)
    module = PretrainModule(to_dict(cfg), total_steps=1)
    datamodule = PretrainDataModule(cfg.data, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    logged = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    windows = FixedWindows(prepared.tokens("val"), cfg.data.seq_len, cfg.data.val_batches * cfg.data.batch_size)
    nats, n_bytes = 0.0, 0
    eot = tok.token_to_id(EOT)
    with torch.no_grad():
        for i in range(len(windows)):
            w = windows[i]
            logp = F.log_softmax(module.model(w[None, :-1]).double(), dim=-1)[0]
            nats -= float(logp.gather(-1, w[1:, None]).sum())
            targets = w[1:].tolist()
            text = "".join(tok.decode(run) for run in np.split(np.array(targets), np.where(np.array(targets) == eot)[0])
                           if len(run))
            assert "\ufffd" not in text  # whole characters only: the decoded text's bytes are the targets' bytes
            n_bytes += len(text.encode("utf-8"))
    expected = nats / (math.log(2) * n_bytes)
    assert logged["val/bpb"] == pytest.approx(expected, rel=1e-5)
    assert logged["val/loss"] == pytest.approx(nats / (len(windows) * cfg.data.seq_len), rel=1e-5)
    # bits per byte = bits per token / bytes per token
    assert logged["val/bpb"] == pytest.approx(
        logged["val/loss"] / math.log(2) * len(windows) * cfg.data.seq_len / n_bytes, rel=1e-5)
