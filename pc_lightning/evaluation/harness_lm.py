"""The suite's model as an ``lm_eval.api.model.LM``: lm-evaluation-harness tasks scored by our own forward.

The harness (Gao et al., EleutherAI, https://github.com/EleutherAI/lm-evaluation-harness) turns each task into
requests of three kinds; this adapter answers them with a :class:`~pc_lightning.model.Llama` (any linear kind:
dense, PC, TSVD, merged or not) and the run's byte-level BPE tokenizer, so the task definitions and metrics are
the harness's own:

* ``loglikelihood(context, continuation)``: log p(continuation | context) = Σ_i log softmax(logits)[cont_i]
  over the continuation's tokens, and whether each of them is the argmax (``is_greedy``). Context and
  continuation are tokenized separately (whitespace at the end of the context moves to the continuation, the
  harness's convention), an empty context becomes ``<|endoftext|>``, and a context too long for the model's
  ``max_seq_len`` is truncated on the left.
* ``loglikelihood_rolling(text)``: the text's whole log-likelihood, in disjoint windows of ``max_seq_len``
  tokens after an ``<|endoftext|>`` prefix (the harness's ``get_rolling_token_windows``).
* ``generate_until(context, {until, max_gen_toks})``: greedy decoding, one request at a time without a KV cache,
  until a stop string, ``<|endoftext|>`` or ``max_gen_toks`` tokens; sampling (``do_sample: true``) is refused.

Requests are scored in batches of ``batch_size`` sequences sorted by length (right padding: the model is causal,
so padding never changes the positions scored), in the model's dtype unless ``forward_context`` sets an autocast;
log-softmax of the scored positions in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from torch import nn

from pc_lightning.data.tokenizer import EOT

DEFAULT_MAX_GEN_TOKS = 256


class SuiteLM(LM):
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 16,
                 forward_context: Callable[[], ContextManager] | None = None):
        super().__init__()
        vocab = tokenizer.get_vocab_size()
        if vocab != model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} tokens but the model's vocabulary is {model.cfg.vocab_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = model.cfg.max_seq_len
        self.eot_token_id = tokenizer.token_to_id(EOT)
        self.forward_context = forward_context or contextlib.nullcontext
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens); trailing whitespace of the context joins the continuation."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        return self.tok_encode(context) or [self.eot_token_id], self.tok_encode(continuation)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _logits(self, inputs: list[list[int]]) -> torch.Tensor:
        """Logits (B, T, V) for the inputs, right-padded to the longest."""
        width = max(len(x) for x in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        with self.forward_context():
            return self.model(batch.to(self._device))

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(Σ log p(continuation tokens), all of them greedy) for (context, continuation) token lists.

        The context is truncated on the left so that context + continuation fits ``max_seq_len + 1`` tokens
        (the last token is only predicted, never fed in).
        """
        inputs, n_cont = [], []
        for ctx, cont in pairs:
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context of "
                                 f"{self.max_length} tokens (model.max_seq_len)")
            if not ctx:
                raise ValueError("a context needs at least one token (use <|endoftext|> for an empty one)")
            seq = (ctx + cont)[-(self.max_length + 1):]
            inputs.append(seq[:-1])
            n_cont.append(len(cont))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            logits = self._logits([inputs[i] for i in rows])
            for b, i in enumerate(rows):
                n, length = n_cont[i], len(inputs[i])
                if n == 0:
                    results[i] = (0.0, True)
                    continue
                target = torch.tensor(pairs[i][1], device=logits.device)
                # the positions that predict the continuation's tokens, normalised in fp32
                row = F.log_softmax(logits[b, length - n : length].float(), dim=-1)
                total = row.gather(-1, target[:, None]).sum()
                results[i] = (float(total), bool((row.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ the harness's three request kinds
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = self.score([self.encode_pair(*req.args) for req in requests])
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for pair in get_rolling_token_windows(tokens, prefix_token=self.eot_token_id,
                                                  max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(pair))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self.score(windows)):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample", False):
                raise ValueError("pc-lightning's harness adapter decodes greedily only; this task asks for sampling "
                                 f"(generation_kwargs {gen_kwargs})")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            ids = self.tok_encode(context) or [self.eot_token_id]
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                token = int(self._logits([(ids + generated)[-self.max_length:]])[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs
