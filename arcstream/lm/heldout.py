"""Held-out next-token losses of the LM trainer: during training (`train.eval_every`) and in the final evaluation.

`held_out_loss` teacher-forces held-out prompts (identity augmentation, the training prompt format,
`eval_pipeline`) and averages the next-token loss by what the target is: the answer's cells, every answer
token, the cells of the train outputs inside the prompts. `token_nll` is the per-token loss both the
training step and this evaluation use.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from arcstream.data.pipeline import make_pipeline
from arcstream.data.records import GRID_TEST_OUTPUT, GRID_TRAIN_OUTPUT
from arcstream.lm.data import targets
from arcstream.model import forward

UNIFORM_CELL_NATS = math.log(10.0)  # the loss of a model that gives every colour the same probability


def token_nll(graphdef: Any, params: Any, tokens, seg, pos, tgt):
    """Per-token next-token cross-entropy [B, T] (float32) of `tgt` under the model (the training loss's terms)."""
    model = nnx.merge(graphdef, params)
    logits = forward(model, tokens, seg, pos, sites=(), return_logits=True).logits.astype(jnp.float32)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, tgt)


def make_nll_fn(graphdef: Any) -> Callable:
    """jitted (params, tokens, seg, pos, tgt) -> per-token NLL [B, T] of the next token (float32)."""
    return jax.jit(lambda params, tokens, seg, pos, tgt: token_nll(graphdef, params, tokens, seg, pos, tgt))


@dataclasses.dataclass
class HeldOutLoss:
    """Mean next-token losses (nats) on held-out prompts, by what the target token is."""

    answer_cell: float  # cells of the test output (the answer grid): comparable to ln 10 = 2.303
    answer_token: float  # every answer token (cells, line breaks, stop token)
    train_output_cell: float  # cells of the train output grids inside the prompts
    answer_cells: int  # how many answer cells were scored
    prompts: int

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["uniform_cell"] = UNIFORM_CELL_NATS
        d["answer_cell_vs_uniform"] = self.answer_cell / UNIFORM_CELL_NATS
        return d


def held_out_loss(nll_fn: Callable, params: Any, batches: Any, put: Callable) -> HeldOutLoss:
    sums = np.zeros(3)
    counts = np.zeros(3)
    prompts = 0
    for batch in batches:
        tgt, _ = targets(batch)
        nll = np.asarray(jax.device_get(nll_fn(params, *put(batch.tokens, batch.segment_ids, batch.positions, tgt))))
        nxt_kind = np.zeros_like(batch.grid_kind)
        nxt_kind[:, :-1] = batch.grid_kind[:, 1:]
        nxt_ans = np.zeros_like(batch.answer_mask)
        nxt_ans[:, :-1] = batch.answer_mask[:, 1:]
        same = np.zeros(batch.tokens.shape, bool)
        same[:, :-1] = (batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]) & (batch.segment_ids[:, 1:] > 0)
        for i, m in enumerate((nxt_ans & (nxt_kind == GRID_TEST_OUTPUT), nxt_ans, nxt_kind == GRID_TRAIN_OUTPUT)):
            m = m & same
            sums[i] += float(nll[m].sum())
            counts[i] += int(m.sum())
        prompts += len(batch.prompts)
    mean = sums / np.maximum(counts, 1)
    return HeldOutLoss(float(mean[0]), float(mean[1]), float(mean[2]), int(counts[0]), prompts)


def eval_pipeline(config: ml_collections.ConfigDict, tokenizer: Any, source_spec: str, max_prompts: int):
    """The held-out prompts: identity augmentation, answer included, same prompt format as training."""
    data = ml_collections.ConfigDict(json.loads(config.data.to_json()))
    with data.unlocked():
        for k in ("sources", "exclude"):
            del data[k]
        data.source = source_spec
        data.n_augmentations = 1
        data.shuffle = False
        data.max_prompts = int(max_prompts)
        data.seed = 0
    return make_pipeline(data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count())


__all__ = ["UNIFORM_CELL_NATS", "HeldOutLoss", "eval_pipeline", "held_out_loss", "make_nll_fn", "token_nll"]
