"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers` (or loaded from a tokenizer.json).

Byte-level pre-tokenisation (GPT-2 style) means every string encodes without unknown tokens. One special
token, ``<|endoftext|>``, separates documents in the packed stream.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(batches, trainer=trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    tok = Tokenizer.from_file(path)
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([EOT])
    return tok
