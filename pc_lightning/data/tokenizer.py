"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers` (or loaded from a tokenizer.json).

Byte-level pre-tokenisation (GPT-2 style) means every string encodes without unknown tokens. One special
token, ``<|endoftext|>``, separates documents in the packed stream.

Each token of a byte-level BPE stands for a fixed byte string (possibly part of a multi-byte UTF-8 character):
:func:`token_byte_lengths` gives its length, the denominator of bits per byte (``val/bpb``).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
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


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted: the printable character a byte-level BPE writes for each byte.

    Printable Latin-1 bytes (33..126, 161..172, 174..255) stand for themselves; the other 68 bytes (controls,
    space, 127..160, 173) are written as chr(256 + n) for the n-th of them in byte order.
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in set(printable)]
    chars = {chr(b): b for b in printable}
    chars.update({chr(256 + n): b for n, b in enumerate(others)})
    return chars


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """Number of UTF-8 bytes of text each token id stands for (int64, one entry per id); special tokens 0.

    For a byte-level BPE (this suite's, GPT-2's) each vocabulary entry is a string over the byte alphabet of
    :func:`byte_level_alphabet`, one character per byte. A tokenizer of another kind falls back to the UTF-8
    length of the token decoded on its own (exact when its tokens are whole characters).
    """
    alphabet = byte_level_alphabet()
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    for piece, i in tok.get_vocab().items():
        if piece in special:
            continue
        if byte_level and all(c in alphabet for c in piece):
            lengths[i] = len(piece)
        else:
            lengths[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths
