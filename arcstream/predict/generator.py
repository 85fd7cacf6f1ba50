"""What the predictions job asks of a model: greedy answers, and answer likelihoods.

The job talks to a `Generator`, never to the model directly, so a test can
swap in a stub (an oracle that emits the true answer, a model emitting
garbage) and exercise decoding, inversion and voting without weights.
`ModelGenerator` is the real one: arcstream's jitted KV-cache greedy decoding
(`arcstream.model.generate`) and a jitted forward pass for re-scoring.

Contract:
  - `generate(prompts)` returns one `Generation` per prompt, in order; the
    text is what follows the answer prefix, cut before the stop token.
  - `score(prompts)` takes prompts built with the answer included
    (`PromptConfig(include_answer=True)`) and returns, per prompt, the summed
    log-probability of its answer tokens (`answer_mask`, the stop token
    included) given everything before them.
  - Both are deterministic functions of the prompt list: the job always sends
    the same list for the same chunk of tasks, so a resumed run computes what
    an uninterrupted one computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from arcstream.data.records import EncodedPrompt


@dataclasses.dataclass(frozen=True)
class Generation:
    """One greedy answer: the text before the stop token, and how it ended."""

    text: str
    stopped: bool  # a stop token was emitted within the token budget
    logprob: float  # summed log p of the generated tokens (the stop token included)
    num_tokens: int  # tokens generated, the stop token included


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: Sequence[EncodedPrompt]) -> list[Generation]: ...

    def score(self, prompts: Sequence[EncodedPrompt]) -> list[float]: ...


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class ModelGenerator:
    """A `Generator` over an arcstream `Decoder` and its tokenizer.

    batch_size: prompts per `generate` / forward call. Prompt lengths are
    rounded up to `pad_to_multiple` so that a job compiles a handful of shapes,
    not one per batch.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int, batch_size: int = 8,
                 pad_to_multiple: int = 64):
        from arcstream.data.tokenizer import stop_token_ids

        if max_new_tokens < 1 or batch_size < 1 or pad_to_multiple < 1:
            raise ValueError(f"ModelGenerator: max_new_tokens={max_new_tokens}, batch_size={batch_size}, "
                             f"pad_to_multiple={pad_to_multiple}; expected each >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.pad_to_multiple = int(pad_to_multiple)
        self.stop_ids = stop_token_ids(tokenizer)
        if not self.stop_ids:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos / end-of-turn token; "
                             "greedy answers could not stop")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])

    def generate(self, prompts: Sequence[EncodedPrompt]) -> list[Generation]:
        from arcstream.model import generate

        out: list[Generation | None] = [None] * len(prompts)
        stop = set(self.stop_ids)
        # Batches of similar lengths waste less on left padding; the order is a pure function of the
        # list (stable sort), so the same list always makes the same batches.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for b0 in range(0, len(order), self.batch_size):
            idx = order[b0:b0 + self.batch_size]
            rows = [np.asarray(prompts[i].token_ids, np.int32) for i in idx]
            # Pad the batch with copies of its first prompt so every call has batch_size rows (one compile).
            rows += [rows[0]] * (self.batch_size - len(rows))
            res = generate(self.model, rows, max_new_tokens=self.max_new_tokens, eos_id=self.stop_ids,
                           pad_id=self.pad_id, pad_to_multiple=self.pad_to_multiple)
            tokens_bn = np.asarray(res.tokens)
            lp_bn = np.asarray(res.logprobs)
            n_b = np.asarray(res.num_generated)
            for r, i in enumerate(idx):
                n = int(n_b[r])
                toks = tokens_bn[r, :n].tolist()
                stopped = n > 0 and toks[-1] in stop
                body = toks[:-1] if stopped else toks
                text = self.tokenizer.decode(body, skip_special_tokens=False)
                out[i] = Generation(text, bool(stopped), float(lp_bn[r, :n].sum()), n)
        return out  # type: ignore[return-value]

    def score(self, prompts: Sequence[EncodedPrompt]) -> list[float]:
        import jax.numpy as jnp

        from arcstream.model import forward_jit

        out = [0.0] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        b = self.batch_size
        for b0 in range(0, len(order), b):
            idx = order[b0:b0 + b]
            t = _round_up(max(len(prompts[i]) for i in idx), self.pad_to_multiple)
            tokens_bt = np.full((b, t), self.pad_id, np.int32)
            seg_bt = np.zeros((b, t), np.int32)
            pos_bt = np.zeros((b, t), np.int32)
            mask_bt = np.zeros((b, t), bool)
            for r, i in enumerate(idx):
                p = prompts[i]
                if p.answer_start == 0 or not p.answer_mask.any():
                    raise ValueError(f"task {p.task_id} test {p.test_index}: the prompt has no answer tokens after "
                                     "a prefix; build scoring prompts with PromptConfig(include_answer=True) and a "
                                     "test output")
                n = len(p)
                tokens_bt[r, :n] = p.token_ids
                seg_bt[r, :n] = 1
                pos_bt[r, :n] = np.arange(n)
                mask_bt[r, :n] = p.answer_mask
            logits_btv = forward_jit(self.model, jnp.asarray(tokens_bt), jnp.asarray(seg_bt), jnp.asarray(pos_bt),
                                     sites=(), return_logits=True).logits
            # lp_bt[:, j] = log p(token j | tokens < j); position 0 has no prediction (and is never an answer).
            lp_bt = np.asarray(_next_token_logprobs(logits_btv, jnp.asarray(tokens_bt)))
            for r, i in enumerate(idx):
                out[i] = float(lp_bt[r][mask_bt[r]].sum())
        return out


def _next_token_logprobs_impl(logits_btv: Any, tokens_bt: Any) -> Any:
    import jax
    import jax.numpy as jnp

    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp], axis=1)


def _next_token_logprobs(logits_btv: Any, tokens_bt: Any) -> Any:
    import jax

    global _NEXT_JIT
    if _NEXT_JIT is None:
        _NEXT_JIT = jax.jit(_next_token_logprobs_impl)
    return _NEXT_JIT(logits_btv, tokens_bt)


_NEXT_JIT: Any = None
