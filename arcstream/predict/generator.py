"""What the predictions job asks of a model: greedy answers, and answer likelihoods.

The job talks to a `Generator`, never to the model directly, so a test can
swap in a stub (an oracle that emits the true answer, a model emitting
garbage) and exercise decoding, inversion and voting without weights.
`ModelGenerator` is the real one: arcstream's jitted KV-cache greedy decoding
(`arcstream.model.generate`) and a jitted forward pass for re-scoring.

Contract:
  - `generate(prompts, shapes=None)` returns one `Generation` per prompt, in
    order; the text is what follows the answer prefix, cut before the stop
    token. With `shapes` (one `arcstream.predict.shape.ShapePrediction` per
    prompt) every answer is decoded under its shape's token template (see
    shape.py); a generator that cannot honour one returns a Generation with
    `failure` set (a `FAILURE_REASONS` code of the job).
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcstream.data.records import EncodedPrompt
from arcstream.data.task import NUM_COLOURS
from arcstream.data.tokenizer import stop_token_ids
from arcstream.model import forward, generate
from arcstream.predict import shape as sh


@dataclasses.dataclass(frozen=True)
class Generation:
    """One greedy answer: the text before the stop token, and how it ended."""

    text: str
    stopped: bool  # a stop token was emitted within the token budget
    logprob: float  # summed log p of the generated tokens (the stop token included)
    num_tokens: int  # tokens generated, the stop token included
    shape_source: str = ""  # with shape constraints: where the shape came from (shape.SHAPE_SOURCES)
    failure: str = ""  # a failure code when no answer could be decoded under the constraint


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: Sequence[EncodedPrompt], shapes: Sequence[Any] | None = None) -> list[Generation]: ...

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

    def generate(self, prompts: Sequence[EncodedPrompt], shapes: Sequence[Any] | None = None) -> list[Generation]:
        if shapes is None:
            return self._greedy(prompts, [None] * len(prompts), self.max_new_tokens)
        if len(shapes) != len(prompts):
            raise ValueError(f"generate: {len(shapes)} shapes for {len(prompts)} prompts")
        out: list[Generation | None] = [None] * len(prompts)
        shape_of = [s.shape for s in shapes]
        # The model writes the header where no rule gave a shape: a short free decode, then the template.
        ask = [i for i, s in enumerate(shapes) if s.source == "header"]
        if ask:
            heads = self._greedy([prompts[i] for i in ask], [None] * len(ask), sh.HEADER_TOKENS)
            for i, g in zip(ask, heads):
                shape_of[i] = sh.parse_header(g.text + "\n" if g.stopped else g.text)
                if shape_of[i] is None:
                    out[i] = dataclasses.replace(g, stopped=False, shape_source="header", failure="bad_shape_header")
        templates: list[np.ndarray | None] = [None] * len(prompts)
        for i, (p, s) in enumerate(zip(prompts, shape_of)):
            if out[i] is not None or s is None:
                continue
            t = sh.answer_template(self.tokenizer, s, str(p.metadata.get("encoder", "plain")), self.stop_ids[0])
            if len(t) > self.max_new_tokens:
                out[i] = Generation("", False, 0.0, 0, shapes[i].source, "too_long")
            else:
                templates[i] = t
        todo = [i for i in range(len(prompts)) if out[i] is None]
        for i, g in zip(todo, self._greedy([prompts[i] for i in todo], [templates[i] for i in todo],
                                           self.max_new_tokens)):
            out[i] = dataclasses.replace(g, shape_source=shapes[i].source)
        return out  # type: ignore[return-value]

    def _greedy(self, prompts: Sequence[EncodedPrompt], templates: Sequence[np.ndarray | None],
                max_new: int) -> list[Generation]:
        """Greedy answers in batches of similar lengths; row i follows templates[i] (None = free)."""
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
            allowed = np.full((self.batch_size, max_new, NUM_COLOURS), -1, np.int32)
            for r, i in enumerate(idx):
                t = templates[i]
                if t is not None:
                    allowed[r, :len(t)] = t[:max_new]
            res = generate(self.model, rows, max_new_tokens=max_new, eos_id=self.stop_ids,
                           pad_id=self.pad_id, pad_to_multiple=self.pad_to_multiple, allowed=allowed)
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
        """Summed answer log-likelihoods, without materialising [B, T, V] logits.

        The forward stops at the last block (no LM head over the whole prompt);
        the LM head runs only at the positions that predict an answer token
        ([B, A, V], A = the longest answer in the batch, rounded up), which for
        a 150k vocabulary and 4k-token prompts is the difference between a few
        hundred MB and tens of GB.
        """
        out = [0.0] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        b = self.batch_size
        site = f"blocks.{self.model.config.num_layers - 1}.hook_resid_post"
        for b0 in range(0, len(order), b):
            idx = order[b0:b0 + b]
            answers = []
            for i in idx:
                p = prompts[i]
                pos = np.flatnonzero(p.answer_mask)
                if p.answer_start == 0 or pos.size == 0 or pos[0] == 0:
                    raise ValueError(f"task {p.task_id} test {p.test_index}: the prompt has no answer tokens after "
                                     "a prefix; build scoring prompts with PromptConfig(include_answer=True) and a "
                                     "test output")
                answers.append(pos)
            t = _round_up(max(len(prompts[i]) for i in idx), self.pad_to_multiple)
            a = _round_up(max(x.size for x in answers), self.pad_to_multiple)
            tokens_bt = np.full((b, t), self.pad_id, np.int32)
            seg_bt = np.zeros((b, t), np.int32)
            pos_bt = np.zeros((b, t), np.int32)
            gather_ba = np.zeros((b, a), np.int32)  # the position whose output predicts the answer token
            target_ba = np.zeros((b, a), np.int32)
            valid_ba = np.zeros((b, a), bool)
            for r, (i, ans) in enumerate(zip(idx, answers)):
                p = prompts[i]
                n = len(p)
                tokens_bt[r, :n] = p.token_ids
                seg_bt[r, :n] = 1
                pos_bt[r, :n] = np.arange(n)
                gather_ba[r, :ans.size] = ans - 1
                target_ba[r, :ans.size] = p.token_ids[ans]
                valid_ba[r, :ans.size] = True
            lp_ba = np.asarray(_answer_logprobs(self.model, jnp.asarray(tokens_bt), jnp.asarray(seg_bt),
                                                jnp.asarray(pos_bt), jnp.asarray(gather_ba), jnp.asarray(target_ba),
                                                site=site))
            for r, i in enumerate(idx):
                out[i] = float(lp_ba[r][valid_ba[r]].sum(dtype=np.float64))
        return out


def _answer_logprobs_impl(model: Any, tokens_bt: Any, seg_bt: Any, pos_bt: Any, gather_ba: Any, target_ba: Any,
                          *, site: str) -> Any:
    """log p(target_ba | prefix) at positions gather_ba: [B, A] float32."""
    import jax.numpy as jnp

    h_btd = forward(model, tokens_bt, seg_bt, pos_bt, sites=(site,), return_logits=False).captures[site]
    h_bad = jnp.take_along_axis(h_btd, gather_ba[:, :, None], axis=1)
    logp_bav = jax.nn.log_softmax(model.logits(h_bad).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_bav, target_ba[:, :, None], axis=-1)[..., 0]


_answer_logprobs = nnx.jit(_answer_logprobs_impl, static_argnames=("site",))
