"""CE loss recovered: the model's next-token loss with an SAE's reconstruction spliced in at its site.

    recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)

CE_clean is the model as is, CE_sae with the site's activation replaced by
decode(encode(x)), CE_zero with it replaced by zeros (zero ablation). 1 means
the SAE loses nothing the model uses; 0 means it is as bad as deleting the site.

The spliced forward walks the same public pieces `arcstream.model.forward`
uses (embedding, rope tables, segment mask, the blocks' sub-modules, final
norm and head) and replaces one site's value on the way; the tests check it
against `forward` (identity splice) and against HF PyTorch with a forward hook
(zero splice). Prompts run one per row, right-padded to the next power of two
(at least `pad_to` tokens) so a handful of shapes compile; padding is masked out of
the loss. (Padded to multiples of 256, the default run's 16 prompts compiled 31
programs, 36 s of its 184 s analysis.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcstream.model import Decoder, forward, parse_sites
from arcstream.sae import reconstruct

MODES = ("clean", "sae", "zero")


def spliced_logits(model: Decoder, tokens_bt: jax.Array, segment_ids_bt: jax.Array, positions_bt: jax.Array,
                   site: str, replace: Callable[[jax.Array], jax.Array] | None) -> jax.Array:
    """[B, T, V] logits with `site`'s activation [B, T, D] replaced by `replace(activation)` (None = clean)."""
    parse_sites([site], model.config.num_layers)
    # The model's own forward with the site edited: every family's block (Gemma's post-norms, per-layer RoPE
    # and windows included) is the one forward, never a copy of it here.
    edits = {} if replace is None else {site: replace}
    return forward(model, tokens_bt, segment_ids_bt, positions_bt, sites=(), return_logits=True, edits=edits).logits


@nnx.jit(static_argnames=("site", "mode", "cfg"))
def _losses(model, sae_params, buffers, tokens_bt, segment_ids_bt, positions_bt, *, site, mode, cfg):
    """(sum of next-token CE over real targets, number of targets)."""
    if mode == "clean":
        replace = None
    elif mode == "zero":
        replace = jnp.zeros_like
    else:
        def replace(v_btd):
            b, t, d = v_btd.shape
            x_nd = v_btd.reshape(b * t, d).astype(jnp.float32)
            return reconstruct(sae_params, cfg, x_nd, buffers)[1].reshape(b, t, d).astype(
                v_btd.dtype)
    logits = spliced_logits(model, tokens_bt, segment_ids_bt, positions_bt, site, replace).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = tokens_bt[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    valid = (segment_ids_bt[:, 1:] > 0) & (segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1])
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def ce_loss_recovered(model: Decoder, prompts: Sequence[np.ndarray], site: str, sae_params, cfg, buffers,
                      *, pad_to: int = 256) -> dict[str, float]:
    """Mean next-token CE (nats per target token) over `prompts` (token id arrays) clean, with the SAE and
    zero-ablated at `site`, and the fraction recovered."""
    sums = {m: 0.0 for m in MODES}
    count = 0
    for ids in prompts:
        ids = np.asarray(ids, np.int32)
        n = len(ids)
        if n < 2:
            continue
        t = max(pad_to, 1 << (n - 1).bit_length())
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = ids
        seg = np.zeros((1, t), np.int32)
        seg[0, :n] = 1
        pos = np.zeros((1, t), np.int32)
        pos[0, :n] = np.arange(n)
        for m in MODES:
            s, c = _losses(model, sae_params, buffers, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos),
                           site=site, mode=m, cfg=cfg)
            sums[m] += float(s)
        count += int(c)
    if count == 0:
        return {"prompts": 0, "tokens": 0, "ce_clean": float("nan"), "ce_sae": float("nan"),
                "ce_zero": float("nan"), "ce_loss_recovered": float("nan")}
    ce = {m: sums[m] / count for m in MODES}
    gap = ce["zero"] - ce["clean"]
    return {"prompts": len(prompts), "tokens": count, "ce_clean": ce["clean"], "ce_sae": ce["sae"],
            "ce_zero": ce["zero"], "ce_loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap != 0 else float("nan")}
